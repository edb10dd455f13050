"""Find, check and load a Wan2.2 checkpoint in the diffusers layout (the official layout: ``official.py``).

Sources, in the order tried: a tiny model (built on first use), a local directory, a
Hugging Face hub id (downloaded when the network exists). Before any weights are read
the checkpoint is checked against the chosen variant: folders, configs, every
safetensors shard's header and length. Every problem is a ``CheckpointError`` naming
the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifex.errors import CheckpointError
from artifex.models import fast_read
from artifex.models.registry import MODELS, ModelSpec

log = logging.getLogger("artifex")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# component folder -> (weights stem, fields of config.json that must match the spec)
PINNED = "pinned"  # a ``devices`` value of load_components: pinned host memory (an offload tier's CPU home)
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_TRANSFORMERS_WEIGHTS = "model"


@dataclass
class CheckpointInfo:
    """What the checks learnt about a checkpoint before loading it."""

    path: Path
    weight_bytes: dict[str, int]
    boundary_ratio: float | None
    warnings: list[str] = field(default_factory=list)
    layout: str = "diffusers"  # or "official" (artifex.models.official: converted in memory at load)
    from_registry: list[str] = field(default_factory=list)  # settings the checkpoint lacks, taken from the registry


@dataclass
class Components:
    """The loaded parts of a pipeline: plain modules, each on the device it was read to (``load_components``'s
    ``devices``; the CPU by default)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    experts: list[torch.nn.Module]  # [high-noise, low-noise] for A14B, [transformer] otherwise
    info: CheckpointInfo
    timings: dict[str, float] = field(default_factory=dict)  # seconds: checkpoint_check, read.<component>
    audio_encoder: Any = None  # S2V: the wav2vec2 model (Wav2Vec2ForCTC), fp32
    feature_extractor: Any = None  # S2V: its feature extractor (normalisation at 16 kHz)


# -- locating ----------------------------------------------------------------------------
def resolve_checkpoint(spec: ModelSpec, source: str | None, cache_dir: Path) -> Path:
    """A local directory holding the checkpoint of ``spec``."""
    if source is None:
        if spec.tiny:
            from artifex.models.tiny import ensure_tiny_checkpoint

            return ensure_tiny_checkpoint(MODELS[spec.architecture], cache_dir)  # a profile: its base's
        if spec.hub_id is None:
            raise CheckpointError(spec.name, "no published diffusers checkpoint; pass --checkpoint DIR")
        source = spec.hub_id
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(path, "is a file; a checkpoint is a directory (diffusers or official Wan2.2 layout) "
                                        "(use --transformer-file/--vae-file for single files)")
        return path
    if _HUB_ID.match(source):
        return _download(source)
    raise CheckpointError(path, "does not exist (expected a checkpoint directory, diffusers or official Wan2.2 "
                                "layout, or a hub id like "
                                f"{spec.hub_id or 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'})")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.pth",
                                                               "tokenizer/*", "*.index.json"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(repo_id, f"could not download from the Hugging Face hub ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else 'no details'}); download it "
                                       "elsewhere and pass the local directory with --checkpoint") from None


# -- checking ----------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(path, "is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "is not a JSON object")
    return data


def check_safetensors(path: Path) -> int:
    """Validate a safetensors file's header against its length; return its tensor bytes."""
    start, _ = fast_read.read_header(path)
    return path.stat().st_size - start


