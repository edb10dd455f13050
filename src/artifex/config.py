"""One validated configuration: ``OptimizationConfig``.

It carries every knob of the original setup guide, under the guide's names, and says
for each what it does here. A field is either wired to the mechanism that acts on it or
refused with a clear "not supported yet"; nothing is silently ignored.

Configuration is data: it prints as TOML, hashes to a stable key (for compile and
autotune caches), and merges in one order: defaults < preset < config file < CLI flags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from artifex.errors import InvalidRequestError

_UNITS = {"": 2**30, "g": 2**30, "gb": 2**30, "gib": 2**30, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 2**40,
          "tb": 2**40, "tib": 2**40}


def parse_budget(text: str | int | float | None) -> int | None:
    """'24GB', '24 GiB', '16000MB', '0.5TB' or a number of GiB -> bytes. GB and GiB both mean 2^30."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidRequestError("vram_budget", f"cannot read {text!r} as an amount of memory",
                                      "a number with GB, GiB, MB, MiB or TB, e.g. 24GB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):  # nan, inf, or more digits than a float holds
        raise InvalidRequestError("vram_budget", f"must be a finite amount, got {text!r}",
                                  "a number with GB, GiB, MB, MiB or TB, e.g. 24GB")
    if value <= 0:
        raise InvalidRequestError("vram_budget", f"must be positive, got {text!r}")
    return int(value * _UNITS[unit])

log = logging.getLogger("artifex")

PRECISIONS = ("bf16", "fp16", "fp32")
VAE_PRECISIONS = ("auto", "fp32", "bf16")
EXPERT_RESIDENCY = ("auto", "resident", "swap")
MEMORY_TIERS = ("auto", "resident", "text_offload", "expert_swap", "model_offload", "block_offload", "leaf_offload")
ATTENTION_CHOICES = ("auto", "fa3", "fa3-fp8", "fa4", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa",
                     "flex", "sage", "xformers", "sliced", "sdpa-math")


# Integer fields and their ranges (the upper ends only keep nonsense out: a tile wider than any frame the position
# tables allow, more query chunks or fp8-free steps than a run has, more passes per batch than a step makes).
_INT_RANGES = (("max_batch_size", 1, 64), ("attention_slicing", 0, 1024), ("vae_tile_size", 0, 16384),
               ("fp8_bf16_steps", 0, 1000), ("text_cache_size", 0, 100_000),
               ("light_decoder_check", 0, 64))
DECODERS = ("full", "light")
LIGHT_DECODER_LATENTS = ("auto", "normalized", "raw")
LIGHT_DECODER_SUFFIXES = (".pth", ".pt", ".safetensors")


