"""The model variants Artifex knows: the four Wan2.2 models and their tiny twins.

A ``ModelSpec`` holds everything that is a fact about a model (architecture, VAE, the
official sampling defaults, sizes it was trained on, where its checkpoint lives) and
nothing about how to run it fast on a given machine; that is the plan's job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from artifex.errors import InvalidRequestError
from artifex.models.schedules import FASTWAN_TIMESTEPS, LIGHTNING_TIMESTEPS


@dataclass(frozen=True)
class TransformerArch:
    """The Wan DiT's shape (``WanTransformer3DModel`` config fields)."""

    dim: int
    heads: int
    layers: int
    ffn: int
    in_channels: int
    out_channels: int
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def diffusers_config(self) -> dict:
        """The ``WanTransformer3DModel`` keyword arguments for this shape."""
        return {
            "patch_size": list(self.patch),
            "num_attention_heads": self.heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn,
            "num_layers": self.layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
        }


@dataclass(frozen=True)
class VaeArch:
    """Which Wan VAE a model decodes with, and its compression."""

    kind: str  # "wan2.1" (4x8x8, z16) or "wan2.2" (4x16x16, z48)
    z_dim: int
    temporal_stride: int
    spatial_stride: int


WAN21_VAE = VaeArch(kind="wan2.1", z_dim=16, temporal_stride=4, spatial_stride=8)
WAN22_VAE = VaeArch(kind="wan2.2", z_dim=48, temporal_stride=4, spatial_stride=16)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # "ti2v", "t2v", "i2v", "s2v"
    description: str
    transformer: TransformerArch
    vae: VaeArch
    experts: int  # 2 for the A14B mixture of experts (high-noise, low-noise)
    steps: int
    shift: float
    # One scale per expert, high-noise expert first (A14B), or a single scale.
    guidance: tuple[float, ...]
    boundary: float | None  # A14B: high-noise expert while t >= boundary * 1000
    fps: int
    frames: int
    sizes: tuple[tuple[int, int], ...]  # (width, height) the model was trained on
    hub_id: str | None
    image: str  # "none", "optional" (TI2V), "required" (I2V, S2V)
    text_len: int = 512
    runnable: bool = True  # False: a spec only, whose pipeline is not built (every variant runs today)
    tiny: bool = False
    extra: dict = field(default_factory=dict)
    # Sampling defaults beyond steps/shift/guidance: the sampler (artifex.engine.samplers), its explicit
    # schedule (timesteps as the model sees them), and the A14B expert switch by step index.
    sampler: str = "unipc"
    timesteps: tuple[float, ...] | None = None
    switch_step: int | None = None
    # A distilled profile runs the weights of ``base`` (same architecture, VAE, text encoder and tiny twin) with
    # its own defaults; ``weights`` says which weights it needs. ``few_step`` names the profile whose schedule
    # ``--preset turbo`` applies to this model.
    base: str | None = None
    weights: str = ""
    few_step: str | None = None
    # S2V: a stricter size multiple than VAE stride x patch (FramePack packs the motion latents in 8x8 patches),
    # and the clip structure: ``clip_frames`` new frames per clip, the last ``motion_frames`` of the video so far
    # VAE-encoded as the next clip's motion input; the video's length follows the audio.
    size_multiple: int | None = None
    clip_frames: int | None = None
    motion_frames: int | None = None

    # -- derived facts ----------------------------------------------------------------
    @property
    def spatial_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride x patch size; S2V: 64)."""
        return max(self.vae.spatial_stride * self.transformer.patch[1], self.size_multiple or 0)

    @property
    def clip_latent_frames(self) -> int:
        """S2V: latent frames each clip denoises (80 new frames -> 20)."""
        return self.clip_frames // self.vae.temporal_stride

    @property
    def motion_latent_frames(self) -> int:
        """S2V: latent frames of the motion input (73 frames -> 19)."""
        return (self.motion_frames - 1) // self.vae.temporal_stride + 1

    def decode_frames(self, frames: int) -> int:
        """Frames one decode produces for a video of ``frames``: all of them, or (S2V) one clip's with the motion
        frames decoded before it."""
        return self.motion_frames + self.clip_frames if self.clip_frames else frames

    def clip_video_frames(self, clips: int) -> int:
        """S2V: frames of a video of ``clips`` clips: the first clip's ``clip_frames - 3`` (its first latent frame
        decodes after the reference image's), then ``clip_frames`` each (77 + 80 (n - 1))."""
        return self.clip_frames - self.vae.temporal_stride + 1 + self.clip_frames * (clips - 1)

    @property
    def architecture(self) -> str:
        """The variant whose checkpoints this one loads: itself, or a distilled profile's base."""
        return self.base or self.name

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class named in model_index.json."""
        return "WanImageToVideoPipeline" if self.task == "i2v" else "WanPipeline"

    @property
    def expand_timesteps(self) -> bool:
        """TI2V conditions on the first frame through per-token timesteps."""
        return self.task == "ti2v"

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one video."""
        v = self.vae
        return (v.z_dim, (frames - 1) // v.temporal_stride + 1, height // v.spatial_stride, width // v.spatial_stride)

    def tokens(self, width: int, height: int, frames: int) -> int:
        """Sequence length of one DiT forward (S2V: of one clip with its motion input, whatever ``frames``)."""
        if self.clip_frames:
            return self.s2v_tokens(width, height)
        _, t, h, w = self.latent_shape(width, height, frames)
        pt, ph, pw = self.transformer.patch
        return (t // pt) * (h // ph) * (w // pw)

    def s2v_tokens(self, width: int, height: int, motion: bool = True) -> int:
        """S2V's sequence: the clip's noisy tokens, the reference image's (one latent frame) and, after the first
        clip, the motion latents' FramePack tokens (1 frame at the patch size, 2 at 2x, 16 at 4x: 1 + 1 + 4 frames'
        worth of 1, 1/4 and 1/16 the tokens)."""
        _, _, h, w = self.latent_shape(width, height, 1)
        per_frame = (h // 2) * (w // 2)
        packed = per_frame + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8) if motion else 0
        return self.clip_latent_frames * per_frame + per_frame + packed

    def flops_per_forward(self, width: int, height: int, frames: int) -> float:
        """Matmul FLOPs of one DiT forward (self-attention projections, FFN, attention).

        2*L*layers*(6*dim^2 + 2*dim*ffn) + 4*L^2*dim*layers, as in DESIGN.md: the text
        cross-attention and the embeddings are left out (under 2% at real shapes).
        """
        a = self.transformer
        n = self.tokens(width, height, frames)
        return 2 * n * a.layers * (6 * a.dim**2 + 2 * a.dim * a.ffn) + 4 * n**2 * a.dim * a.layers

    def guidance_for(self, expert: int) -> float:
        return self.guidance[min(expert, len(self.guidance) - 1)]

    def summary(self) -> dict:
        d = asdict(self)
        d["spatial_multiple"] = self.spatial_multiple
        d["head_dim"] = self.transformer.head_dim
        return d


_A14B = TransformerArch(dim=5120, heads=40, layers=40, ffn=13824, in_channels=16, out_channels=16)
_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))

