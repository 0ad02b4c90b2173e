"""The optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay (design §3)."""

from __future__ import annotations

import jax
import optax

from distillspec_jax.models import qwen3
from distillspec_jax.train.config import TrainConfig
from distillspec_jax.train.state import Params


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to end_lr_fraction · learning_rate.
    A run that is all warmup (warmup_steps == steps, e.g. a short AdaSPEC reference) only warms up."""
    if cfg.warmup_steps == cfg.steps:  # optax's cosine part refuses a decay of 0 steps
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.end_lr_fraction)


def is_matrix(shape: tuple[int, ...], path: tuple) -> bool:
    """Whether a parameter is a matrix (an embedding or a projection) rather than a norm's scale vector;
    parameters under a run of layers (`layers`, `layers_<start>`) carry the stacked layer dimension in front."""
    stacked = any(qwen3.is_run_name(getattr(k, "key", k)) for k in path)
    return len(shape) - stacked >= 2


def _decay_mask(params: Params) -> Params:
    # Decay matrices (embeddings, projections); norm weights are scales around 1 and are not decayed.
    return jax.tree_util.tree_map_with_path(lambda path, x: is_matrix(x.shape, path), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup + cosine schedule."""
    clip = optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity()
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        mask=_decay_mask)
    return optax.chain(clip, adamw)
