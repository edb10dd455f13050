"""Components with random weights at the real shapes, built in memory (no checkpoint): for benchmarks.

Weights are initialised on ``build_device`` (a GPU initialises billions of parameters in seconds), cast to their
run-time dtypes, and left in CPU memory, where the engine's placement takes them from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from artifex.models.loader import DTYPES, CheckpointInfo, Components, cast_keeping_fp32
from artifex.models.registry import ModelSpec


def random_components(spec: ModelSpec, precision: str = "bf16", build_device: str | torch.device = "cpu",
                      seed: int = 0) -> Components:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from artifex.models.configs import text_encoder_config, transformer_for, vae_kwargs
    from artifex.models.tiny import build_tokenizer

    dtype = DTYPES[precision]
    torch.manual_seed(seed)

    def build(make, cast):
        with torch.device(build_device):
            module = cast(make())
        module = module.to("cpu").eval()
        if torch.device(build_device).type == "cuda":
            torch.cuda.empty_cache()
        return module

    text_encoder = build(lambda: UMT5EncoderModel(text_encoder_config(spec)), lambda m: m.to(dtype))
    vae = build(lambda: AutoencoderKLWan(**vae_kwargs(spec)), lambda m: m)
    experts = [build(lambda: transformer_for(spec, WanTransformer3DModel), lambda m: cast_keeping_fp32(m, dtype))
               for _ in range(spec.experts)]
    audio = extractor = None
    if spec.task == "s2v":  # wav2vec2-large-xlsr-53's shape (tiny: the tiny twin's), fp32 as the official code runs it
        from artifex.models.s2v.audio import feature_extractor, tiny_wav2vec, wav2vec2_large

        audio = build(lambda: (tiny_wav2vec(seed) if spec.tiny else wav2vec2_large())[0], lambda m: m)
        extractor = feature_extractor()
    sizes = {"text_encoder": 0, "vae": 0}
    info = CheckpointInfo(path=Path(f"random:{spec.name}"), weight_bytes=sizes, boundary_ratio=spec.boundary)
    scheduler = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 2,
                 "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": spec.shift}
    return Components(tokenizer=build_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler_config=scheduler,
                      experts=experts, info=info, audio_encoder=audio, feature_extractor=extractor)
