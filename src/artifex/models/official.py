"""The official Wan2.2 checkpoint layout (``Wan-AI/Wan2.2-*`` as published), detected, checked and converted at load.

What the layout holds, per variant:

    TI2V-5B      config.json + diffusion_pytorch_model[-0000N-of-0000M].safetensors (+ .index.json), Wan2.2_VAE.pth
    T2V/I2V-A14B high_noise_model/ and low_noise_model/ (each a config.json + shards), Wan2.1_VAE.pth
    S2V-14B      root shards like TI2V-5B, Wan2.1_VAE.pth, wav2vec2-large-xlsr-53-english/
    all          models_t5_umt5-xxl-enc-bf16.pth (the umt5-xxl encoder), google/umt5-xxl/ (its tokenizer)

Nothing is converted on disk. The check reads headers only (safetensors headers and lengths, the ``.pth`` files
through ``torch.load(mmap=True, weights_only=True)``, which maps the tensors without reading them) and converts the
key names of every component on meta tensors, so a missing, unexpected or misshapen key is an error naming the keys
before any weight is read. Loading then reads each tensor once, renames it and casts it straight to its run-time
dtype (the DiT in the requested precision with diffusers' ``_keep_in_fp32_modules`` rule, the VAE in fp32, the text
encoder in the requested precision with transformers' rule), into modules built without weights.

The transformer keys are renamed by diffusers' ``convert_wan_transformer_to_diffusers``. The two VAEs and the umt5
encoder are renamed here: diffusers' own Wan VAE converter hard-codes the real model's block counts (two res-blocks
per stage) and has no Wan2.2 VAE at all; nothing converts the official T5 to transformers' ``UMT5EncoderModel``.
The layout holds no scheduler, no MoE boundary and no VAE latent statistics: those come from the registry (and an
expert config's ``boundary`` field where present), listed in ``CheckpointInfo.from_registry``.

S2V: ``register_transformer_format("s2v", build, convert)`` is the hook the S2V model plugs its converter into;
``artifex.models.s2v`` is imported on first need, so registering at its import is enough.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artifex.errors import CheckpointError
from artifex.models.loader import DTYPES, CheckpointInfo, Components, check_safetensors, read_json
from artifex.models.registry import MODELS, ModelSpec

log = logging.getLogger("artifex")

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}
EXPERT_DIRS = ("high_noise_model", "low_noise_model")  # the engine's expert order: high-noise first
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
WEIGHTS = "diffusion_pytorch_model"

# The official VAE wrappers hold these latent statistics in code (wan/modules/vae2_1.py, vae2_2.py), not in the .pth.
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                      -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                     1.6382, 1.1253, 2.8251, 1.9160]
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# -- the layout --------------------------------------------------------------------------
def detect_layout(path: Path) -> str:
    """``"official"`` when ``path`` holds the official layout (and no ``model_index.json``), else ``"diffusers"``
    (whose check then names what is missing)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "diffusers"
    markers = [path / T5_FILE, *(path / f for f in VAE_FILES.values()),
               *(path / d / "config.json" for d in EXPERT_DIRS)]
    if any(m.is_file() for m in markers) or _official_config(path / "config.json"):
        return "official"
    return "diffusers"


def _official_config(path: Path) -> bool:
    try:
        return path.is_file() and {"dim", "num_heads", "num_layers"} <= set(read_json(path))
    except CheckpointError:
        return True  # a broken config.json at the root of a directory without model_index.json: say so in the check


def expert_dirs(spec: ModelSpec) -> list[str]:
    """The folders holding the transformers, in the engine's expert order ("" is the root)."""
    return list(EXPERT_DIRS) if spec.experts == 2 else [""]


def _roles(spec: ModelSpec) -> list[str]:
    return ["transformer", "transformer_2"][: spec.experts]


def _missing(path: Path, why: str) -> CheckpointError:
    return CheckpointError(path, f"is missing ({why}; official Wan2.2 layout detected: no model_index.json)")


