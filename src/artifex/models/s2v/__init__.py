"""Wan2.2 S2V-14B (speech-to-video): the transformer, its official-key converter and its audio features.

Importing this package registers the official S2V transformer's converter with ``artifex.models.official``
(which imports it on first need), so an official-layout S2V checkpoint loads like the other models'.
"""

from artifex.models import official
from artifex.models.s2v.convert import config_from_official, convert_s2v_state_dict
from artifex.models.s2v.transformer import WanS2VTransformer3DModel, tiny_s2v_config, tiny_s2v_transformer


def _build(spec, config: dict) -> WanS2VTransformer3DModel:
    return WanS2VTransformer3DModel(**config_from_official(config))


official.register_transformer_format("s2v", _build, convert_s2v_state_dict)

__all__ = [
    "WanS2VTransformer3DModel",
    "config_from_official",
    "convert_s2v_state_dict",
    "tiny_s2v_config",
    "tiny_s2v_transformer",
]
