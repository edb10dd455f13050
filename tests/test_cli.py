"""The artifex command, in-process and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from artifex.cli import build_config, build_parser, main


def test_models_and_presets_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("ti2v-5b", "t2v-a14b", "i2v-a14b", "s2v-14b", "tiny-ti2v", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"):
        assert name in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["t2v-a14b"]["boundary"] == 0.875 and data["ti2v-5b"]["spatial_multiple"] == 32
    assert main(["presets", "--model", "t2v-a14b"]) == 0
    out = capsys.readouterr().out
    assert "draft" in out and "832x480" in out and "1280x720" in out and "use_torch_compile=True" in out


def test_generate_writes_mp4_with_progress(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model", "tiny-t2v-moe", "--prompt", "a dog running", "--size", "128x64",
                 "--frames", "9", "--steps", "4", "--seed", "5", "--output", str(out), "--max-batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "denoise" in captured.err and "4/4" in captured.err and "low-noise from step" in captured.err
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["config"]["max_batch_size"] == 2 and side["plan"]["cfg_batch"] == 2
    assert_wall_adds_up(side["wall"])
    assert side["read_ahead"] == {"state": "skipped", "reason": "not a local diffusers-layout checkpoint directory"}
    assert "wall " in captured.err and "since the process started" in captured.err


def assert_wall_adds_up(wall: dict) -> None:
    """The sidecar's wall section: every stage measured, none negative, their sum within the process's age."""
    stages = wall["stages_s"]
    assert {"process.startup", "process.imports", "load.checkpoint_read", "load.placement", "request.encode_text",
            "request.denoise", "request.decode", "request.write"} <= set(stages)
    assert all(v >= 0 for v in stages.values())
    assert abs(wall["stages_sum_s"] - sum(stages.values())) < 1e-3
    assert wall["stages_sum_s"] <= wall["process_s"] + 1e-3  # rounding of each stage to 0.1 ms
    assert abs(wall["process_s"] - wall["stages_sum_s"] - wall["other_s"]) < 1e-3
    imports = wall["imports_s"]  # process.imports by library group, and the rest of that phase
    assert {"torch", "torch._dynamo", "diffusers", "diffusers.models", "transformers", "artifex.engine",
            "elsewhere"} <= set(imports)
    assert all(v >= 0 for v in imports.values())
    assert abs(sum(imports.values()) - stages["process.imports"]) < 1e-3


@pytest.mark.slow
def test_the_command_line_itself_imports_no_heavy_library():
    """``artifex --help``, argument errors and the parser cost no torch, numpy, server or Ray import: the heavy
    libraries are imported by the commands that use them."""
    heavy = ("torch", "numpy", "PIL", "diffusers", "transformers", "triton", "av", "safetensors", "fastapi",
             "uvicorn", "ray", "requests")
    code = ("import sys\nfrom artifex.cli import build_parser\nbuild_parser()\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout


def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path):
    cases = [
        (["--model", "tiny-t2v-moe", "--frames", "10"], "frames: must be 4n+1"),
        (["--model", "tiny-t2v-moe", "--size", "100x64"], "width: 100 is not a multiple of 16"),
        (["--model", "tiny-t2v-moe", "--steps", "0"], "steps: must be between 1 and 1000"),
        (["--model", "tiny-t2v-moe", "--guidance", "-2"], "guidance: must be >= 0"),
        (["--model", "wan9"], "model: unknown model 'wan9'"),
        (["--model", "tiny-t2v-moe", "--preset", "ultra"], "preset: unknown preset 'ultra'"),
        (["--model", "tiny-i2v-moe"], "image: tiny-i2v-moe generates from an image"),
        (["--model", "tiny-i2v-moe", "--image", str(tmp_path / "no.png")], "no.png does not exist"),
        (["--model", "tiny-t2v-moe", "--checkpoint", str(tmp_path / "nope")], "nope: does not exist"),
        (["--model", "tiny-t2v-moe", "--attention", "sdpa", "--use-flash-attention"],
         "use_flash_attention: conflicts with attention='sdpa'"),
        (["--model", "tiny-t2v-moe", "--attention", "fa3"], "attention backend 'fa3' cannot run here: needs CUDA"),
        (["--model", "tiny-t2v-moe", "--vram-budget", "24XB"], "vram_budget: cannot read '24XB'"),
        (["--model", "tiny-t2v-moe", "--vram-budget", "1MB"], "vram_budget: 0.0 GiB is too little"),
    ]
    for args, message in cases:
        assert main(["generate", "--prompt", "x", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err


def test_config_precedence(tmp_path, monkeypatch):
    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text("vae_tiling = true\nmax_batch_size = 2\n")
    file_cfg = tmp_path / "file.toml"
    file_cfg.write_text("max_batch_size = 3\nuse_torch_compile = false\n")
    monkeypatch.setenv("ARTIFEX_CONFIG", str(env_cfg))
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--config", str(file_cfg),
                              "--vae-slicing", "--precision", "fp32"])
    cfg = build_config(args, preset="production")
    # preset turned compile on, the file turned it off; env set tiling, file overrode batch; flags on top
    assert (cfg.use_torch_compile, cfg.vae_tiling, cfg.max_batch_size, cfg.vae_slicing, cfg.precision) == (
        False, True, 3, True, "fp32")


@pytest.mark.slow
def test_demo_runs_as_a_real_command(tmp_path):
    out = tmp_path / "demo.mp4"
    env = {**os.environ, "ARTIFEX_OUTPUT_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "artifex", "demo", "--frames", "17", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == out
    assert "demo video written to" in proc.stderr
    wall = json.loads(out.with_suffix(".json").read_text())["wall"]
    assert wall["clock"] == "process start (/proc/self/stat)"  # the interpreter's own start-up counts
    assert_wall_adds_up(wall)
    assert wall["stages_s"]["process.imports"] > 0  # a fresh process imports torch and diffusers
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.width, s.height) == ("h264", 256, 160)
        assert sum(1 for _ in c.decode(s)) == 17


def test_doctor_reports_backends_and_environment(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "attention backends" in out and "sdpa-math" in out and "verified" in out
    assert "PYTORCH_CUDA_ALLOC_CONF" in out and "TOKENIZERS_PARALLELISM" in out
    assert "VAE kernels (fast_vae):" in out and "RMS norm + SiLU" in out
    assert main(["doctor", "--json", "--no-verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) >= {"fa3", "fa2", "sdpa", "sdpa-cudnn", "flex", "sage", "xformers", "sliced"}
    assert report["backends"]["sdpa"]["available"] is True
    if report["device"]["type"] == "cpu":
        assert "needs CUDA" in report["backends"]["fa3"]["reason"]
        # the fused DiT kernels say which path runs here and why
        assert report["kernels"]["qk_norm_rope"]["path"] == "torch"
        assert report["kernels"]["fp8_gemm"]["path"] == "twin" and "CUDA" in report["kernels"]["fp8_gemm"]["reason"]
        for name in ("ffn_gelu_epilogue", "fp8_row_quantize", "adaptive_norms", "vae_rms_silu"):
            assert report["kernels"][name]["path"] == "torch" and "CUDA" in report["kernels"][name]["reason"]


def test_bench_attention_writes_json_and_markdown(tmp_path, capsys):
    code = main(["bench", "attention", "--only-shapes", "--shape", "small=1x128x2x64", "--iters", "2",
                 "--warmup", "1", "--output-dir", str(tmp_path), "--no-processor-check"])
    assert code == 0
    data = json.loads(next(tmp_path.glob("attention-*.json")).read_text())
    assert {"device", "command", "date", "versions", "summary"} <= set(data)
    s = data["summary"]
    assert s["auto_backend"]["small"] in {r["backend"] for r in data["results"]}
    assert s["best_tflops"]["small"] >= s["auto_tflops"]["small"] > 0 and s["matmul_peak_tflops"] > 0
    assert "| small |" in next(tmp_path.glob("attention-*.md")).read_text()
    assert main(["bench", "attention", "--only-shapes", "--shape", "bad=1x2x3"]) == 2
    assert "shape must look like NAME=BxLxHxD" in capsys.readouterr().err
