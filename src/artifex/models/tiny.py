"""Tiny Wan2.2 checkpoints built offline from the real diffusers/transformers classes.

The weights are random but deterministic (seeded per component); the tokenizer is a
small Unigram vocabulary made here, so nothing comes from the hub. The checkpoint is
saved through the real diffusers pipeline class, which makes the layout on disk the
same as the published ``*-Diffusers`` checkpoints, and it is loaded back through the
same loader as real weights.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from artifex.models.registry import ModelSpec

# Bump when the construction below changes, so cached checkpoints are rebuilt.
TINY_FORMAT = 1

_WORDS = (
    "a an the of and in on at with by to from over under into through across near cat dog bird horse fish "
    "person man woman child robot car train boat city street forest ocean beach mountain river sky cloud rain "
    "snow sun sunset sunrise night light fire water camera slow motion close up wide shot aerial walking "
    "running flying swimming dancing red blue green yellow white black golden cinematic video 4k"
).split()


def build_tokenizer():
    """A T5-style Unigram tokenizer (Metaspace, ``</s>`` appended, ``<pad>`` = 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        scores.setdefault(ch, -5.0)
        scores.setdefault("\u2581" + ch, -4.0)
    for w in _WORDS:
        scores["\u2581" + w] = -1.0
    tok = Tokenizer(models.Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    )


def build_components(spec: ModelSpec) -> dict:
    """The pipeline components of a tiny spec, in fp32 with seeded random weights."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from artifex.models.configs import text_encoder_config, vae_kwargs

    assert spec.tiny, f"{spec.name} is not a tiny model"
    tokenizer = build_tokenizer()
    arch = spec.transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text_encoder = UMT5EncoderModel(text_encoder_config(spec, vocab_size=len(tokenizer))).eval()
        torch.manual_seed(2)
        vae = AutoencoderKLWan(**vae_kwargs(spec))
        transformers = []
        for i in range(spec.experts):
            torch.manual_seed(10 + i)
            if spec.task == "s2v":
                from artifex.models.s2v.transformer import s2v_config_for, tiny_s2v_transformer

                transformers.append(tiny_s2v_transformer(seed=10 + i, **s2v_config_for(spec)))
                continue
            t = WanTransformer3DModel(**arch.diffusers_config())
            # diffusers zero-initialises nothing that matters here, but the output projection of a
            # fresh model is small; scale it so that tiny videos show visible motion.
            with torch.no_grad():
                t.proj_out.weight.mul_(4.0)
            transformers.append(t.eval())

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec.shift
    )
    audio = None
    if spec.task == "s2v":
        from artifex.models.s2v.audio import tiny_wav2vec

        audio = tiny_wav2vec(seed=3)
    return {
        "audio": audio,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae.eval(),
        "scheduler": scheduler,
        "transformer": transformers[0],
        "transformer_2": transformers[1] if spec.experts == 2 else None,
    }


def save_tiny_checkpoint(spec: ModelSpec, path: str | Path) -> Path:
    """Write a tiny checkpoint in the diffusers layout to ``path`` (created or replaced); S2V, whose only published
    layout is the official one, in that layout."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if spec.task == "s2v":
        return _replace_dir(Path(path), lambda tmp: save_tiny_official_checkpoint(spec, tmp))
    comps = build_components(spec)
    comps.pop("audio")
    if spec.task == "i2v":
        pipe = WanImageToVideoPipeline(
            image_processor=None, image_encoder=None, boundary_ratio=spec.boundary, **comps
        )
    else:
        pipe = WanPipeline(boundary_ratio=spec.boundary, expand_timesteps=spec.expand_timesteps, **comps)
    return _replace_dir(Path(path), lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _replace_dir(path: Path, write) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``path``, then put it in ``path``'s place in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_checkpoint(spec: ModelSpec, cache_dir: Path) -> Path:
    """The cached tiny checkpoint of ``spec``, built on first use."""
    path = cache_dir / "tiny" / f"{spec.name}-v{TINY_FORMAT}"
    marker = "config.json" if spec.task == "s2v" else "model_index.json"
    if not (path / marker).is_file():
        save_tiny_checkpoint(spec, path)
    return path


def save_tiny_official_checkpoint(spec: ModelSpec, path: str | Path, shards: int = 2) -> Path:
    """Write the same tiny weights as ``save_tiny_checkpoint`` in the official Wan2.2 layout (official file names,
    folders and key names; every tensor in fp32, where the published umt5 file is bf16) to ``path``."""
    from artifex.models.official import write_official_checkpoint

    comps = build_components(spec)
    experts = [comps["transformer"]] + ([comps["transformer_2"]] if spec.experts == 2 else [])
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    return write_official_checkpoint(spec, path, experts=experts, vae=comps["vae"], text_encoder=comps["text_encoder"],
                                     tokenizer=comps["tokenizer"], shards=shards, audio=comps["audio"])