# -- transformer formats (the S2V hook) ---------------------------------------------------
@dataclass(frozen=True)
class TransformerFormat:
    """How one task's official transformer state dict becomes a module.

    ``build(spec, config)`` returns the module (it is called inside ``accelerate.init_empty_weights``, so its
    parameters are on the meta device; buffers are real); ``config`` is the official ``config.json``.
    ``convert(state)`` takes the official state dict and returns the module's. The loader calls it first on meta
    tensors (to check keys and shapes) and then on the real ones. A converter that only renames (returns the same
    tensor objects under new keys) lets the loader cast each tensor as it is read; one that makes new tensors
    (splits, concatenations) is run on the tensors as stored and its output is cast afterwards.
    """

    build: Callable[[ModelSpec, dict], torch.nn.Module]
    convert: Callable[[dict], dict]


def _build_wan_transformer(spec: ModelSpec, config: dict) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**spec.transformer.diffusers_config())


def convert_wan_transformer(state: dict) -> dict:
    """Official WanModel keys -> ``WanTransformer3DModel`` keys (diffusers' converter; renames only)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state))  # it pops from what it is given


_TRANSFORMER_FORMATS: dict[str, TransformerFormat] = {
    task: TransformerFormat(_build_wan_transformer, convert_wan_transformer) for task in ("t2v", "i2v", "ti2v")}


# Modules that register their task's format when imported (imported here on first need, by name: no import cycle).
_FORMAT_MODULES = {"s2v": "artifex.models.s2v"}


def transformer_format(task: str) -> TransformerFormat | None:
    """The registered format of ``task``'s official transformer, importing the module that registers it if needed."""
    if task not in _TRANSFORMER_FORMATS and task in _FORMAT_MODULES:
        import importlib

        try:
            importlib.import_module(_FORMAT_MODULES[task])
        except ModuleNotFoundError as e:
            if e.name != _FORMAT_MODULES[task]:
                raise
    return _TRANSFORMER_FORMATS.get(task)


def register_transformer_format(task: str, build: Callable[[ModelSpec, dict], torch.nn.Module],
                                convert: Callable[[dict], dict]) -> None:
    """Plug in the converter of a task's official transformer (S2V: ``models/s2v`` registers ``"s2v"``)."""
    _TRANSFORMER_FORMATS[task] = TransformerFormat(build, convert)


# -- the official config.json of a transformer --------------------------------------------
# official field -> (TransformerArch field, default when the file leaves it out). WanModel drops patch_size and
# text_dim from its saved config (ignore_for_config), so their absence means the official defaults.
_CONFIG_FIELDS = {"dim": ("dim", None), "ffn_dim": ("ffn", None), "num_heads": ("heads", None),
                  "num_layers": ("layers", None), "in_dim": ("in_channels", None), "out_dim": ("out_channels", None),
                  "freq_dim": ("freq_dim", 256), "text_dim": ("text_dim", 4096), "patch_size": ("patch", [1, 2, 2])}


def _arch_value(spec: ModelSpec, field: str):
    value = getattr(spec.transformer, field)
    return list(value) if isinstance(value, tuple) else value


def _config_value(cfg: dict, key: str):
    field, default = _CONFIG_FIELDS[key]
    value = cfg.get(key, default)
    return list(value) if isinstance(value, tuple) else value


# The model_type values each task's official config may carry: WanModel only acts on "i2v" (it then requires the
# image latents), so a TI2V model saved as "t2v" would run the same; the shape fields decide the rest.
_MODEL_TYPES = {"ti2v": ("ti2v", "t2v"), "t2v": ("t2v",), "i2v": ("i2v",), "s2v": ("s2v",)}


def _type_fits(cfg: dict, task: str) -> bool:
    return "model_type" not in cfg or cfg["model_type"] in _MODEL_TYPES.get(task, (task,))


def _which_model(spec: ModelSpec, cfg: dict, experts: int) -> str:
    names = [o.name for o in MODELS.values() if o.name != spec.name and o.base is None and o.experts == experts
             and _type_fits(cfg, o.task)
             and all(_config_value(cfg, k) == _arch_value(o, f) for k, (f, _) in _CONFIG_FIELDS.items())]
    if names:
        return f" (it looks like {' or '.join(names)})"
    return f" (no known variant has {experts} transformer{'s' if experts != 1 else ''} of this shape)"


