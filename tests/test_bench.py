"""The benchmark commands end to end on tiny models on the CPU: they run, compare, and write their reports."""

from __future__ import annotations

import json

import pytest

from artifex.cli import main


def test_bench_dit_runs_on_a_tiny_model_and_writes_its_report(tmp_path):
    assert main(["bench", "dit", "--model", "tiny-ti2v", "--iters", "2", "--warmup", "1", "--compile", "off",
                 "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dit-cpu.json").read_text())
    assert {"device", "command", "date", "versions", "summary"} <= set(data)
    row = data["summary"]["tinyti2v_256x160"]
    assert row["diffusers_default_s"] > 0 and row["artifex_bf16_s"] > 0
    assert row["rel_l2_bf16"] < 2e-2  # the same model in bf16, summed differently
    assert (tmp_path / "dit-cpu.md").read_text().count("artifex_bf16") == 1


def test_bench_dit_ablations_and_kernel_profile(tmp_path):
    """The ablation rows (one Artifex change off) run after artifex_bf16 on the same model; --profile puts a
    kernel (here: CPU operator) breakdown in every row and a table in the Markdown."""
    assert main(["bench", "dit", "--model", "tiny-ti2v", "--iters", "1", "--warmup", "1", "--compile", "off",
                 "--variants", "artifex_bf16", "artifex_bf16_unfused_qkv", "artifex_bf16_no_gelu_epilogue",
                 "--profile", "--fp32-reference", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dit-cpu.json").read_text())["shapes"]["tinyti2v_256x160"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["diffusers_default", "artifex_bf16", "artifex_bf16_unfused_qkv",
                          "artifex_bf16_no_gelu_epilogue"]
    for r in rows.values():
        k = r["kernels"]
        assert k["total_ms"] > 0 and k["top"] and abs(sum(k["categories"].values()) - k["total_ms"]) < 0.1
        assert "gemm" in k["categories"] and k["top"][0]["category"] in {c for c in k["categories"]}
    assert rows["artifex_bf16_unfused_qkv"]["rel_l2"] < 2e-2
    assert all(0 < r["rel_l2_fp32"] < 2e-2 for r in rows.values())  # each bf16 path against the fp32 model
    summary = json.loads((tmp_path / "dit-cpu.json").read_text())["summary"]["tinyti2v_256x160"]
    assert summary["rel_l2_fp32_diffusers_default"] == rows["diffusers_default"]["rel_l2_fp32"]
    assert "One profiled forward per variant" in (tmp_path / "dit-cpu.md").read_text()


def test_kernel_categories_name_the_kernels_seen_on_hopper():
    from artifex.bench.report import kernel_category

    assert kernel_category("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<") \
        == "attention"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1") == "gemm"
    assert kernel_category("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kernel_category("triton_red_fused__to_copy_add_mul_native_layer_norm_0") == "compiled_elementwise"
    assert kernel_category("_qk_norm_rope_kernel") == "qk_norm_rope"
    assert kernel_category("_ada_norm_kernel") == "ada_norm"
    assert kernel_category("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_view_5") \
        == "compiled_elementwise"  # a quantization that inductor named after the matmul it feeds
    assert kernel_category("triton_red_fused__fused_rms_norm_attention_view_3") == "compiled_elementwise"
    assert kernel_category("_quantize_rows_kernel") == "fp8_quantize" and kernel_category("triton_tem_fused_mm_0") == "gemm"
    assert kernel_category("aten::linear") == "gemm" and kernel_category("aten::gelu") == "other"


def test_bench_pipeline_runs_diffusers_and_artifex_and_appends(tmp_path):
    args = ["bench", "pipeline", "--model", "tiny-ti2v", "--steps", "2", "--frames", "9", "--output-dir", str(tmp_path)]
    assert main(args + ["--configs", "default", "--keep-videos"]) == 0
    data = json.loads((tmp_path / "pipeline-cpu.json").read_text())
    assert {"device", "command", "date", "versions", "summary"} <= set(data)
    s = data["summary"]["tinyti2v_256x160_9f_2steps"]
    assert s["diffusers_total_s"] > 0 and s["total_s"] > 0 and s["denoise_s"] > 0 and s["config"] == "default"
    assert (tmp_path / "pipeline-videos" / "diffusers.mp4").stat().st_size > 0
    assert (tmp_path / "pipeline-videos" / "artifex-default.mp4").stat().st_size > 0
    # a second, shorter call adds a run to the same file and keeps diffusers' run from the first
    assert main(args + ["--configs", "bf16", "--diffusers", "off", "--append"]) == 0
    data = json.loads((tmp_path / "pipeline-cpu.json").read_text())
    assert [r["config"] for r in data["runs"]] == ["default", "bf16"]
    assert data["diffusers"]["total_s"] == s["diffusers_total_s"]
    assert data["vae"]["bf16"]["psnr_db_vs_fp32"] > 30  # bf16 VAE against fp32 on the same latents
    light = data["vae"]["light_bf16"]  # the light decoder on the same latents: all frames, its check timed
    assert light["frames"] == 9 and light["seconds"] > 0 and 0 < light["check_s"] <= light["seconds"]
    assert "Artifex bf16" in (tmp_path / "pipeline-cpu.md").read_text()
    assert sorted(p.name for p in (tmp_path / "pipeline-videos").iterdir() if p.suffix == ".mp4") == [
        "artifex-default.mp4", "diffusers.mp4", "warmup-default.mp4"]  # the second call kept none


@pytest.mark.slow
def test_bench_fewstep_fuses_a_lora_in_both_and_merges_cases_run_apart(tmp_path):
    """The few-step benchmark on the tiny twins: diffusers with the LoRA fused through its own loader, Artifex with
    it fused at load (time per expert), the published schedules, and a case run in a later call merged in."""
    args = ["bench", "fewstep", "--configs", "bf16", "--output-dir", str(tmp_path), "--cases"]
    assert main(args + ["tiny_ti2v_3step"]) == 0
    assert main(args + ["tiny_i2v_4step"]) == 0
    data = json.loads((tmp_path / "fewstep-cpu.json").read_text())
    assert {"device", "command", "date", "versions", "summary"} <= set(data)
    ti2v, i2v = data["summary"]["tiny_ti2v_3step"], data["summary"]["tiny_i2v_4step"]
    for s in (ti2v, i2v):
        assert {"total_s", "denoise_s", "decode_s", "write_s", "peak_gib", "config", "diffusers_total_s"} <= set(s)
        assert s["diffusers_lora_fuse_s"] is not None and s["config"] == "bf16"
    assert len(ti2v["lora_fuse_s_per_expert"]) == 1 and len(i2v["lora_fuse_s_per_expert"]) == 2
    assert "bf16_no_lora_denoise_s" in ti2v and ti2v["vae_bf16_psnr_db_vs_fp32"] > 30
    cases = data["cases"]
    assert "from_command" in cases["tiny_ti2v_3step"] and "from_command" not in cases["tiny_i2v_4step"]
    run = cases["tiny_i2v_4step"]["runs"][0]
    assert run["steps"] == 4 and run["sampler"] == "euler" and run["experts_per_step"] == [0, 0, 1, 1]
    assert cases["tiny_ti2v_3step"]["runs"][0]["timesteps"] == [1000.0, 757.0, 522.0]
    assert "lora_error" not in cases["tiny_i2v_4step"]["diffusers"]


def test_the_guide_benchmark_script_maps_onto_bench_pipeline():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_wan22.py"
    spec = importlib.util.spec_from_file_location("benchmark_wan22", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.translate(["--model", "ti2v-5B", "--flash-attention", "--steps", "2"]) == [
        "bench", "pipeline", "--model", "ti2v-5b", "--steps", "2"]


@pytest.mark.slow
def test_bench_multigpu_runs_every_layout_in_its_own_gloo_world_and_reports(tmp_path, artifex_home):
    """One plain process, the same through the runner (a gloo world of one), CFG-parallel 2 and Ulysses 2 (two gloo
    ranks each), each warmed up and measured; the same latents for every layout (fp32), every collective counted."""
    import json
    import os
    import subprocess
    import sys

    from artifex.models.registry import get_model

    steps = 2
    cmd = [sys.executable, "-m", "artifex.cli", "bench", "multigpu", "--model", "tiny-t2v-moe", "--layouts", "2x1",
           "1x1", "1x2", "--runner-baseline", "--steps", str(steps), "--precision", "fp32", "--compile", "off",
           "--output-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1x1, 1x1-runner, 2x1, 1x2 (gloo)" in p.stderr  # the one-process reference runs first
    data = json.loads((tmp_path / "multigpu-cpu.json").read_text())
    assert {"device", "command", "date", "versions", "summary"} <= data.keys()
    shape = data["shapes"]["tinyt2vmoe_160x96"]
    rows = {r["layout"]: r for r in shape["layouts"]}
    assert list(rows) == ["1x1", "1x1-runner", "2x1", "1x2"]
    layers = get_model("tiny-t2v-moe").transformer.layers
    for key, row in rows.items():
        assert row["rel_l2_latents"] < 1e-5 and row["rel_l2_first_prediction"] < 1e-5, (key, row)
        assert row["median_step_s"] > 0 and row["total_s"] > row["denoise_s"] > 0
        # 2 of the model's 10 steps measured: the whole generation projected from the median step
        assert row["projected_total_s"] == round(row["total_s"] - row["denoise_s"] + 10 * row["median_step_s"], 2)
    calls = {key: {k: v["calls"] for k, v in row["ranks"][0]["comm"].items()} for key, row in rows.items()}
    assert calls == {"1x1": {}, "1x1-runner": {}, "2x1": {"all_gather": steps},  # one gather of predictions a step
                     "1x2": {"all_to_all": 2 * layers * steps, "all_gather": steps}}  # 2 per block, 1 at the head
    assert rows["2x1"]["attention_shape"][0] == 1 and rows["1x2"]["attention_shape"][2] == 1  # one pass, 1 of 2 heads
    assert set(rows["2x1"]["idle_wait_s"]) == {"1"} and rows["1x1"]["idle_wait_s"] == {}
    summary = data["summary"]["tinyt2vmoe_160x96"]
    assert summary["cfg2_speedup"] == rows["2x1"]["speedup_step"] and summary["layouts"]["1x1"]["speedup_step"] == 1.0
    assert "| cfg 2 x ulysses 1 | 2 |" in (tmp_path / "multigpu-cpu.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--layouts", "3x1"], "CFG-parallel degree must be 1"),
    (["--layouts", "1x3"], "Ulysses degree must divide tiny-t2v-moe's 2 attention heads"),
    (["--layouts", "two"], "layout 'two' is not CFGxULYSSES"),
    (["--steps", "1"], "the median step needs at least 2 measured steps"),
    (["--frames", "6"], "frames"),
])
def test_bench_multigpu_refuses_bad_input_before_starting_ranks(flags, message, capsys):
    assert main(["bench", "multigpu", "--model", "tiny-t2v-moe", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "torch.distributed.run" not in err


@pytest.mark.slow
def test_bench_multigpu_ulysses_runs_inside_compiled_blocks(tmp_path, artifex_home):
    """Ulysses' all-to-alls run eagerly inside compiled blocks (the graph breaks around attention), then the
    blocks go back to the whole-graph compile; with --append the earlier one-GPU run stays the reference, its
    tensors (kept beside the report in fp16) too."""
    import os
    import subprocess
    import sys

    base = [sys.executable, "-m", "artifex.cli", "bench", "multigpu", "--model", "tiny-t2v-moe", "--steps", "2",
            "--compile", "on", "--precision", "fp32", "--output-dir", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    shapes, reports = [], []
    for layouts in (["1x2"], ["1x1", "--append"], ["1x2", "--append"]):
        p = subprocess.run([*base, "--layouts", *layouts], capture_output=True, text=True, timeout=400, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        shapes.append(json.loads((tmp_path / "multigpu-cpu.json").read_text())["shapes"]["tinyt2vmoe_160x96"])
        reports.append((tmp_path / "multigpu-cpu.md").read_text())
    # Ulysses measured first has no reference; the one-GPU layout appended later gives it speedups, not equality.
    assert "speedup_step" not in shapes[0]["layouts"][0]
    rows = {r["layout"]: r for r in shapes[1]["layouts"]}
    assert list(rows) == ["1x1", "1x2"] and rows["1x2"]["speedup_step"] > 0
    assert "measured in an earlier run than the one-GPU reference" in rows["1x2"]["equality"]
    assert "the one-GPU layout above (this run) is their reference" in reports[1]
    # Ulysses again: compared against the one-GPU layout's tensors, kept beside the report.
    shape = shapes[2]
    rows = {r["layout"]: r for r in shape["layouts"]}
    assert list(rows) == ["1x1", "1x2"] and shape["appended_to"]["command"].endswith("--layouts 1x1 --append")
    assert rows["1x2"]["ranks"][0]["comm"]["all_to_all"]["calls"] > 0 and rows["1x2"]["speedup_step"] > 0
    assert (tmp_path / "multigpu-tinyt2vmoe_160x96-reference.pt").exists()
    assert rows["1x1"]["reference_tensors"] == shape["appended_to"]["date"]
    assert "earlier run, kept in fp16" in rows["1x2"]["equality"]
    assert rows["1x2"]["rel_l2_latents"] < 2e-3 and rows["1x2"]["rel_l2_first_prediction"] < 2e-3


def test_ulysses_hooks_switch_compiled_blocks_to_graph_breaks_and_back():
    from diffusers import WanTransformer3DModel

    from artifex.distributed.ulysses import UlyssesHooks
    from artifex.engine.dit import accelerate_model, compiled_block_core
    from artifex.models.registry import get_model

    class Shard:  # the hooks only read the group size when they are installed
        size = 1

    model = WanTransformer3DModel(**get_model("tiny-t2v-moe").transformer.diffusers_config())
    accelerate_model(model, compile_blocks=True)
    assert all(b._artifex_core is compiled_block_core(True) for b in model.blocks)
    hooks = UlyssesHooks([model], runtime=lambda q, k, v: q, shard=Shard())
    assert all(b._artifex_core is compiled_block_core(False) for b in model.blocks)
    hooks.remove()
    assert all(b._artifex_core is compiled_block_core(True) for b in model.blocks)


@pytest.mark.slow
def test_bench_pipeline_user_path_runs_the_cli_on_a_saved_checkpoint(tmp_path):
    """`--user-path`: random weights saved with save_pretrained, `artifex generate` as a process per budget, a
    repeated prompt in `artifex batch`, diffusers' from_pretrained on the same directory; the issue's keys."""
    saved = tmp_path / "ckpt"
    args = ["bench", "pipeline", "--model", "tiny-ti2v", "--steps", "2", "--frames", "9", "--output-dir",
            str(tmp_path), "--user-path", "--only-user-path", "--save-checkpoint", str(saved),
            "--user-prime-steps", "1", "--user-flags", "ARTIFEX_DECODE_WARM_UP=off"]
    assert main(args) == 0
    assert (saved / "model_index.json").is_file() and (saved / "transformer" / "config.json").is_file()
    data = json.loads((tmp_path / "ttv-cpu.json").read_text())  # the user's path alone: time to video
    assert not (tmp_path / "pipeline-cpu.json").exists()
    up = data["user_path"]
    prime, plain, budget, off = up["runs"]
    assert prime["run"] == "cli-first-on-machine" and prime["steps"] == 1 and plain["steps"] == 2
    assert plain["budget"] is None and budget["budget"] == "24GB"
    # A NAME=value word of --user-flags: a variable of that run's process, not a flag
    assert off["run"] == "cli-ARTIFEX_DECODE_WARM_UP=off" and off["flags"] == [] and off["budget"] is None
    assert off["env"] == {"ARTIFEX_DECODE_WARM_UP": "off"}
    assert plain["decode_warm_up"] is None and plain["decode_warm_up_fits"] is False  # a CPU without a budget
    assert prime["attention_source"] in ("timed", "cache") and plain["attention_source"] == "cache"
    assert isinstance(plain["log_warnings"], list)  # what warning_lines keeps: tested on its own
    assert plain["denoise_steps"]["steps"] == 2 and prime["denoise_steps"]["steps"] == 1
    assert plain["prefetch"][str(saved.resolve())]["files"] == 3  # transformer, VAE, text encoder
    for r in up["runs"]:
        assert r["cli_wall_s"] >= r["process_to_mp4_s"] >= r["wall"]["stages_sum_s"] - 1e-3
        assert r["wall"]["stages_s"]["process.imports"] > 0 and r["timings_s"]["denoise"] > 0
        assert r["vae_precision"] == "fp32"  # auto on a CPU
    assert up["repeat_prompt"]["repeat_hit"] == {"prompt": True, "negative_prompt": True}
    assert up["diffusers"]["load_s"] > 0 and up["diffusers"]["wall_s"] >= up["diffusers"]["load_s"]
    s = data["summary"]
    assert set(s) == {"tinyti2v_256x160", "tinyti2v_256x160_24gb"}  # no in-memory runs: no other key
    assert {"cli_wall_s", "engine_total_s", "load_s", "diffusers_wall_s", "diffusers_load_s",
            "repeat_prompt_text_s"} <= set(s["tinyti2v_256x160"])
    assert s["tinyti2v_256x160"]["repeat_prompt_text_s"] == up["repeat_prompt"]["repeat_text_s"]
    assert set(s["tinyti2v_256x160_24gb"]) == {"cli_wall_s", "peak_gib"}
    assert s["tinyti2v_256x160"]["cli_wall_s"] == plain["cli_wall_s"]  # the primed run, not the machine's first
    report = (tmp_path / "ttv-cpu.md").read_text()
    assert "The user's path" in report and "ARTIFEX_DECODE_WARM_UP=off artifex generate" in report
    assert main(["bench", "pipeline", "--model", "tiny-ti2v", "--only-user-path"]) == 2  # needs --user-path
    assert main(["bench", "pipeline", "--model", "tiny-ti2v", "--user-loads"]) == 2

    # Loading alone, appended to the same file: the earlier runs stay, the load rows join them.
    args = ["bench", "pipeline", "--model", "tiny-ti2v", "--steps", "2", "--frames", "9", "--output-dir",
            str(tmp_path), "--user-path", "--only-user-path", "--checkpoint", str(saved), "--append",
            "--user-budgets", "", "--no-user-repeat", "--diffusers", "off", "--user-loads", "--user-server",
            "--user-flags", "--attention flash9"]
    assert main(args) == 1  # one row failed: recorded, the others still ran and the file was written
    merged = json.loads((tmp_path / "ttv-cpu.json").read_text())
    (err,) = merged["user_path"]["errors"]
    assert err["run"] == "cli-attention-flash9" and "invalid choice: 'flash9'" in err["error"]
    assert [r["run"] for r in merged["user_path"]["runs"]] == [r["run"] for r in up["runs"]]
    assert merged["user_path"]["diffusers"] == up["diffusers"]
    assert [a["date"] for a in merged["appended_to"]] == [data["date"]]  # the series' earlier calls
    loads = {r["run"]: r for r in merged["user_path"]["loads"]["runs"]}
    assert list(loads) == ["warm-libraries-serial", "warm-libraries-parallel", "warm-fast-read", "cold-prefetch-off",
                           "cold-prefetch-on"]
    assert loads["warm-libraries-serial"]["env"] == {"ARTIFEX_FAST_READ": "off", "ARTIFEX_PREFETCH": "off",
                                                     "HF_ENABLE_PARALLEL_LOADING": "no"}
    assert loads["cold-prefetch-on"]["page_cache_dropped_gib"] >= 0 and loads["warm-libraries-serial"][
        "page_cache_dropped_gib"] == 0
    pf = loads["cold-prefetch-off"]["prefetch"][str(saved.resolve())]
    assert pf["skipped"] == "ARTIFEX_PREFETCH=off"
    assert loads["cold-prefetch-on"]["prefetch"][str(saved.resolve())]["state"] in ("done", "stopped")
    assert merged["summary"]["tinyti2v_256x160"] == s["tinyti2v_256x160"]
    assert merged["summary"]["tinyti2v_256x160_load"]["diffusers_cold_load_s"] > 0
    assert "Loading alone" in (tmp_path / "ttv-cpu.md").read_text()
    srv = merged["user_path"]["server"]  # artifex serve on the same directory: ready, then one job through the API
    assert srv["ready_s"] >= srv["healthz_s"] > 0 and srv["load_s"] > 0 and srv["warmup_s"] > 0
    assert 0 < srv["imports_s"] < srv["load_s"]  # a fresh server process: its load imported the libraries
    assert srv["first_request_s"] > 0 and srv["job_timings_s"]["denoise"] > 0
    assert merged["summary"]["tinyti2v_256x160_serve"]["ready_s"] == srv["ready_s"]


def test_warning_lines_keep_the_last_warnings_of_a_process_log():
    from artifex.bench.pipeline import warning_lines

    log = "\n".join(["loading ti2v-5b ...", "INFO artifex: plan: x", "WARNING artifex: 160x96 is not a size",
                     "  WARNING indented: not a log line", "WARNINGS are not a level",
                     *[f"WARNING artifex: number {i}" for i in range(25)], "denoise 2/2"])
    assert warning_lines(log, keep=3) == [f"WARNING artifex: number {i}" for i in (22, 23, 24)]
    assert warning_lines(log)[0] == "WARNING artifex: number 5" and len(warning_lines(log)) == 20  # 26 kept 20
    assert warning_lines("WARNING artifex: one\nINFO x", keep=5) == ["WARNING artifex: one"]
    assert warning_lines("") == []
