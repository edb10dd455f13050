"""S2V-14B's generation: a reference image and an audio track -> a talking video, in clips chained to the audio.

The stages (official ``wan/speech2video.py``, re-expressed on the engine's parts):

1. text: the prompt and negative prompt (the engine's text encoder and cache);
2. audio: wav2vec2's hidden states, one vector per 16-fps frame, sliced per clip (``models.s2v.audio``);
   the reference image: resized to cover the size and centre-cropped, VAE-encoded to one latent frame;
   the pose video (optional): its frames from the start, padded with -1 (black) to the clips' length, each
   clip's 80 frames VAE-encoded after a copy of their first (whose latent is dropped) -> 20 latent frames;
3. per clip r (seeded seed + r): denoise 20 latent frames with the engine's sampler and loop, the DiT seeing
   [noisy | reference | motion]; CFG's unconditional pass zeroes the audio;
4. decode [reference (r = 0) or motion (r > 0) | the clip's latents] and keep the clip's frames: 77 for the
   first (its first latent frame is the reference's continuation), 80 for each later; the last 73 frames of the
   video so far are VAE-encoded to the next clip's 19 motion latent frames;
5. the mp4 (H.264 + the audio as AAC, cut or padded with silence to the video's length) and its sidecar.

Every clip's frames go to the mp4 encoder thread as soon as they are decoded, so encoding overlaps the next
clip's denoising. The engine runs one generation at a time (``_clip`` holds the running clip's conditioning
for ``guided``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from artifex.engine.outputs import build_sidecar, default_output, write_json
from artifex.engine.pipeline import (
    Engine,
    GenerationJob,
    GenerationResult,
    ProgressEvent,
    image_to_tensor,
    matmul_precision,
)
from artifex.engine.request import GenerationRequest
from artifex.engine.video import AudioTrack, Mp4Stream, to_uint8_frames
from artifex.errors import NotSupportedYetError
from artifex.models.s2v import audio as s2v_audio

log = logging.getLogger("artifex")


@dataclass
class ClipInputs:
    """What the DiT sees besides the noisy latents and the text, for one clip (the engine's dtype and device)."""

    audio: torch.Tensor  # (1, layers, hidden, 4 * F) this clip's wav2vec2 features
    silent: torch.Tensor  # the same shape, zeros: CFG's unconditional audio
    ref: torch.Tensor  # (1, z, 1, h, w) the reference image's latent
    motion: torch.Tensor | None  # (1, z, 19, h, w) the last 73 frames' latents; None for the first clip
    pose: torch.Tensor | None  # (1, z, F, h, w) or None


def _lap(job: GenerationJob, name: str) -> float:
    """Add the time since the last mark to stage ``name`` (a stage that runs once per clip adds up)."""
    now = time.perf_counter()
    seconds = now - (job._last or job.t0)
    job.timings[name] = round(job.timings.get(name, 0.0) + seconds, 4)
    job._last = now
    return seconds


class S2VEngine(Engine):
    """The engine for S2V-14B (and its tiny twin): ``generate`` chains clips; the rest is ``Engine``'s."""

    _clip: ClipInputs | None = None

    @torch.no_grad()
    def generate(self, request: GenerationRequest, on_event=None, output_dir: str | Path | None = None
                 ) -> GenerationResult:
        if self.layout.predict is not None or not self.layout.writes_output:
            raise NotSupportedYetError(f"{self.spec.name} runs in one process on one device; parallel layouts "
                                       "(CFG-parallel, Ulysses, split decode) do not run S2V yet")
        if self.light_decoder is not None:
            raise NotSupportedYetError(f"{self.spec.name}: decoder=light is not built for S2V (its motion frames "
                                       "are re-encoded from the decoded video); use the full decoder")
        job = self.prepare(request, on_event)
        guard = self.memory_guard
        job.memory = guard.fit(job)
        guard.start()
        s, spec = job.settings, job.spec
        with matmul_precision(self.plan.tf32):
            # 1. Text.
            self.encode_prompts(job)
            guard.stage_peak(job, "encode_text")

            # 2. Audio features for every clip, the reference latent, the pose video's pixels (encoded per clip).
            job.emit(ProgressEvent("encode_audio", 0, 1, job.elapsed()))
            features = self.audio_features(s.audio, s.clips)  # (1, layers, hidden, clips * 80)
            track = AudioTrack(*s2v_audio.audio_for_mux(s.audio))  # the mp4's audio, at the file's own rate
            _lap(job, "encode_audio")
            job.emit(ProgressEvent("encode_image", 0, 1, job.elapsed()))
            ref = self.encode_video(image_to_tensor(job.image, s.width, s.height).unsqueeze(2))  # (1, z, 1, h, w)
            pose = self.pose_pixels(s) if s.pose_video else None  # (1, 3, clips * 80, H, W) or None
            _lap(job, "encode_image")

            out = Mp4Stream(self._output(s, output_dir), s.fps, background=True, audio=track)
            try:
                clips = self._clips(job, features, ref, pose, out)
                start = time.perf_counter()
                out.close()
            except BaseException:
                out.abort()
                raise
        job.timings["write"] = round(time.perf_counter() - start, 4)  # what was left to encode, and the audio
        job.sidecar_extra["s2v"] = {"clips": clips, "audio_seconds": s.audio_seconds, "frames": s.frames,
                                    "clip_frames": spec.clip_frames, "motion_frames": spec.motion_frames,
                                    "pose_video": s.pose_video}
        job.sidecar_extra["audio"] = {"codec": "aac", "sample_rate": out.audio.rate,
                                      "channels": int(out.audio.samples.shape[0]),
                                      "seconds": round(out.frames / s.fps, 4)}
        job.written(out.path)
        job.timings["total"] = round(job.elapsed(), 4)
        result = self._result(job, out.path)
        result.sidecar = build_sidecar(self, job.request, result, {**self.layout.sidecar, **job.sidecar_extra})
        write_json(result.sidecar_path, result.sidecar)
        job.emit(ProgressEvent("done", 1, 1, job.timings["total"]))
        return result

    def _output(self, s, output_dir) -> Path:
        return Path(s.output) if s.output else default_output(output_dir, self.spec.name, s.seed)

    def _clips(self, job: GenerationJob, features: torch.Tensor, ref: torch.Tensor, pose: torch.Tensor | None,
               out: Mp4Stream) -> list[dict]:
        """3. and 4. for every clip: denoise, decode, hand the frames to ``out``, encode the next motion input."""
        s, spec, guard = job.settings, job.spec, self.memory_guard
        outer, motion, report = job.emit, None, []
        for r in range(s.clips):
            job.emit = _clip_events(outer, r, s.clips, s.steps)
            clip = {"clip": r}
            audio = s2v_audio.clip_features(features, r, spec.clip_frames).to(self.device, self.dtype)
            self._clip = ClipInputs(
                audio=audio, silent=torch.zeros_like(audio), ref=ref.to(self.dtype),
                motion=None if motion is None else motion.to(self.dtype),
                pose=None if pose is None else self.encode_pose(pose, r).to(self.dtype))
            if pose is not None:
                clip["encode_pose_s"] = round(_lap(job, "encode_pose"), 4)
            job.noise = torch.randn((1, *self._clip_latent_shape(s)),
                                    generator=torch.Generator("cpu").manual_seed(s.seed + r),
                                    dtype=torch.float32).to(self.device)

            def denoise():
                self.start_denoising(job)
                self.denoise(job)

            try:
                guard.stepping_down("denoise", denoise, job)
            finally:
                self._clip = None
            clip["denoise_s"] = round(_lap(job, "denoise"), 4)
            guard.stage_peak(job, "denoise")

            # 4. decode after the reference (first clip) or the motion latents; keep the clip's own frames
            job.emit(ProgressEvent("decode", 0, 1, job.elapsed()))
            self.placement.park_experts()
            stride = spec.vae.temporal_stride
            if motion is None:  # 21 latent frames -> 81: the reference's frame and the 3 after it go (77 kept)
                prefix, drop = ref, stride
            else:  # 19 + 20 latent frames -> 153: the 73 motion frames go (80 kept)
                prefix, drop = motion, (motion.shape[2] - 1) * stride + 1
            both = torch.cat([prefix, job.latents], dim=2)
            pixels = guard.stepping_down("decode", functools.partial(self.decode, both), job)
            pixels = pixels[:, :, drop:]  # (1, 3, 77 or 80, H, W)
            out.add(to_uint8_frames(pixels))
            clip["frames"] = pixels.shape[2]
            clip["decode_s"] = round(_lap(job, "decode"), 4)
            guard.stage_peak(job, "decode")
            if r + 1 < s.clips:  # the next clip's motion input: the video's last 73 frames
                job.emit(ProgressEvent("encode_motion", 0, 1, job.elapsed()))
                motion = self.encode_video(pixels[:, :, -spec.motion_frames:])  # (1, z, 19, h, w)
                clip["encode_motion_s"] = round(_lap(job, "encode_motion"), 4)
            report.append(clip)
            del pixels
        job.emit = outer
        return report

    def _clip_latent_shape(self, s) -> tuple[int, int, int, int]:
        z, _, h, w = self.spec.latent_shape(s.width, s.height, 1)
        return z, self.spec.clip_latent_frames, h, w

    # -- 2. the conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def audio_features(self, path: str, clips: int) -> torch.Tensor:
        """wav2vec2's features of ``path`` per video frame: (1, layers, hidden, clips * clip_frames) on the CPU."""
        samples = s2v_audio.load_audio(path)
        with self.placement.audio_encoder() as model:
            feats = s2v_audio.wav2vec_hidden_states(samples, model, self.c.feature_extractor,
                                                    device=self._device_of(model))
        features, available = s2v_audio.bucket_per_video_frame(feats.cpu(), self.spec.clip_frames)
        if available < clips:  # the request's check counts clips from the sample count with the same formula
            raise RuntimeError(f"the audio makes {available} clips of features, the request planned {clips}")
        return features[..., :clips * self.spec.clip_frames]

    @staticmethod
    def _device_of(model: torch.nn.Module) -> torch.device:
        return next(model.parameters()).device

    def pose_pixels(self, s) -> torch.Tensor:
        """The pose video's first clips * 80 frames at 16 fps, covering (width, height), in [-1, 1], padded with
        -1 frames: (1, 3, clips * 80, H, W) on the CPU."""
        n = s.clips * self.spec.clip_frames
        frames = s2v_audio.open_pose_video(s.pose_video, n, s.fps)
        video = torch.cat([image_to_tensor(Image.fromarray(f), s.width, s.height) for f in frames])  # (T, 3, H, W)
        video = video.permute(1, 0, 2, 3).unsqueeze(0)
        if video.shape[2] < n:
            video = torch.cat([video, -video.new_ones(1, 3, n - video.shape[2], s.height, s.width)], dim=2)
        return video

    @torch.no_grad()
    def encode_pose(self, pose: torch.Tensor, clip: int) -> torch.Tensor:
        """Clip ``clip``'s pose latents (1, z, 20, h, w): its 80 frames after a copy of the first, encoded, the
        first latent frame dropped."""
        n = self.spec.clip_frames
        frames = pose[:, :, clip * n:(clip + 1) * n]
        return self.encode_video(torch.cat([frames[:, :, :1], frames], dim=2))[:, :, 1:]

    # -- 3. the DiT's prediction with the clip's conditioning ---------------------------------------------
    def guided(self, model, x, timestep, cond, uncond, guidance: float | None) -> torch.Tensor:
        """The flow prediction of one step of the running clip: CFG's unconditional pass has the negative prompt
        and zeroed audio; in two passes (sharing the first block's self-attention) or one batch of two."""
        from artifex.engine.dit import share_first_block

        c = self._clip
        if c is None:
            raise RuntimeError("S2V's DiT runs inside a clip (S2VEngine.generate)")

        def run(x, t, text, audio, n=1):
            def rep(v):  # the clip's conditioning for each of the batch's n samples
                return v if v is None or n == 1 else v.expand(n, *v.shape[1:])

            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, audio_features=audio,
                         ref_latents=rep(c.ref), motion_latents=rep(c.motion), pose_latents=rep(c.pose)).float()

        if guidance is None:
            return run(x, timestep, cond, c.audio)
        if self.plan.cfg_batch == 2:
            pos, neg = run(torch.cat([x, x]), torch.cat([timestep, timestep]), self._pair(model, cond, uncond),
                           torch.cat([c.audio, c.silent]), n=2).chunk(2)
        else:
            with share_first_block(model):
                pos = run(x, timestep, cond, c.audio)
                neg = run(x, timestep, uncond, c.silent)
        return neg + guidance * (pos - neg)


def _clip_events(emit, clip: int, clips: int, steps: int):
    """Events of clip ``clip`` with the clip named and the denoising steps counted over all clips."""

    def on_event(e: ProgressEvent) -> None:
        if e.stage == "denoise":
            e = dataclasses.replace(e, step=clip * steps + e.step, total=clips * steps)
        emit(dataclasses.replace(e, clip=clip, clips=clips))

    return on_event


__all__ = ["ClipInputs", "S2VEngine"]