def _check_config(spec: ModelSpec, path: Path) -> dict:
    if not path.is_file():
        raise _missing(path, f"the config of {spec.name}'s transformer")
    cfg = read_json(path)
    experts = spec.experts
    if not _type_fits(cfg, spec.task):
        allowed = " or ".join(repr(t) for t in _MODEL_TYPES.get(spec.task, (spec.task,)))
        raise CheckpointError(path, f"model_type is {cfg['model_type']!r}, but {spec.name}'s is {allowed}: this is "
                                    f"not a {spec.name} checkpoint{_which_model(spec, cfg, experts)}")
    for key, (field, _) in _CONFIG_FIELDS.items():
        got, want = _config_value(cfg, key), _arch_value(spec, field)
        if got != want:
            raise CheckpointError(path, f"{key} is {got}, but {spec.name} has {want}: this is not a {spec.name} "
                                        f"checkpoint{_which_model(spec, cfg, experts)}")
    for key, want in (("qk_norm", True), ("cross_attn_norm", True), ("eps", 1e-6), ("text_len", spec.text_len)):
        if key in cfg and cfg[key] != want:
            raise CheckpointError(path, f"{key} is {cfg[key]!r}; {spec.name} has {want!r}")
    if "window_size" in cfg and list(cfg["window_size"]) != [-1, -1]:
        raise CheckpointError(path, f"window_size is {cfg['window_size']}; {spec.name} attends globally ([-1, -1])")
    return cfg


# -- weights on disk ----------------------------------------------------------------------
class _Weights:
    """The tensors of one component as stored: safetensors shards or one ``.pth``, opened without reading data."""

    def __init__(self, where: Path, files: dict[str, Path], meta: dict[str, torch.Tensor], pth: dict | None):
        self.where = where  # named in errors: the component's folder or file
        self.files = files  # key -> safetensors shard (empty for a .pth)
        self.meta = meta  # key -> a meta tensor of the stored shape and dtype
        self.pth = pth  # key -> the mmap-ed tensor (a .pth)
        self.nbytes = sum(t.numel() * t.element_size() for t in meta.values())

    @classmethod
    def safetensors(cls, folder: Path) -> _Weights:
        single = folder / f"{WEIGHTS}.safetensors"
        index = folder / f"{WEIGHTS}.safetensors.index.json"
        if single.is_file():
            shards = {single.name: single}
            key_file = None
        elif index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(index, "has no weight_map")
            shards = {name: folder / name for name in sorted(set(weight_map.values()))}
            key_file = weight_map
        else:
            raise CheckpointError(folder, f"holds no transformer weights: expected {single.name} or {index.name} "
                                          "(official Wan2.2 layout)")
        files, meta = {}, {}
        for name, shard in shards.items():
            if not shard.is_file():
                raise _missing(shard, f"{index.name} lists it")
            check_safetensors(shard)
            for key, entry in _safetensors_header(shard).items():
                if key == "__metadata__":
                    continue
                if key_file is not None and key_file.get(key) != name:
                    raise CheckpointError(index, f"does not list {key!r} in {name}, which holds it")
                dtype = _ST_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise CheckpointError(shard, f"{key}: unsupported dtype {entry.get('dtype')!r}")
                files[key] = shard
                meta[key] = torch.empty(entry["shape"], dtype=dtype, device="meta")
        if key_file is not None:
            absent = sorted(set(key_file) - set(files))
            if absent:
                raise CheckpointError(index, f"lists {len(absent)} tensors no shard holds: {_names(absent)}")
        return cls(folder, files, meta, None)

    @classmethod
    def torch_file(cls, path: Path, why: str) -> _Weights:
        if not path.is_file():
            raise _missing(path, why)
        with open(path, "rb") as f:
            magic = f.read(4)
        legacy = magic[:1] == b"\x80"  # torch.save before 1.6: a bare pickle, which cannot be memory-mapped
        if not legacy:
            try:
                with zipfile.ZipFile(path) as z:  # a torch.save file is a zip; a truncated one has no directory
                    z.infolist()
            except zipfile.BadZipFile:
                what = "not a torch.save file" if magic and magic != b"PK\x03\x04" else "truncated or corrupt"
                raise CheckpointError(path, f"is {what}: not a readable torch.save archive "
                                            f"({path.stat().st_size} bytes)") from None
        try:  # the legacy format is read whole (no mmap); the zip format only maps its tensors
            state = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
        except Exception as e:
            raise CheckpointError(path, f"is corrupt: torch.load(weights_only=True) failed ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(path, "is not a state dict (a mapping of names to tensors)")
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
        return cls(path, {}, meta, state)

    def read(self, keys: list[str], device: str | torch.device = "cpu"):
        """Yield (key, tensor) for ``keys``, opening each shard once (safetensors read straight to ``device``;
        a .pth yields its memory-mapped CPU tensors)."""
        if self.pth is not None:
            for key in keys:
                yield key, self.pth[key]
            return
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in file_keys:
                    yield key, f.get_tensor(key)


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _names(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- name maps: VAE and text encoder --------------------------------------------------------
_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}


def _resnet(tail: str) -> str:
    part, _, leaf = tail.partition(".")
    return f"{_RESNET_PARTS[part]}.{leaf}"


def vae_official_name(key: str, config: Any) -> str:
    """The official name of an ``AutoencoderKLWan`` key (both Wan VAEs, any block counts)."""
    r = config.num_res_blocks
    fixed = [(r"^(encoder|decoder)\.conv_in\.(.+)$", r"\1.conv1.\2"), (r"^quant_conv\.(.+)$", r"conv1.\1"),
             (r"^post_quant_conv\.(.+)$", r"conv2.\1"), (r"^(encoder|decoder)\.norm_out\.(.+)$", r"\1.head.0.\2"),
             (r"^(encoder|decoder)\.conv_out\.(.+)$", r"\1.head.2.\2"),
             (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", r"\1.middle.1.\2")]
    for pattern, repl in fixed:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet(m[3])}"
    if config.is_residual:  # Wan2.2: nested Down_/Up_ResidualBlocks
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            return f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_resnet(m[3])}"
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$", key):
            return f"encoder.downsamples.{m[1]}.downsamples.{r}.{m[2]}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            return f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_resnet(m[3])}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsampler\.(.+)$", key):
            return f"decoder.upsamples.{m[1]}.upsamples.{r + 1}.{m[2]}"
    else:  # Wan2.1: flat lists; each decoder stage is r + 1 res-blocks and (but the last) one upsampler
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.((?:norm|conv)[12]|conv_shortcut)\.(.+)$", key):
            return f"encoder.downsamples.{m[1]}.{_resnet(m[2] + '.' + m[3])}"
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.((?:resample|time_conv)\..+)$", key):
            return f"encoder.downsamples.{m[1]}.{m[2]}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            return f"decoder.upsamples.{int(m[1]) * (r + 2) + int(m[2])}.{_resnet(m[3])}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
            return f"decoder.upsamples.{int(m[1]) * (r + 2) + r + 1}.{m[2]}"
    raise KeyError(f"no official name known for the AutoencoderKLWan key {key!r}")