def weight_files(folder: Path, stem: str) -> list[Path]:
    """A component folder's safetensors files: ``<stem>.safetensors``, else the shards its index names."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index, "has no weight_map")
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    raise CheckpointError(folder, f"holds no weights: expected {single.name} or {index.name}")


def component_weight_files(folder: Path) -> list[Path]:
    """``weight_files`` of a diffusers-layout component folder, by its role: the text encoder's is a transformers
    model (``model``), the others diffusers models (``diffusion_pytorch_model``)."""
    return weight_files(folder, _TRANSFORMERS_WEIGHTS if folder.name == "text_encoder" else _DIFFUSERS_WEIGHTS)


def _check_weights(folder: Path, stem: str) -> int:
    """Check the weights of one component folder (single file or index + shards)."""
    return sum(check_safetensors(f) for f in weight_files(folder, stem))


_ARCH_KEYS = ("in_channels", "out_channels", "num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim",
              "text_dim")


def _which_model(spec: ModelSpec, index: dict, cfg: dict) -> str:
    """Name the other known variants this checkpoint matches (for error hints): the same pipeline class, the same
    number of experts (transformers the index declares) and the same transformer shape on every checked field."""
    experts = sum(1 for role in ("transformer", "transformer_2") if _declared(index, role))
    names = []
    for other in MODELS.values():
        want = other.transformer.diffusers_config()
        if other.name != spec.name and other.base is None and other.pipeline_class == index.get("_class_name") \
                and other.experts == experts and all(cfg.get(k) == want[k] for k in _ARCH_KEYS):
            names.append(other.name)
    if names:
        return f" (it looks like {' or '.join(names)})"
    return f" (no known variant has {experts} transformer{'s' if experts != 1 else ''} of this shape)"


def check_checkpoint(spec: ModelSpec, path: Path) -> CheckpointInfo:
    """Check that ``path`` holds a loadable checkpoint of ``spec``, reading headers only."""
    from artifex.models import official

    if official.detect_layout(path) == "official":
        return official.check_official(spec, path)
    index = read_json(path / "model_index.json")
    warnings: list[str] = []
    cls = index.get("_class_name")
    if cls != spec.pipeline_class:
        raise CheckpointError(path / "model_index.json",
                              f"_class_name is {cls!r}; {spec.name} checkpoints use {spec.pipeline_class!r}")
    roles = ["transformer", "transformer_2"][: spec.experts]
    if spec.experts == 1 and _declared(index, "transformer_2"):
        raise CheckpointError(path / "model_index.json",
                              f"declares transformer_2 (two experts); {spec.name} has one transformer")
    weight_bytes: dict[str, int] = {}
    for role in roles:
        if not _declared(index, role):
            raise CheckpointError(path / "model_index.json", f"does not declare {role}; {spec.name} needs it")
        folder = path / role
        if not folder.is_dir():
            raise CheckpointError(folder, f"is missing ({spec.name} needs {', '.join(roles)})")
        cfg = read_json(folder / "config.json")
        want = spec.transformer.diffusers_config()
        for key in _ARCH_KEYS:
            if cfg.get(key) != want[key]:
                raise CheckpointError(folder / "config.json",
                                      f"{key} is {cfg.get(key)}, but {spec.name} has {want[key]}: this is not a "
                                      f"{spec.name} checkpoint{_which_model(spec, index, cfg)}")
        weight_bytes[role] = _check_weights(folder, _DIFFUSERS_WEIGHTS)
    vae_cfg = read_json(path / "vae" / "config.json")
    if vae_cfg.get("z_dim") != spec.vae.z_dim:
        raise CheckpointError(path / "vae" / "config.json",
                              f"z_dim is {vae_cfg.get('z_dim')}, but {spec.name} uses the {spec.vae.kind} VAE "
                              f"with z_dim {spec.vae.z_dim}")
    weight_bytes["vae"] = _check_weights(path / "vae", _DIFFUSERS_WEIGHTS)
    read_json(path / "text_encoder" / "config.json")
    weight_bytes["text_encoder"] = _check_weights(path / "text_encoder", _TRANSFORMERS_WEIGHTS)
    tok = path / "tokenizer"
    if not tok.is_dir() or not any(tok.iterdir()):
        raise CheckpointError(tok, "is missing or empty")
    read_json(path / "scheduler" / "scheduler_config.json")

    boundary = index.get("boundary_ratio")
    if spec.boundary is not None and boundary is not None and abs(boundary - spec.boundary) > 1e-9:
        warnings.append(f"model_index.json boundary_ratio {boundary} differs from {spec.name}'s {spec.boundary}; "
                        "using the checkpoint's")
    return CheckpointInfo(path=path, weight_bytes=weight_bytes,
                          boundary_ratio=boundary if boundary is not None else spec.boundary, warnings=warnings)


def _declared(index: dict, role: str) -> bool:
    entry = index.get(role)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


# -- loading -----------------------------------------------------------------------------
def load_components(
    spec: ModelSpec,
    path: Path,
    precision: str = "bf16",
    single_files: dict[str, str | None] | None = None,
    devices: dict[str, str] | None = None,
) -> Components:
    """Load every component of a checked checkpoint onto the CPU, or where ``devices`` says.

    The DiT experts and the text encoder load in ``precision`` (diffusers keeps the
    modules its model classes list in ``_keep_in_fp32_modules`` in fp32); the VAE loads
    in fp32. ``single_files`` maps "transformer", "transformer_2" or "vae" to a
    single-file safetensors that replaces that component's weights (its config comes
    from the checkpoint directory).

    ``devices`` maps "transformer", "transformer_2", "vae" or "text_encoder" to the device that component is read
    straight to (``device_map``: the model is built on the meta device and each tensor of each safetensors shard is
    copied to that device in its load dtype, the fp32-kept modules in fp32, in the same pass): the memory tier's
    place for it, so that no full copy is made in host memory first. ``PINNED`` reads it to pinned host memory (its
    home in an offload tier) with fast_read, or to ordinary host memory with the libraries' readers. A single file
    is read to the CPU.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from artifex.models import official

    t0 = time.perf_counter()
    if official.detect_layout(path) == "official":
        # One device for every component (load_official places each tensor as it is read): the tier's GPU when
        # it keeps everything there, else the CPU, from where placement moves them.
        roles = {"text_encoder", "vae", *["transformer", "transformer_2"][: spec.experts]}
        places = {str(devices[r]) for r in roles if r in (devices or {})}
        device = places.pop() if devices and roles <= set(devices) and len(places) == 1 else "cpu"
        device = "cpu" if device == PINNED else device  # pinned later, by the placement
        components = official.load_official(spec, path, precision, single_files, device=device)
        components.timings = {"read.official": round(time.perf_counter() - t0, 4)}  # check + read + convert
        return components
    if spec.task == "s2v":
        raise CheckpointError(path, f"is not an official-layout {spec.name} checkpoint (config.json, "
                                    "diffusion_pytorch_model-*.safetensors, Wan2.1_VAE.pth, "
                                    "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, "
                                    "wav2vec2-large-xlsr-53-english/, as Wan-AI/Wan2.2-S2V-14B publishes it); "
                                    "no diffusers layout of S2V is published")
    info = check_checkpoint(spec, path)
    single_files = {k: v for k, v in (single_files or {}).items() if v}
    for role, file in single_files.items():
        if role == "transformer_2" and spec.experts < 2:
            raise CheckpointError(file, f"{spec.name} has no transformer_2")
        check_safetensors(Path(file))
    timings = {"checkpoint_check": round(time.perf_counter() - t0, 4)}
    dtype = DTYPES[precision]
    devices = dict(devices or {})

    def device_map(role: str) -> dict:
        return {"device_map": {"": torch.device(devices[role])}} if devices.get(role, PINNED) != PINNED else {}

    def load(role: str, cls, subfolder: str, dtype: torch.dtype):
        t = time.perf_counter()
        try:
            return _load(role, cls, subfolder, dtype)
        finally:
            timings[f"read.{role}"] = round(time.perf_counter() - t, 4)

    def _load(role: str, cls, subfolder: str, dtype: torch.dtype):
        try:
            if role in single_files:
                # Single files load in fp32, then cast here so the fp32-kept modules never lose precision.
                model = cls.from_single_file(single_files[role], config=str(path), subfolder=subfolder,
                                             torch_dtype=torch.float32)
                return cast_keeping_fp32(model, dtype)
            if role in devices and fast_read.enabled():
                model = read_diffusers_model(cls, path, subfolder, dtype, devices[role])
                if model is not None:
                    return model
            return cls.from_pretrained(path, subfolder=subfolder, dtype=dtype, **device_map(role))
        except CheckpointError:
            raise
        except Exception as e:
            where = single_files.get(role) or path / subfolder
            raise CheckpointError(where, f"could not be loaded as {cls.__name__}: {type(e).__name__}: {e}") from e

    experts = [
        load(role, WanTransformer3DModel, role, dtype).eval()
        for role in ["transformer", "transformer_2"][: spec.experts]
    ]
    vae = load("vae", AutoencoderKLWan, "vae", torch.float32).eval()
    t = time.perf_counter()
    try:
        text_encoder = None
        if "text_encoder" in devices and fast_read.enabled():
            text_encoder = read_transformers_model(UMT5EncoderModel, path / "text_encoder", dtype,
                                                   devices["text_encoder"])
        if text_encoder is None:
            text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype,
                                                            **device_map("text_encoder"))
        text_encoder = text_encoder.eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    except Exception as e:
        raise CheckpointError(path / "text_encoder", f"could not be loaded: {type(e).__name__}: {e}") from e
    timings["read.text_encoder"] = round(time.perf_counter() - t, 4)
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                      scheduler_config=scheduler_config, experts=experts, info=info, timings=timings)


