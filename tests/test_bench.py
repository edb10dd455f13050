"""The benchmark commands end to end on tiny models on the CPU: they run, compare, and write their reports."""

from __future__ import annotations

import json

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
    assert "Artifex bf16" in (tmp_path / "pipeline-cpu.md").read_text()
    assert sorted(p.name for p in (tmp_path / "pipeline-videos").iterdir() if p.suffix == ".mp4") == [
        "artifex-default.mp4", "diffusers.mp4", "warmup-default.mp4"]  # the second call kept none


def test_the_guide_benchmark_script_maps_onto_bench_pipeline():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_wan22.py"
    spec = importlib.util.spec_from_file_location("benchmark_wan22", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.translate(["--model", "ti2v-5B", "--flash-attention", "--steps", "2"]) == [
        "bench", "pipeline", "--model", "ti2v-5b", "--steps", "2"]
