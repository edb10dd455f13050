"""The expert pipeline (A14B, one expert per device, jobs pipelined) against engine.generate one job at a time.

On a CPU both devices are the CPU: the two stage threads, the hand-over through the queue and the
scheduler carried across run as on two GPUs; nothing moves. fp32 without TF32, so the comparison
is exact (torch.equal).
"""

from __future__ import annotations

import json
import threading

import av
import numpy as np
import pytest
import torch

from artifex.engine.request import GenerationRequest
from artifex.errors import InvalidRequestError
from artifex.multidevice.experts import ExpertPipeline, ExpertPipelineError

FP32 = dict(precision="fp32", tf32=False)


def frames_of(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_three_jobs_pipelined_give_the_one_by_one_latents_and_overlap(engine, tmp_path):
    eng = engine("tiny-t2v-moe", **FP32)
    # 6 steps at shift 12: steps 0-3 high-noise, 4-5 low-noise. Different prompts, seeds and CFG per job.
    kws = [dict(prompt="a boat on the river", seed=1), dict(prompt="a kite at sunset", seed=2, guidance_low=1.0),
           dict(prompt="snow on a quiet street", seed=3, guidance=5.0)]
    requests = [GenerationRequest(model="tiny-t2v-moe", steps=6, frames=5, output=str(tmp_path / f"p{i}.mp4"), **kw)
                for i, kw in enumerate(kws)]
    plain = [eng.generate(GenerationRequest(**{**r.to_dict(), "output": str(tmp_path / f"s{i}.mp4")}))
             for i, r in enumerate(requests)]
    assert plain[0].switch_step == 4

    events, lock = [], threading.Lock()
    job1_stepped = threading.Event()

    def on_event(e):
        if e.job == 1 and e.stage == "denoise" and e.step == 1:
            job1_stepped.set()
        if e.job == 0 and e.stage == "denoise" and e.expert == 1 and e.step == 5:
            # Stage B of job 0 waits here, mid-way through its low-noise steps, until stage A of job 1 has run a
            # high-noise step. A pipeline that ran the stages one after another would never get there.
            assert job1_stepped.wait(60), "stage A of job 1 did not run while job 0 was in stage B"
        with lock:
            events.append((e.job, e.stage, e.step, e.expert))

    with ExpertPipeline(eng, ("cpu", "cpu")) as pipe:
        results = pipe.run(requests, on_event=on_event)

    for r, p in zip(results, plain):
        assert torch.equal(r.latents, p.latents)  # exact: the same computation, split over two threads
        assert r.experts_per_step == p.experts_per_step and r.switch_step == p.switch_step
        # the VAE decode may run beside the other stage's compute: CPU kernels may then sum in another order,
        # so a pixel may round to the next 8-bit level (H.264 then spreads it); the latents above are exact.
        a, b = frames_of(r.video_path).astype(int), frames_of(p.video_path).astype(int)
        assert np.abs(a - b).mean() < 1.0  # a wrong decode differs by tens of levels
    assert frames_of(results[2].video_path).shape == (5, 96, 160, 3)

    # Ordering: job 1 encoded its text and ran a high-noise step before job 0's low-noise steps and decode ended.
    at = {ev: i for i, ev in reversed(list(enumerate(events)))}  # first occurrence of each event
    assert at[(1, "encode_text", 0, None)] < at[(0, "denoise", 5, 1)]
    assert at[(1, "denoise", 1, 0)] < at[(0, "denoise", 5, 1)] < at[(0, "done", 1, None)]
    assert at[(0, "handoff", 4, None)] < at[(0, "denoise", 5, 1)]
    for job in range(3):  # each job's own events in the algorithm's order
        stages = [s for j, s, _, _ in events if j == job and s != "denoise"]
        assert stages == ["encode_text", "handoff", "decode", "write", "done"]
        steps = [(st, ex) for j, s, st, ex in events if j == job and s == "denoise"]
        assert steps == [(i + 1, results[job].experts_per_step[i]) for i in range(6)]

    side = json.loads(results[1].sidecar_path.read_text())
    par = side["parallel"]
    assert par["mode"] == "expert_pipeline" and par["devices"] == ["cpu", "cpu"] and par["job"] == 1
    assert par["stage_a"]["steps"] == [0, 4] and par["stage_b"]["steps"] == [4, 6]
    assert {"encode_text", "denoise_high", "stage_a", "queued", "denoise_low", "denoise", "decode", "write",
            "total"} <= set(side["timings_s"])
    # The engine is whole again after close: one attention runtime, every model on its device, generate works.
    assert all(p.runtime is eng.attention for e in eng.c.experts for p in e.attn_processors.values())
    again = eng.generate(GenerationRequest(**{**requests[0].to_dict(), "output": str(tmp_path / "again.mp4")}))
    assert torch.equal(again.latents, plain[0].latents)


def test_i2v_pipelined_and_a_failed_job_fails_alone(engine, tmp_path, image_file):
    """I2V: stage A encodes the image on device 1's VAE (shared with stage B's decode under its lock). The middle
    request has no image, which I2V requires: that job fails, the others finish, run raises at the end."""
    eng = engine("tiny-i2v-moe", **FP32)
    good = dict(model="tiny-i2v-moe", prompt="a red square", steps=4, frames=5, image=str(image_file))
    requests = [GenerationRequest(seed=1, output=str(tmp_path / "a.mp4"), **good),
                GenerationRequest(model="tiny-i2v-moe", prompt="no image", steps=4, frames=5),
                GenerationRequest(seed=2, output=str(tmp_path / "c.mp4"), **good)]
    with ExpertPipeline(eng) as pipe, pytest.raises(ExpertPipelineError) as err:
        pipe.run(requests)
    assert list(err.value.errors) == [1] and isinstance(err.value.errors[1], InvalidRequestError)
    results = err.value.results
    assert results[1] is None
    for i, r in ((0, results[0]), (2, results[2])):
        plain = eng.generate(GenerationRequest(**{**requests[i].to_dict(), "output": str(tmp_path / f"s{i}.mp4")}))
        assert torch.equal(r.latents, plain.latents)
        assert r.switch_step is not None and 0 < r.switch_step < 4
        assert frames_of(r.video_path).shape == (5, 96, 160, 3)


def test_bad_layouts_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="model: .*tiny-ti2v has 1 expert.*allowed: .*tiny-t2v-moe"):
        ExpertPipeline(engine("tiny-ti2v"))
    with pytest.raises(InvalidRequestError, match="placement: .*'expert_swap'.*allowed: resident"):
        ExpertPipeline(engine("tiny-t2v-moe", experts="swap"))
    with pytest.raises(InvalidRequestError, match="placement: .*'model_offload'"):
        ExpertPipeline(engine("tiny-t2v-moe", offload_to_cpu=True))
    with pytest.raises(InvalidRequestError, match="devices: .*cuda:0 twice"):
        ExpertPipeline(engine("tiny-t2v-moe"), ("cuda:0", "cuda:0"))