def _kept_fp32(name: str, keep) -> bool:
    return any(k in name.split(".") for k in keep or ())


def _load_dtypes(dtype: torch.dtype, keep):
    """The dtype each tensor loads in: floating ones in ``dtype``, or fp32 within a module of ``keep``."""
    return lambda name, d: (torch.float32 if _kept_fp32(name, keep) else dtype) if d.is_floating_point else d


def read_diffusers_model(cls, path: Path, subfolder: str, dtype: torch.dtype, device) -> torch.nn.Module | None:
    """A diffusers model whose safetensors ``fast_read`` reads straight to ``device`` (in ``dtype``, the modules the
    class keeps in fp32 in fp32: the rule of diffusers' from_pretrained), built on the meta device and given those
    tensors; the same model from_pretrained makes. None where the checkpoint's names are not exactly the model's
    (the caller then uses from_pretrained, which reports or converts them)."""
    import accelerate

    folder = path / subfolder
    files = weight_files(folder, _DIFFUSERS_WEIGHTS)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained builds it: what __init__ makes without a dtype takes this one
    try:
        with accelerate.init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
    finally:
        torch.set_default_dtype(previous)
    if set(model.state_dict()) != fast_read.tensor_names(files):  # from the headers: nothing read twice
        log.info("%s: its tensor names differ from %s's; read by diffusers", folder, cls.__name__)
        return None
    device, pin = _target(device)
    state = fast_read.read_safetensors(files, device, _load_dtypes(dtype, cls._keep_in_fp32_modules), pin=pin)
    model.load_state_dict(state, strict=True, assign=True)
    # As from_pretrained ends: dispatched to the device (the buffers no checkpoint holds move there), named
    accelerate.dispatch_model(model, device_map={"": torch.device(device)})
    model.register_to_config(_name_or_path=path)
    return model


