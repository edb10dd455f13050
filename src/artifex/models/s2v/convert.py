"""Official Wan2.2 S2V-14B checkpoint keys and config -> ``WanS2VTransformer3DModel``'s.

The official names (``wan/modules/s2v/model_s2v.py``; DiffSynth-Studio's ``WanS2VModel`` uses the same ones):
``blocks.N.self_attn.q``, ``blocks.N.norm3`` (the cross-attention norm), ``blocks.N.modulation``,
``casual_audio_encoder.encoder.conv1_local.conv``, ``audio_injector.injector.K.q``,
``audio_injector.injector_adain_layers.K.linear``, ``trainable_cond_mask``, ``frame_packer.proj_2x``,
``cond_encoder``, ``head.head``, ... Every key must map and every model key must be filled: a mismatch is a
``CheckpointError`` naming the keys.
"""

from __future__ import annotations

import re

import torch

from artifex.errors import CheckpointError

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}

# (official pattern, our name); the first full match wins.
_RULES: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"cond_encoder\.(weight|bias)", r"pose_embedding.\1"),
    (r"text_embedding\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"text_embedding\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"time_embedding\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"time_projection\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"trainable_cond_mask\.weight", r"type_embedding.weight"),
    (r"frame_packer\.(proj|proj_2x|proj_4x)\.(weight|bias)", r"motion_packer.\1.\2"),
    (r"casual_audio_encoder\.weights", r"audio_encoder.layer_weights"),
    (r"casual_audio_encoder\.encoder\.(conv1_local|conv1_global|conv2|conv3)\.conv\.(weight|bias)",
     r"audio_encoder.\1.\2"),
    (r"casual_audio_encoder\.encoder\.(final_linear)\.(weight|bias)", r"audio_encoder.\1.\2"),
    (r"casual_audio_encoder\.encoder\.padding_tokens", r"audio_encoder.padding_tokens"),
    (r"audio_injector\.injector_adain_layers\.(\d+)\.linear\.(weight|bias)", r"audio_injectors.\1.adain.linear.\2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"head\.head\.(weight|bias)", r"proj_out.\1"),
    (r"head\.modulation", r"scale_shift_table"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]
_ATTN_KEY = re.compile(r"(blocks\.(\d+)\.(self_attn|cross_attn)|audio_injector\.injector\.(\d+))\."
                       r"(q|k|v|o|norm_q|norm_k)\.(weight|bias)")
# Parameter-free in the official model, or never used by its forward: nothing to carry over.
_UNUSED = re.compile(r"audio_injector\.injector_pre_norm_(feat|vec)\.\d+\..*")


def official_to_artifex_key(key: str) -> str | None:
    """Our name for one official key, or None if it has no place in the model."""
    m = _ATTN_KEY.fullmatch(key)
    if m:
        proj = _ATTN[m.group(5)]
        if m.group(2) is not None:
            attn = "attn1" if m.group(3) == "self_attn" else "attn2"
            return f"blocks.{m.group(2)}.{attn}.{proj}.{m.group(6)}"
        return f"audio_injectors.{m.group(4)}.attn.{proj}.{m.group(6)}"
    for pattern, repl in _COMPILED:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


_ATTN_OFFICIAL = {v: k for k, v in _ATTN.items()}
_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"pose_embedding\.(weight|bias)", r"cond_encoder.\1"),
    (r"condition_embedder\.text_embedder\.linear_([12])\.(weight|bias)",
     lambda m: f"text_embedding.{2 * int(m[1]) - 2}.{m[2]}"),
    (r"condition_embedder\.time_embedder\.linear_([12])\.(weight|bias)",
     lambda m: f"time_embedding.{2 * int(m[1]) - 2}.{m[2]}"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"type_embedding\.weight", r"trainable_cond_mask.weight"),
    (r"motion_packer\.(.*)", r"frame_packer.\1"),
    (r"audio_encoder\.layer_weights", r"casual_audio_encoder.weights"),
    (r"audio_encoder\.(conv1_local|conv1_global|conv2|conv3)\.(weight|bias)",
     r"casual_audio_encoder.encoder.\1.conv.\2"),
    (r"audio_encoder\.(final_linear\.(?:weight|bias)|padding_tokens)", r"casual_audio_encoder.encoder.\1"),
    (r"audio_injectors\.(\d+)\.adain\.linear\.(weight|bias)", r"audio_injector.injector_adain_layers.\1.linear.\2"),
    (r"audio_injectors\.(\d+)\.attn\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight|bias)",
     lambda m: f"audio_injector.injector.{m[1]}.{_ATTN_OFFICIAL[m[2]]}.{m[3]}"),
    (r"blocks\.(\d+)\.attn([12])\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight|bias)",
     lambda m: f"blocks.{m[1]}.{'self_attn' if m[2] == '1' else 'cross_attn'}.{_ATTN_OFFICIAL[m[3]]}.{m[4]}"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
    (r"scale_shift_table", r"head.modulation"),
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
]
_TO_OFFICIAL_COMPILED = [(re.compile(p), r) for p, r in _TO_OFFICIAL]


def artifex_to_official_key(key: str) -> str:
    """The official name of one ``WanS2VTransformer3DModel`` key (the inverse of ``official_to_artifex_key``)."""
    for pattern, repl in _TO_OFFICIAL_COMPILED:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    raise KeyError(f"no official name for {key}")