def umt5_official_name(key: str) -> str:
    """The official name (wan/modules/t5.py ``T5Encoder``) of a ``UMT5EncoderModel`` key."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.match(r"^encoder\.block\.(\d+)\.layer\.([01])\.(.+)$", key)
    parts = {"0": {"SelfAttention.q.weight": "attn.q.weight", "SelfAttention.k.weight": "attn.k.weight",
                   "SelfAttention.v.weight": "attn.v.weight", "SelfAttention.o.weight": "attn.o.weight",
                   "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                   "layer_norm.weight": "norm1.weight"},
             "1": {"DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                   "DenseReluDense.wo.weight": "ffn.fc2.weight", "layer_norm.weight": "norm2.weight"}}
    if m and m[3] in parts[m[2]]:
        return f"blocks.{m[1]}.{parts[m[2]][m[3]]}"
    raise KeyError(f"no official name known for the UMT5EncoderModel key {key!r}")


def _by_map(to_official: dict[str, str]) -> Callable[[dict], dict]:
    """A converter that fills each module key from its official key (one official tensor may fill two tied keys)."""

    def convert(state: dict) -> dict:
        return {key: state[src] for key, src in to_official.items() if src in state}

    return convert


def vae_config(spec: ModelSpec) -> dict:
    """``AutoencoderKLWan`` arguments for the official VAE of ``spec`` (the real latent statistics included)."""
    from artifex.models.configs import vae_kwargs

    kw = vae_kwargs(spec)
    if not spec.tiny:
        wan22 = spec.vae.kind == "wan2.2"
        kw["latents_mean"] = list(WAN22_LATENTS_MEAN if wan22 else WAN21_LATENTS_MEAN)
        kw["latents_std"] = list(WAN22_LATENTS_STD if wan22 else WAN21_LATENTS_STD)
    return kw


def _text_encoder_config(spec: ModelSpec, weights: _Weights):
    from artifex.models.configs import text_encoder_config

    emb = weights.meta.get("token_embedding.weight")
    if spec.tiny and emb is not None:  # a tiny tokenizer's vocabulary is whatever its builder made
        return text_encoder_config(spec, vocab_size=emb.shape[0])
    return text_encoder_config(spec)


# -- check -------------------------------------------------------------------------------
@dataclass
class _Part:
    role: str
    weights: _Weights
    build: Callable[[], torch.nn.Module]
    convert: Callable[[dict], dict] | None  # None: the name map of the role, made from the built module
    pairs: list[tuple[str, str]] | None = None  # (module key, official key) when the converter only renames


@dataclass
class _Checked:
    info: CheckpointInfo
    parts: list[_Part]
    tokenizer: Path


def check_official(spec: ModelSpec, path: Path) -> CheckpointInfo:
    """Check that ``path`` holds a loadable official-layout checkpoint of ``spec``, reading headers only."""
    return _check(spec, Path(path)).info


def _check(spec: ModelSpec, path: Path) -> _Checked:
    from transformers import UMT5EncoderModel

    roles = _roles(spec)
    dirs = expert_dirs(spec)
    if spec.experts == 1 and any((path / d).is_dir() for d in EXPERT_DIRS):
        cfg_file = path / EXPERT_DIRS[0] / "config.json"
        hint = _which_model(spec, read_json(cfg_file), 2) if cfg_file.is_file() else ""
        raise CheckpointError(path, f"holds {' and '.join(d + '/' for d in EXPERT_DIRS)} (two experts); {spec.name} "
                                    f"has one transformer{hint} (official Wan2.2 layout detected)")
    if spec.experts == 2 and not all((path / d).is_dir() for d in EXPERT_DIRS):
        missing = next(d for d in EXPERT_DIRS if not (path / d).is_dir())
        hint = ""
        if (path / "config.json").is_file():
            hint = f"; it holds one transformer at its root{_which_model(spec, read_json(path / 'config.json'), 1)}"
        raise CheckpointError(path / missing, f"is missing ({spec.name} needs {', '.join(EXPERT_DIRS)}{hint}; "
                                              "official Wan2.2 layout detected: no model_index.json)")
    fmt = transformer_format(spec.task)
    parts: list[_Part] = []
    configs = []
    for role, d in zip(roles, dirs):
        folder = path / d if d else path
        cfg = _check_config(spec, folder / "config.json")
        configs.append(cfg)
        weights = _Weights.safetensors(folder)
        if fmt is None:
            raise CheckpointError(folder, f"holds a {spec.task} transformer, and no converter for the official "
                                          f"{spec.task} transformer is registered "
                                          "(official.register_transformer_format)")
        parts.append(_Part(role, weights, lambda cfg=cfg: fmt.build(spec, cfg), fmt.convert))

    vae_file = path / VAE_FILES[spec.vae.kind]
    if not vae_file.is_file():
        other = next((f for k, f in VAE_FILES.items() if k != spec.vae.kind and (path / f).is_file()), None)
        hint = f"; the directory holds {other}, the VAE of other variants" if other else ""
        raise _missing(vae_file, f"{spec.name} decodes with the {spec.vae.kind} VAE{hint}")
    vae_weights = _Weights.torch_file(vae_file, f"{spec.name} decodes with the {spec.vae.kind} VAE")

    def build_vae():
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan(**vae_config(spec))

    parts.append(_Part("vae", vae_weights, build_vae, None))  # its converter needs the built config: set below

    t5_weights = _Weights.torch_file(path / T5_FILE, f"{spec.name} encodes text with umt5-xxl")
    t5_config = _text_encoder_config(spec, t5_weights)
    parts.append(_Part("text_encoder", t5_weights, lambda: UMT5EncoderModel(t5_config), None))

    tok = path / TOKENIZER_DIR
    if not tok.is_dir() or not any(tok.iterdir()):
        raise CheckpointError(tok, "is missing or empty (the umt5-xxl tokenizer; official Wan2.2 layout detected)")
    if spec.task == "s2v":
        wav = path / WAV2VEC_DIR
        if not (wav / "config.json").is_file():
            raise _missing(wav / "config.json", f"{spec.name} encodes audio with wav2vec2")

    for part in parts:
        _plan(part)

    from_registry = [f"scheduler: UniPC (flow_prediction) at {spec.name}'s shift {spec.shift:g} (the official layout "
                     "holds no scheduler config)"]
    boundary = spec.boundary
    if spec.experts == 2:
        declared = [c["boundary"] for c in configs if isinstance(c.get("boundary"), (int, float))]
        if declared:
            boundary = float(declared[0])
        else:
            from_registry.append(f"boundary_ratio: {spec.boundary} ({spec.name}'s)")
    if not spec.tiny:
        from_registry.append(f"VAE latents_mean/latents_std: the official {spec.vae.kind} values")
    warnings = []
    if spec.boundary is not None and abs(boundary - spec.boundary) > 1e-9:
        warnings.append(f"{EXPERT_DIRS[0]}/config.json boundary {boundary} differs from {spec.name}'s "
                        f"{spec.boundary}; using the checkpoint's")
    info = CheckpointInfo(path=path, weight_bytes={p.role: p.weights.nbytes for p in parts}, boundary_ratio=boundary,
                          warnings=warnings, layout="official", from_registry=from_registry)
    return _Checked(info=info, parts=parts, tokenizer=tok)


def _empty(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _plan(part: _Part) -> None:
    """Convert the stored key names on meta tensors and compare them with the module's: keys and shapes."""
    model = _empty(part.build)
    want = model.state_dict()
    if part.convert is None:  # the name maps are built from the module itself
        if part.role == "vae":
            part.convert = _by_map({k: vae_official_name(k, model.config) for k in want})
        else:
            part.convert = _by_map({k: umt5_official_name(k) for k in want})
    source = dict(part.weights.meta)
    try:
        got = part.convert(dict(source))
    except Exception as e:
        raise CheckpointError(part.weights.where, f"could not be converted ({type(e).__name__}: {e})") from e
    origin = {id(t): k for k, t in source.items()}
    renames_only = all(id(t) in origin for t in got.values())
    used = {origin[id(t)] for t in got.values() if id(t) in origin}
    missing = [k for k in want if k not in got]
    # unexpected: what the conversion made that the module lacks, and (renames only) what it left unused
    unexpected = [origin.get(id(got[k]), k) for k in got if k not in want]
    unexpected += [k for k in source if k not in used] if renames_only else []
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing after conversion: {_names(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (official names): {_names(sorted(set(unexpected)))}")
        raise CheckpointError(part.weights.where, f"does not match the {type(model).__name__} of this model: "
                                                  + "; ".join(problems))
    wrong = [f"{origin.get(id(got[k]), k)} {list(got[k].shape)} (expected {list(v.shape)})"
             for k, v in want.items() if tuple(got[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(part.weights.where, f"has tensors of the wrong shape: {_names(wrong, 4)}")
    if renames_only:
        part.pairs = [(k, origin[id(t)]) for k, t in got.items()]


# -- load --------------------------------------------------------------------------------
def _fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """The modules a from_pretrained load of ``model`` in ``dtype`` would leave in fp32: diffusers keeps
    ``_keep_in_fp32_modules`` (``loader.cast_keeping_fp32``); transformers keeps them for fp16 only, and
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16."""
    from transformers import PreTrainedModel

    if dtype == torch.float32:
        return []
    if not isinstance(model, PreTrainedModel):
        return list(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return keep


def _load_part(part: _Part, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.nn.Module:
    model = _empty(part.build)
    keep = _fp32_modules(model, dtype)
    mapped = part.weights.pth is not None

    def target(name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point():
            return t.dtype
        return torch.float32 if any(k in name.split(".") for k in keep) else dtype

    def cast(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        out = t.to(device=device, dtype=to)
        # A .pth is memory-mapped: a tensor left on its pages would change (or fault) if the file were rewritten
        # while the engine runs. Own the memory, as a safetensors read does.
        return out.clone() if mapped and out.data_ptr() == t.data_ptr() else out

    try:
        if part.pairs is not None:  # renames only: cast each tensor as it is read
            wanted: dict[str, list[str]] = {}
            for key, src in part.pairs:
                wanted.setdefault(src, []).append(key)
            state: dict[str, torch.Tensor] = {}
            for src, tensor in part.weights.read(list(wanted), device):
                made: dict[torch.dtype, torch.Tensor] = {}  # one copy per dtype (tied keys share it)
                for key in wanted[src]:
                    to = target(key, tensor)
                    if to not in made:
                        made[to] = cast(tensor, to)
                    state[key] = made[to]
        else:
            stored = dict(part.weights.read(list(part.weights.meta), device))
            state = {k: cast(t, target(k, t)) for k, t in part.convert(stored).items()}
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        raise CheckpointError(part.weights.where, f"could not be loaded as {type(model).__name__}: "
                                                  f"{type(e).__name__}: {e}") from e
    if part.role == "text_encoder":
        model.tie_weights()  # shared and encoder.embed_tokens came from one official tensor: one parameter again
    return model.to(device).eval()  # (the buffers were built on the CPU)


def load_official(spec: ModelSpec, path: Path, precision: str = "bf16",
                  single_files: dict[str, str | None] | None = None, device: str | torch.device = "cpu") -> Components:
    """Load every component of an official-layout checkpoint onto ``device`` (the CPU by default), converting in
    memory: each tensor is read once, renamed, and cast and placed as it is read."""
    from transformers import AutoTokenizer

    if any(v for v in (single_files or {}).values()):
        raise CheckpointError(path, "single-file replacements (--transformer-file/--vae-file) need a diffusers-layout "
                                    "checkpoint directory; this one has the official Wan2.2 layout")
    checked = _check(spec, Path(path))
    dtype = DTYPES[precision]
    for line in checked.info.from_registry:
        log.info("official layout: %s", line)
    loaded = {p.role: _load_part(p, torch.float32 if p.role == "vae" else dtype, device) for p in checked.parts}
    try:
        tokenizer = AutoTokenizer.from_pretrained(checked.tokenizer)
    except Exception as e:
        raise CheckpointError(checked.tokenizer, f"could not be loaded: {type(e).__name__}: {e}") from e
    audio_encoder, extractor = _load_wav2vec(path / WAV2VEC_DIR, device) if spec.task == "s2v" else (None, None)
    return Components(tokenizer=tokenizer, text_encoder=loaded["text_encoder"], vae=loaded["vae"],
                      scheduler_config=scheduler_config(spec), experts=[loaded[r] for r in _roles(spec)],
                      info=checked.info, audio_encoder=audio_encoder, feature_extractor=extractor)


def _load_wav2vec(folder: Path, device: str | torch.device):
    """S2V's wav2vec2 (``Wav2Vec2ForCTC``, in fp32 as the official code runs it) and its feature extractor."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    try:
        model = Wav2Vec2ForCTC.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(folder, f"could not be loaded as Wav2Vec2ForCTC with its feature extractor: "
                                      f"{type(e).__name__}: {e}") from e
    return model, extractor


def scheduler_config(spec: ModelSpec) -> dict:
    """The scheduler config the official layout lacks: Wan's UniPC on flow sigmas at the registry's shift."""
    return {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 2,
            "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": spec.shift}


# -- converting a state dict in memory (the path a checkpoint takes, without files) ---------------
def _state_part(role: str, state: dict, build, convert, where: str) -> _Part:
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    part = _Part(role, _Weights(Path(where), {}, meta, state), build, convert)
    _plan(part)
    return part


def check_state(role: str, state: dict, build: Callable[[], torch.nn.Module],
                convert: Callable[[dict], dict] | None = None) -> list[tuple[str, str]] | None:
    """Check an official state dict (real or meta tensors) against the module ``build()`` makes, as a checkpoint's
    check does; ``role`` "vae" and "text_encoder" use the name maps here, others need ``convert``. Returns the
    (module key, official key) pairs when the conversion only renames."""
    return _state_part(role, state, build, convert, f"<{role} state dict>").pairs


def _from_state(role: str, state: dict, build, convert, dtype: torch.dtype, where: str) -> torch.nn.Module:
    return _load_part(_state_part(role, state, build, convert, where), dtype)


def transformer_from_official(spec: ModelSpec, state: dict, config: dict | None = None,
                              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformer of ``spec`` from an official state dict (keys checked; fp32 modules kept as diffusers does)."""
    fmt = transformer_format(spec.task)
    if fmt is None:
        raise CheckpointError(spec.name, "no converter for its official transformer is registered")
    return _from_state("transformer", state, lambda: fmt.build(spec, config or {}), fmt.convert, dtype,
                       f"<{spec.name} transformer state dict>")


def vae_from_official(state: dict, vae_kwargs: dict) -> torch.nn.Module:
    """An fp32 ``AutoencoderKLWan(**vae_kwargs)`` from an official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``
    state dict."""
    from diffusers import AutoencoderKLWan

    return _from_state("vae", state, lambda: AutoencoderKLWan(**vae_kwargs), None, torch.float32, "<VAE state dict>")


def umt5_from_official(state: dict, config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``UMT5EncoderModel(config)`` from the official umt5 encoder state dict (wan/modules/t5.py names)."""
    from transformers import UMT5EncoderModel

    return _from_state("text_encoder", state, lambda: UMT5EncoderModel(config), None, dtype, "<umt5 state dict>")


# -- writing (tiny checkpoints for tests and the demo) -------------------------------------
_TO_OFFICIAL_TRANSFORMER = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head")]


def transformer_official_name(key: str) -> str:
    """The official WanModel name of a ``WanTransformer3DModel`` key (T2V/I2V/TI2V; the inverse of diffusers')."""
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in _TO_OFFICIAL_TRANSFORMER:
        key = key.replace(a, b)
    key = re.sub(r"\.scale_shift_table$", ".modulation", key)
    # diffusers' norm2 is the official norm3 (the cross-attention norm) and the other way round
    return re.sub(r"\.norm([23])\.", lambda m: f".norm{5 - int(m[1])}.", key)


def official_transformer_config(spec: ModelSpec) -> dict:
    """The official ``config.json`` of a transformer of ``spec`` (the fields WanModel saves)."""
    a = spec.transformer
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": a.dim, "eps": 1e-6, "ffn_dim": a.ffn,
           "freq_dim": a.freq_dim, "in_dim": a.in_channels, "model_type": spec.task, "num_heads": a.heads,
           "num_layers": a.layers, "out_dim": a.out_channels, "text_len": spec.text_len}
    if a.text_dim != 4096:  # WanModel does not save text_dim; a toy model must say it
        cfg["text_dim"] = a.text_dim
    return cfg


def write_official_checkpoint(spec: ModelSpec, path: Path, *, experts: list[torch.nn.Module], vae: torch.nn.Module,
                              text_encoder: torch.nn.Module, tokenizer, shards: int = 2,
                              audio: tuple | None = None) -> Path:
    """Write diffusers/transformers modules as an official-layout checkpoint (the official key names, files and
    folders), in the modules' own dtypes; S2V with ``audio`` = (wav2vec2 model, feature extractor). For tiny
    models: real checkpoints are published, not written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if spec.task == "s2v":
        from artifex.models.s2v.convert import artifex_to_official_key, official_config

        rename, config = artifex_to_official_key, (lambda expert: official_config(dict(expert.config)))
        if audio is None:
            raise ValueError("an S2V checkpoint needs its wav2vec2 model and feature extractor (audio=)")
        for part in audio:
            part.save_pretrained(path / WAV2VEC_DIR)
    else:
        rename, config = transformer_official_name, (lambda expert: official_transformer_config(spec))
    for expert, d in zip(experts, expert_dirs(spec)):
        folder = path / d if d else path
        folder.mkdir(parents=True, exist_ok=True)
        state = {rename(k): v.detach().contiguous() for k, v in expert.state_dict().items()}
        keys = sorted(state)
        n = max(1, min(shards, len(keys)))
        weight_map = {}
        for i in range(n):
            name = f"{WEIGHTS}-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: state[k] for k in keys[i::n]}
            save_file(part, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / f"{WEIGHTS}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (folder / "config.json").write_text(json.dumps(config(expert), indent=2))
    vae_state = {vae_official_name(k, vae.config): v.detach().clone() for k, v in vae.state_dict().items()}
    torch.save(vae_state, path / VAE_FILES[spec.vae.kind])
    t5_state = {}
    for k, v in text_encoder.state_dict().items():
        t5_state.setdefault(umt5_official_name(k), v.detach().clone())
    torch.save(t5_state, path / T5_FILE)
    tokenizer.save_pretrained(path / TOKENIZER_DIR)
    return path