_REAL = [
    ModelSpec(
        name="ti2v-5b",
        task="ti2v",
        description="Wan2.2 TI2V-5B: text-to-video and text+image-to-video, 720p at 24 fps",
        transformer=TransformerArch(dim=3072, heads=24, layers=30, ffn=14336, in_channels=48, out_channels=48),
        vae=WAN22_VAE,
        experts=1,
        steps=50,
        shift=5.0,
        guidance=(5.0,),
        boundary=None,
        fps=24,
        frames=121,
        sizes=((1280, 704), (704, 1280)),
        hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        image="optional",
    ),
    ModelSpec(
        name="t2v-a14b",
        task="t2v",
        description="Wan2.2 T2V-A14B: text-to-video, two 14B experts (high/low noise)",
        transformer=_A14B,
        vae=WAN21_VAE,
        experts=2,
        steps=40,
        shift=12.0,
        guidance=(4.0, 3.0),
        boundary=0.875,
        fps=16,
        frames=81,
        sizes=_A14B_SIZES,
        hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        image="none",
    ),
    ModelSpec(
        name="i2v-a14b",
        task="i2v",
        description="Wan2.2 I2V-A14B: image-to-video, two 14B experts (high/low noise)",
        transformer=TransformerArch(dim=5120, heads=40, layers=40, ffn=13824, in_channels=36, out_channels=16),
        vae=WAN21_VAE,
        experts=2,
        steps=40,
        shift=5.0,
        guidance=(3.5, 3.5),
        boundary=0.900,
        fps=16,
        frames=81,
        sizes=_A14B_SIZES,
        hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        image="required",
    ),
    ModelSpec(
        name="s2v-14b",
        task="s2v",
        description="Wan2.2 S2V-14B: speech/audio-to-video from a reference image, in clips of 80 frames",
        transformer=_A14B,
        vae=WAN21_VAE,
        experts=1,
        steps=40,
        shift=3.0,
        guidance=(4.5,),
        boundary=None,
        fps=16,
        frames=77,  # one clip; the video's length follows the audio: 77 + 80 (n - 1) frames for n clips
        sizes=((1024, 704), (704, 1024)),  # the official examples' area; any multiple of 64 runs
        hub_id=None,  # published in the official layout only (Wan-AI/Wan2.2-S2V-14B): pass --checkpoint DIR
        image="required",
        extra={"audio": "required", "audio_encoder": "wav2vec2"},
        size_multiple=64,
        clip_frames=80,
        motion_frames=73,
    ),
]