def _f(default: Any, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class OptimizationConfig:
    """How to run a model on this machine. Field docs become the CLI help."""

    precision: str = _f(
        "bf16",
        "compute precision of the DiT and text encoder (the guide's use_fp16); the VAE has vae_precision",
        PRECISIONS,
    )
    vae_precision: str = _f(
        "auto", "VAE precision: auto (bf16 on CUDA, fp32 on a CPU), fp32 (the reference) or bf16 (less decode time "
        "and memory: the TI2V-5B 1280x704x121 decode measured 52.8 dB PSNR against fp32 on an H200, below 8-bit "
        "rounding; `artifex bench pipeline` reports the error)", VAE_PRECISIONS,
    )
    tf32: bool = _f(True, "allow TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer)")
    device: str = _f("auto", "where to run: auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    attention: str = _f(
        "auto",
        "attention backend: auto (fastest verified kernel on this GPU, chosen once per shape and cached) or one of "
        "the names `artifex doctor` lists; fa3-fp8 (FlashAttention-3 on e4m3 q/k/v, Hopper) is faster but changes "
        "the output by a few percent, so auto never picks it: name it to use it",
        ATTENTION_CHOICES,
    )
    use_flash_attention: bool = _f(
        False, "prefer FlashAttention-3, falling back to FA2, FA4, xFormers, then the fastest other verified kernel"
    )
    use_xformers: bool = _f(False, "prefer xFormers attention when it is installed and verified")
    attention_slicing: int = _f(
        0, "split attention queries into N chunks (the 'sliced' backend) to cut its memory; 0 = off"
    )
    flash_attention_scale: float | None = _f(
        None, "softmax scale override; default 1/sqrt(head_dim). Changes the model's output"
    )
    flash_attention_causal: bool = _f(False, "causal attention mask; Wan is bidirectional, so this changes the output")
    flash_attention_dropout: float = _f(
        0.0, "attention dropout probability (only kernels that support dropout are used); inference uses 0"
    )
    use_channels_last: bool = _f(
        False, "run the VAE in channels_last_3d memory format on any device; with fast_vae on CUDA it is on anyway "
        "(the TI2V-5B 720p bf16 decode on an H100: 4.27 s against 4.84 s channels-first, benchmarks/results/"
        "kernels-vae-h100.json; with diffusers' VAE pieces it measured no gain: pipeline-h200.json)"
    )
    use_torch_compile: bool = _f(False, "torch.compile the repeated transformer blocks (regional compile)")
    fast_dit: bool = _f(
        True, "Artifex's DiT forward: timestep modulation once per distinct timestep, cross-attention text K/V "
        "once per request, RoPE tables once per shape, fused QK RMSNorm + RoPE, one fused QKV projection (the "
        "same model; false = diffusers' forward)"
    )
    fast_vae: bool = _f(
        True, "Artifex's VAE pieces: each RMS norm + SiLU as one kernel, the causal convolutions' spatial padding "
        "inside cuDNN, nearest upsampling without an fp32 round trip, channels_last_3d on CUDA (diffusers' VAE "
        "pieces otherwise; the same computation, rounded in another order)"
    )
    offload_to_cpu: bool = _f(
        False, "keep models in CPU memory and move each to the GPU only while it runs (model-level offload)"
    )
    experts: str = _f(
        "auto",
        "A14B expert placement: resident (both on the GPU), swap (one at a time, swapped once at the "
        "MoE switch), auto (resident when memory allows)",
        EXPERT_RESIDENCY,
    )
    memory_tier: str = _f(
        "auto",
        "where models live: resident, text_offload, expert_swap, model_offload, block_offload, leaf_offload "
        "(fastest to leanest); auto = the fastest the memory planner fits in vram_budget",
        MEMORY_TIERS,
    )
    vram_budget: str | None = _f(
        None, "device memory to plan for and enforce, e.g. 24GB (GB = GiB); default: what the GPU has free"
    )
    fp8_weights: bool = _f(False, "store the DiT's linear weights in float8 and compute in precision")
    fp8: str = _f(
        "off", "fp8 compute (Hopper/Ada): gemm = the DiT blocks' linear layers as e4m3 x e4m3 matmuls (per-token and "
        "per-channel scales); all = also self-attention through FlashAttention-3 on e4m3 q/k/v (fa3-fp8; the "
        "cross-attention to the 512 text keys stays bf16: no faster in fp8). Changes the output by a few "
        "percent: each sidecar holds the error measured against bf16 at load", ("off", "gemm", "all"),
    )
    fp8_keep: str = _f(
        "", "with fp8 compute: comma-separated glob patterns of DiT block linear layers kept in the compute "
        "precision, e.g. 'blocks.0.*,blocks.29.*' (the first and last block of TI2V-5B) or '*.ffn.net.2'; "
        "names as in the model: blocks.N.attn1.to_q, blocks.N.attn2.to_out.0, blocks.N.ffn.net.0.proj, ..."
    )
    fp8_bf16_steps: int = _f(
        0, "with fp8 compute: the first N and the last N denoising steps run without it, in the compute precision "
        "(activations unquantized, the plain attention kernel; the weights keep their e4m3 rounding). TI2V-5B 720p, "
        "H100, N=2 of 50 steps: the final latents 0.0179 from bf16's instead of 0.0192, for 1.9 s more "
        "(benchmarks/results/pipeline-h100-fp8-steps.json)"
    )
    vae_slicing: bool = _f(False, "decode a batch of videos one video at a time")
    vae_tiling: bool = _f(False, "decode the VAE in spatial tiles to cut its peak memory")
    vae_tile_size: int = _f(
        0, "VAE tile edge in pixels when tiling (a multiple of 32, at least 64; tiles overlap by a quarter); "
        "smaller tiles use less memory and blend more seams; 0 = diffusers' default (256)"
    )
    decoder: str = _f(
        "full", "latents to pixels: full (the model's Wan VAE, the reference) or light (a TAEHV tiny decoder read "
        "from light_decoder, its weights not shipped: much less decode time, less fine detail; each sidecar "
        "reports its PSNR and max error against the full VAE on the first light_decoder_check latent frames)",
        DECODERS,
    )
    light_decoder: str = _f(
        "", "with decoder=light: a local TAEHV weight file (.pth or .safetensors) for the model's VAE: taew2_2 "
        "(or taew2_2_super) for TI2V-5B's Wan2.2 VAE, taew2_1 for the A14B models' Wan2.1 VAE, from "
        "github.com/madebyollin/taehv; LightX2V's lighttaew2_1 / lighttaew2_2 load too"
    )
    light_decoder_latents: str = _f(
        "auto", "what the light decoder reads: normalized (the DiT's latents, as madebyollin's taew* files do), "
        "raw (un-normalized with the VAE's latents_mean/std, as LightX2V's lighttae* files do), auto (raw when the "
        "file's name starts with lighttae, else normalized)", LIGHT_DECODER_LATENTS,
    )
    light_decoder_check: int = _f(
        2, "with decoder=light: the first N latent frames are also decoded by the full VAE (1 + 4 (N - 1) frames; "
        "the VAE is causal, so these are the full decode's own first frames) to measure the light decode's error "
        "for the sidecar; costs about N / T' of a full decode (T' latent frames); 0 = no check"
    )
    max_batch_size: int = _f(
        1, "most DiT passes run as one batch; 2 runs CFG's conditional and unconditional passes together"
    )
    text_cache_size: int = _f(
        64, "prompt embeddings kept in host memory so that a repeated prompt or negative prompt skips the text "
        "encoder (umt5-xxl: 4 MiB each; at most 512 MiB in all, least recently used out first); 0 = off"
    )
    lora: str = _f(
        "", "LoRAs fused into the DiT weights at load (no cost per step): comma-separated [high=|low=]FILE[:SCALE], "
        "a local .safetensors in the diffusers/PEFT, original-Wan (diffusion_model.*, LightX2V / ComfyUI) or "
        "musubi/Kohya (lora_unet_*) format; no prefix = every expert, high=/low= one A14B expert; scale 1 by "
        "default. Every key must match a layer (else an error names the keys); DoRA, LoHa, LoKr are refused"
    )
    gradient_checkpointing: bool = _f(
        False, "accepted for compatibility with the guide; has no effect at inference (a warning says so)"
    )

    # -- validation --------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise InvalidRequestError(f.name, f"unknown value {value!r}", choices)
            kind = str(f.type)
            unset = value is None and kind.endswith("None")
            if kind.startswith("bool") and not isinstance(value, bool) and not unset:
                raise InvalidRequestError(f.name, f"must be true or false, got {value!r}")
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequestError(f.name, f"must be an integer, got {value!r}")
            if kind.startswith("str") and value is not None and not isinstance(value, str):
                raise InvalidRequestError(f.name, f"must be a string, got {value!r}")
            if kind.startswith("float") and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidRequestError(f.name, f"must be a number, got {value!r}")
                try:
                    finite = math.isfinite(value)
                except OverflowError:  # an integer too large for a float
                    finite = False
                if not finite:  # TOML writes nan and inf
                    raise InvalidRequestError(f.name, f"must be a finite number, got {value!r}")
        for name, lo, hi in _INT_RANGES:
            value = getattr(self, name)
            if value < lo:
                raise InvalidRequestError(name, f"must be >= {lo}, got {value}", f"{lo}..{hi}")
            if value > hi:
                raise InvalidRequestError(name, f"must be at most {hi}, got {value}", f"{lo}..{hi}")
        if self.vae_tile_size and (self.vae_tile_size < 64 or self.vae_tile_size % 32):
            raise InvalidRequestError("vae_tile_size", f"must be 0 (default tiles) or a multiple of 32 that is at "
                                      f"least 64, got {self.vae_tile_size}", "0, 64, 96, 128, ... (pixels)")
        if not (0.0 <= self.flash_attention_dropout < 1.0):
            raise InvalidRequestError("flash_attention_dropout",
                                      f"must be in [0, 1), got {self.flash_attention_dropout}", "0 <= p < 1")
        if self.flash_attention_scale is not None and not self.flash_attention_scale > 0:
            raise InvalidRequestError("flash_attention_scale", f"must be > 0, got {self.flash_attention_scale}",
                                      "a positive number (default: 1/sqrt(head_dim))")
        if self.vram_budget is not None:
            parse_budget(self.vram_budget)
        if self.lora:
            from artifex.models.lora import parse_lora_specs

            parse_lora_specs(self.lora)
        if self.fp8 != "off" and self.fp8_weights:
            raise InvalidRequestError("fp8", "fp8 compute already stores e4m3 weights; drop fp8_weights")
        if self.fp8_keep and self.fp8 == "off":
            raise InvalidRequestError("fp8_keep", "keeps layers out of fp8 compute, which is off", ["gemm", "all"])
        if self.fp8_bf16_steps and self.fp8 == "off":
            raise InvalidRequestError("fp8_bf16_steps", "keeps steps out of fp8 compute, which is off",
                                      ["gemm", "all"])
        if self.fp8 == "all" and self.attention not in ("auto", "fa3-fp8"):
            raise InvalidRequestError("fp8", f"fp8=all uses fa3-fp8 attention; attention={self.attention!r} "
                                      "conflicts", ["gemm", "off"])
        if self.decoder == "light":
            if not self.light_decoder.strip():
                raise InvalidRequestError("light_decoder", "decoder=light needs a TAEHV weight file",
                                          "a local .pth or .safetensors path (taew2_2 for the Wan2.2 VAE, taew2_1 "
                                          "for Wan2.1: github.com/madebyollin/taehv)")
            if not self.light_decoder.strip().lower().endswith(LIGHT_DECODER_SUFFIXES):
                raise InvalidRequestError("light_decoder", f"{self.light_decoder!r} is not a TAEHV weight file",
                                          LIGHT_DECODER_SUFFIXES)
        else:
            if self.light_decoder:
                raise InvalidRequestError("light_decoder", "names a light decoder, but decoder=full decodes with "
                                          "the VAE", ["set decoder=light", "leave light_decoder empty"])
            if self.light_decoder_latents != "auto":
                raise InvalidRequestError("light_decoder_latents", "applies to the light decoder, but "
                                          "decoder=full", ["set decoder=light", "auto"])
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InvalidRequestError("device", f"unknown device {dev!r}", "auto, cpu, cuda, cuda:N")

    def check_supported(self) -> list[str]:
        """Warnings for fields that change the model's output or have no effect."""
        warnings = []
        if self.gradient_checkpointing:
            warnings.append("gradient_checkpointing has no effect at inference (no gradients are computed)")
        if self.flash_attention_causal:
            warnings.append("flash_attention_causal: Wan was trained with bidirectional attention; a causal mask "
                            "changes what it generates")
        if self.flash_attention_scale is not None:
            warnings.append(f"flash_attention_scale={self.flash_attention_scale}: differs from the trained "
                            "1/sqrt(head_dim) unless equal to it")
        if self.flash_attention_dropout:
            warnings.append("flash_attention_dropout > 0 makes inference random beyond the seed")
        if self.attention == "fa3-fp8" or self.fp8 == "all":
            warnings.append("attention=fa3-fp8: q/k/v are rounded to float8 e4m3, so the output differs from bf16 "
                            "attention by a few percent")
        return warnings

    # -- data in and out ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """A short stable key of every field (for caches keyed by configuration)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, allow_nan=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_toml(self) -> str:
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                lines.append(f"# {f.name} =   # {f.metadata['help']}")
                continue
            lines.append(f"{f.name} = {json.dumps(v, allow_nan=False)}")
        return "\n".join(lines) + "\n"

    def requested_tier(self) -> str:
        """The memory tier the config asks for ("auto" unless a field names one)."""
        if self.memory_tier != "auto":
            return self.memory_tier
        if self.offload_to_cpu:
            return "model_offload"
        return {"swap": "expert_swap", "resident": "resident"}.get(self.experts, "auto")

    def merged(self, overrides: dict[str, Any]) -> OptimizationConfig:
        """A copy with ``overrides`` applied; unknown keys are an error naming the allowed ones."""
        known = {f.name for f in fields(self)}
        overrides = dict(overrides)
        if "use_fp16" in overrides:  # the setup guide's name for the precision switch
            overrides["precision"] = "fp16" if _as_bool("use_fp16", overrides.pop("use_fp16")) else "fp32"
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidRequestError(unknown[0], "unknown configuration field", sorted(known | {"use_fp16"}))
        return replace(self, **overrides)

    @classmethod
    def from_toml(cls, path: str | Path, base: OptimizationConfig | None = None) -> OptimizationConfig:
        """Read a TOML file: top-level keys, or the same keys under an ``[optimization]`` table."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidRequestError("config", f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidRequestError("config", f"{path} is not valid TOML: {e}") from None
        if "optimization" in data:
            data = data["optimization"]
        return (base or cls()).merged(data)

    @classmethod
    def field_help(cls) -> dict[str, tuple[Any, str, tuple | None, type]]:
        """name -> (default, help, choices, value type) for building CLI flags."""
        kinds = {"bool": bool, "int": int, "str": str, "float": float}
        return {f.name: (f.default, f.metadata["help"], f.metadata.get("choices"),
                         kinds[str(f.type).split(" |")[0]]) for f in fields(cls)}


def resolve_vae_precision(value: str, device_type: str) -> tuple[str, str | None]:
    """(the VAE precision that runs, the reason when ``auto`` chose it): auto is bf16 on CUDA, fp32 elsewhere."""
    if value not in VAE_PRECISIONS:
        raise InvalidRequestError("vae_precision", f"unknown value {value!r}", VAE_PRECISIONS)
    if value != "auto":
        return value, None
    if device_type == "cuda":
        return "bf16", ("vae_precision auto: bf16 on CUDA (TI2V-5B 1280x704x121 decoded 52.8 dB PSNR against fp32 "
                        "on an H200, below 8-bit rounding, in about half the time and memory); vae_precision=fp32 "
                        "for the reference decode")
    return "fp32", "vae_precision auto: fp32 on a CPU (bf16 convolutions are slow there)"


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidRequestError(name, f"must be true or false, got {value!r}")
