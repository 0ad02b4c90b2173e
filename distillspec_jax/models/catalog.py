"""Every model family by name: the published presets of dense Qwen3 and Qwen3-MoE, and the config class of each
`model_type` (HF config.json's, and the one written beside a converted model)."""

from __future__ import annotations

import dataclasses
from typing import Any

from distillspec_jax.models import qwen3, qwen3_moe

CONFIG_CLASSES: dict[str, type[qwen3.Qwen3Config]] = {
    cls.model_type: cls for cls in (qwen3.Qwen3Config, qwen3_moe.Qwen3MoeConfig)}
PRESETS: dict[str, qwen3.Qwen3Config] = {**qwen3.PRESETS, **qwen3_moe.PRESETS}


def preset(name: str, **overrides: Any) -> qwen3.Qwen3Config:
    """A published shape by name ('Qwen3-0.6B', 'Qwen/Qwen3-30B-A3B', ...), with field overrides."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ValueError(f"unknown Qwen3 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides)


def is_moe(cfg: qwen3.Qwen3Config) -> bool:
    return isinstance(cfg, qwen3_moe.Qwen3MoeConfig)


def config_to_dict(cfg: qwen3.Qwen3Config) -> dict[str, Any]:
    """Every field, plus the model_type that `config_from_dict` reads back."""
    return {"model_type": cfg.model_type, **dataclasses.asdict(cfg)}


def config_from_dict(fields: dict[str, Any], **overrides: Any) -> qwen3.Qwen3Config:
    """The config `config_to_dict` wrote; a dict without model_type (written before MoE existed) is dense."""
    fields = {**fields, **overrides}
    model_type = fields.pop("model_type", qwen3.Qwen3Config.model_type)
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; this project implements {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[model_type](**fields)