def distilled(base: ModelSpec, name: str, description: str, *, sampler: str, timesteps: tuple[float, ...],
              hub_id: str | None, weights: str, switch_step: int | None = None, shift: float | None = None,
              tiny: bool | None = None) -> ModelSpec:
    """A distilled few-step profile of ``base``: its architecture and checkpoint layout, guidance 1 (one pass per
    step, no unconditional pass), the published schedule and expert switch."""
    return replace(base, name=name, description=description, steps=len(timesteps), sampler=sampler,
                   timesteps=timesteps, switch_step=switch_step, shift=base.shift if shift is None else shift,
                   guidance=(1.0,) * len(base.guidance), hub_id=hub_id, base=base.name, weights=weights,
                   few_step=None, tiny=base.tiny if tiny is None else tiny)


_LIGHTNING_LORA = ("the base checkpoint + a Lightning 4-step LoRA per expert (--lora high=FILE --lora low=FILE; "
                   "lightx2v/Wan2.2-Lightning), or merged weights (--transformer-file/--transformer-2-file, or a "
                   "merged checkpoint directory)")


def _profiles(specs: dict[str, ModelSpec], prefix: str = "", tiny: bool = False) -> list[ModelSpec]:
    """The distilled profiles of the real models (``prefix`` "tiny-": of their tiny twins, for tests)."""
    ti2v, t2v, i2v = (specs[prefix + n] for n in (("ti2v", "t2v-moe", "i2v-moe") if tiny else
                                                   ("ti2v-5b", "t2v-a14b", "i2v-a14b")))
    return [
        distilled(ti2v, f"{ti2v.name}-fastwan", "FastWan2.2-TI2V-5B: the DMD-distilled TI2V-5B, 3 steps, no CFG",
                  sampler="dmd", timesteps=FASTWAN_TIMESTEPS,
                  hub_id=None if tiny else "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
                  weights="the FastWan2.2-TI2V-5B-FullAttn-Diffusers checkpoint (diffusers layout)"),
        distilled(t2v, f"{t2v.name}-lightning", "Wan2.2-Lightning T2V-A14B: 4 Euler steps at shift 5, no CFG, two "
                  "steps per expert", sampler="euler", timesteps=LIGHTNING_TIMESTEPS, switch_step=2, shift=5.0,
                  hub_id=t2v.hub_id, weights=_LIGHTNING_LORA),
        distilled(i2v, f"{i2v.name}-lightning", "Wan2.2-Lightning I2V-A14B: 4 Euler steps at shift 5, no CFG, two "
                  "steps per expert", sampler="euler", timesteps=LIGHTNING_TIMESTEPS, switch_step=2, shift=5.0,
                  hub_id=i2v.hub_id, weights=_LIGHTNING_LORA),
    ]