@pytest.mark.parametrize("pipelined", [False, True])
def test_artifex_batch_end_to_end(tmp_path, capsys, pipelined):
    from artifex.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na boat on the river\n\na kite at sunset\n")
    argv = ["batch", "--model", "tiny-t2v-moe", "--prompts-file", str(prompts), "--steps", "6", "--frames", "5",
            "--seed", "3", "--precision", "fp32", "--no-tf32", "--output-dir", str(tmp_path / "out")]
    assert main(argv + (["--expert-pipeline"] if pipelined else [])) == 0
    out, err = capsys.readouterr()
    paths = out.split()
    assert len(paths) == 2
    for i, (path, prompt) in enumerate(zip(paths, ["a boat on the river", "a kite at sunset"])):
        side = json.loads(open(path.replace(".mp4", ".json")).read())
        assert side["request"]["prompt"] == prompt and side["seed"] == 3
        assert ("parallel" in side) == pipelined
        assert frames_of(path).shape == (5, 96, 160, 3)
        assert f"[job {i + 1}/2]" in err and "low-noise expert" in err
    if pipelined:
        assert "expert pipeline: high-noise expert on cpu" in err


def test_artifex_batch_refuses_bad_input(tmp_path, capsys):
    from artifex.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert main(["batch", "--model", "tiny-t2v-moe", "--prompts-file", str(empty)]) == 2
    assert "prompts_file" in capsys.readouterr().err
    assert main(["batch", "--model", "tiny-t2v-moe", "--prompt", "a", "--prompt", "b", "--output", "x.mp4"]) == 2
    assert "output: one path for 2 prompts" in capsys.readouterr().err
    assert main(["batch", "--model", "tiny-ti2v", "--prompt", "a", "--expert-pipeline", "--steps", "2",
                 "--frames", "5"]) == 2
    assert "tiny-ti2v has 1 expert" in capsys.readouterr().err


def test_batch_leaves_the_generate_and_launch_flags_alone():
    from artifex.cli import build_parser

    parser = build_parser()
    for command in ("generate", "launch"):
        args = parser.parse_args([command, "--model", "tiny-t2v-moe", "--prompt", "p", "--output", "o.mp4"])
        assert args.prompt == "p" and str(args.output) == "o.mp4"
    args = parser.parse_args(["batch", "--model", "tiny-t2v-moe", "--prompt", "a", "--prompt", "b"])
    assert args.prompt == ["a", "b"] and args.func.__name__ == "cmd_batch"