def official_config(config: dict) -> dict:
    """The official ``config.json`` (WanModel_S2V's fields) of a model of ``config`` (its keyword arguments)."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    motion = config.get("motion_frames", (73, 19))
    cfg = {"_class_name": "WanModel_S2V", "model_type": "s2v", "dim": heads * head_dim, "num_heads": heads,
           "num_layers": config["num_layers"], "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"],
           "in_dim": config["in_channels"], "out_dim": config["out_channels"], "eps": config.get("eps", 1e-6),
           "text_len": 512, "audio_dim": config["audio_dim"], "num_audio_token": config["num_audio_tokens"],
           "audio_inject_layers": list(config["audio_inject_layers"]), "cond_dim": config["pose_channels"],
           "motion_frames": motion[0], "zip_frame_buckets": list(config.get("zip_frame_buckets", (1, 2, 16))),
           "enable_adain": True, "adain_mode": "attn_norm", "add_last_motion": True, "zero_timestep": True,
           "enable_framepack": True, "framepack_drop_mode": "padd", "qk_norm": True, "cross_attn_norm": True,
           "window_size": [-1, -1]}
    if config["text_dim"] != 4096:  # the official model does not save text_dim; a toy model must say it
        cfg["text_dim"] = config["text_dim"]
    if config.get("audio_layers", 25) != 25:  # wav2vec2-large's 25 hidden states, fixed in the official code
        cfg["audio_layers"] = config["audio_layers"]
    return cfg


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("model.", "diffusion_model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def convert_s2v_state_dict(official_sd: dict[str, torch.Tensor], config: dict | None = None,
                           source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The official S2V state dict under ``WanS2VTransformer3DModel``'s names.

    With ``config`` (the model's config dict), the result is checked against the keys and shapes a model of
    that config holds: any official key that maps nowhere, any model key left unfilled, or any shape that
    differs is a ``CheckpointError`` listing them (``source`` names the checkpoint in the message).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _strip_prefix(official_sd).items():
        if _UNUSED.fullmatch(key):
            continue
        new = official_to_artifex_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(source, f"{len(unknown)} S2V checkpoint keys have no place in the model: "
                              f"{', '.join(sorted(unknown)[:20])}")
    if config is not None:
        from artifex.models.s2v.transformer import WanS2VTransformer3DModel

        with torch.device("meta"):
            model = WanS2VTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(out))
        extra = sorted(set(out) - set(expected))
        bad = sorted(k for k in set(expected) & set(out) if tuple(out[k].shape) != expected[k])
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {', '.join(missing[:20])}")
        if extra:
            problems.append(f"left over {len(extra)}: {', '.join(extra[:20])}")
        if bad:
            problems.append("shape mismatch: " + ", ".join(f"{k} {tuple(out[k].shape)} vs {expected[k]}"
                                                          for k in bad[:20]))
        if problems:
            raise CheckpointError(source, "S2V weights do not fit the model config; " + "; ".join(problems))
    return out


def config_from_official(official: dict) -> dict:
    """``WanS2VTransformer3DModel`` keyword arguments from the official config.json (wan_s2v_14B fields)."""
    try:
        dim, heads = int(official["dim"]), int(official["num_heads"])
        cfg = {
            "patch_size": tuple(official.get("patch_size", (1, 2, 2))),
            "num_attention_heads": heads,
            "attention_head_dim": dim // heads,
            "in_channels": int(official.get("in_dim", 16)),
            "out_channels": int(official.get("out_dim", 16)),
            "text_dim": int(official.get("text_dim", 4096)),
            "freq_dim": int(official.get("freq_dim", 256)),
            "ffn_dim": int(official["ffn_dim"]),
            "num_layers": int(official["num_layers"]),
            "eps": float(official.get("eps", 1e-6)),
            "audio_dim": int(official.get("audio_dim", 1024)),
            "num_audio_tokens": int(official.get("num_audio_token", 4)),
            "pose_channels": int(official.get("cond_dim", 16)),
            # not an official field (the official encoder always mixes wav2vec2-large's 25 hidden states); the
            # tiny twin's config.json names its own count
            "audio_layers": int(official.get("audio_layers", 25)),
        }
        if "motion_frames" in official:
            frames = int(official["motion_frames"])
            cfg["motion_frames"] = (frames, (frames + 3) // 4)
        if "audio_inject_layers" in official:
            cfg["audio_inject_layers"] = tuple(int(i) for i in official["audio_inject_layers"])
        if "zip_frame_buckets" in official:
            cfg["zip_frame_buckets"] = tuple(int(i) for i in official["zip_frame_buckets"])
    except KeyError as e:
        raise CheckpointError("config.json", f"the S2V config lacks the field {e.args[0]!r}") from None
    if dim % heads:
        raise CheckpointError("config.json", f"dim {dim} is not a multiple of num_heads {heads}")
    for flag, want in (("enable_adain", True), ("add_last_motion", True), ("zero_timestep", True)):
        if flag in official and bool(official[flag]) != want:
            raise CheckpointError("config.json", f"{flag}={official[flag]!r}: only {want} is built")
    if official.get("framepack_drop_mode", "padd") != "padd":
        raise CheckpointError("config.json", f"framepack_drop_mode={official['framepack_drop_mode']!r}: only "
                              "'padd' is built")
    return cfg