def read_transformers_model(cls, folder: Path, dtype: torch.dtype, device) -> torch.nn.Module | None:
    """A transformers model (the UMT5 text encoder) whose safetensors ``fast_read`` reads straight to ``device``,
    handed to its from_pretrained as the state dict: transformers builds it and ties its weights as when it reads
    the files. Floating tensors come in ``dtype``, except those transformers keeps in fp32 at that dtype."""
    from transformers import AutoConfig

    keep = list(getattr(cls, "_keep_in_fp32_modules_strict", None) or []) if dtype in (torch.float16,
                                                                                      torch.bfloat16) else []
    if dtype == torch.float16:
        keep += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    device, pin = _target(device)
    state = fast_read.read_safetensors(weight_files(folder, _TRANSFORMERS_WEIGHTS), device, _load_dtypes(dtype, keep),
                                       pin=pin)
    with _without_allocator_warmup():
        model = cls.from_pretrained(None, config=AutoConfig.from_pretrained(folder), state_dict=state, dtype=dtype,
                                    device_map={"": torch.device(device)})
    model.config._name_or_path = str(folder)  # what from_pretrained(folder) records
    return model


def _target(device) -> tuple[str, bool]:
    """(device to read to, whether in pinned host memory) of a ``devices`` value."""
    return ("cpu", True) if device == PINNED else (str(device), False)


@contextlib.contextmanager
def _without_allocator_warmup():
    """transformers' from_pretrained with a device map first allocates the model's size on the device and frees it
    ("caching allocator warmup"), so that its reads reuse that memory. Handed a state dict already on the device,
    that is a second copy of the model at the load's peak (the umt5-xxl's 10.6 GiB): skipped while the block runs.
    A transformers without the function has nothing to skip."""
    from transformers import modeling_utils

    warmup = getattr(modeling_utils, "caching_allocator_warmup", None)
    if warmup is None:
        yield
        return
    modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_utils.caching_allocator_warmup = warmup


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype``, leaving the modules the class lists in
    ``_keep_in_fp32_modules`` in fp32 (the rule diffusers' from_pretrained applies)."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not _kept_fp32(name, keep):
            tensor.data = tensor.data.to(dtype)
    return model