# Tiny twins: the same classes and wiring at toy sizes, random deterministic weights,
# fast on a CPU. Used by the demo and the tests; built by artifex.models.tiny.
_TINY_T = dict(dim=64, heads=2, layers=2, ffn=128, text_dim=32, freq_dim=32)
_TINY = [
    ModelSpec(
        name="tiny-ti2v",
        task="ti2v",
        description="Toy TI2V-5B twin (Wan2.2 VAE, expanded timesteps) with random weights",
        transformer=TransformerArch(in_channels=48, out_channels=48, **_TINY_T),
        vae=WAN22_VAE,
        experts=1,
        steps=10,
        shift=5.0,
        guidance=(5.0,),
        boundary=None,
        fps=24,
        frames=25,
        sizes=((256, 160), (160, 256)),
        hub_id=None,
        image="optional",
        tiny=True,
    ),
    ModelSpec(
        name="tiny-t2v-moe",
        task="t2v",
        description="Toy T2V-A14B twin (two experts, Wan2.1 VAE) with random weights",
        transformer=TransformerArch(in_channels=16, out_channels=16, **_TINY_T),
        vae=WAN21_VAE,
        experts=2,
        steps=10,
        shift=12.0,
        guidance=(4.0, 3.0),
        boundary=0.875,
        fps=16,
        frames=17,
        sizes=((160, 96), (96, 160), (128, 64), (64, 128)),
        hub_id=None,
        image="none",
        tiny=True,
    ),
    ModelSpec(
        name="tiny-i2v-moe",
        task="i2v",
        description="Toy I2V-A14B twin (two experts, 36 input channels) with random weights",
        transformer=TransformerArch(in_channels=36, out_channels=16, **_TINY_T),
        vae=WAN21_VAE,
        experts=2,
        steps=10,
        shift=5.0,
        guidance=(3.5, 3.5),
        boundary=0.900,
        fps=16,
        frames=17,
        sizes=((160, 96), (96, 160), (128, 64), (64, 128)),
        hub_id=None,
        image="required",
        tiny=True,
    ),
]
# S2V's twin keeps the real clip structure (80 frames a clip, 73 of motion, sizes in 64s) and sampling defaults.
_TINY.append(replace(
    next(m for m in _REAL if m.name == "s2v-14b"), name="tiny-s2v",
    description="Toy S2V-14B twin (audio injectors, FramePack motion, real clip structure) with random weights",
    transformer=TransformerArch(in_channels=16, out_channels=16, **{**_TINY_T, "layers": 3}), steps=4,
    sizes=((128, 64), (64, 128)), tiny=True))

_BASES = {m.name: m for m in _REAL + _TINY}
_PROFILES = _profiles(_BASES) + _profiles(_BASES, "tiny-", tiny=True)
# Each base names its few-step profile (the schedule ``--preset turbo`` applies).
_BASES.update({p.base: replace(_BASES[p.base], few_step=p.name) for p in _PROFILES})
MODELS: dict[str, ModelSpec] = {**_BASES, **{p.name: p for p in _PROFILES}}


def get_model(name: str) -> ModelSpec:
    """The spec for ``name``; an unknown name is an error listing the known ones."""
    key = name.strip().lower()
    if key not in MODELS:
        raise InvalidRequestError("model", f"unknown model {name!r}", MODELS)
    return MODELS[key]
