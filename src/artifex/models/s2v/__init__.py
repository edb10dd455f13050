"""Wan2.2 S2V-14B (speech-to-video): the transformer, its official-key converter and its audio features."""

from artifex.models.s2v.convert import config_from_official, convert_s2v_state_dict
from artifex.models.s2v.transformer import WanS2VTransformer3DModel, tiny_s2v_config, tiny_s2v_transformer

__all__ = [
    "WanS2VTransformer3DModel",
    "config_from_official",
    "convert_s2v_state_dict",
    "tiny_s2v_config",
    "tiny_s2v_transformer",
]
