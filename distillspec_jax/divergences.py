"""Per-token divergences between the target p and the draft q: the registry the loss picks from.

Design §3. Notation: p is the target's next-token distribution, q the draft's, both over the real
vocabulary (padding rows masked) and both at the sampling temperature used at decode time, formed by
`sampling.filtered_logits` (the one place distributions are formed).

Registry. A divergence is one function `(p_logits [..., V], q_logits [..., V]) -> values [...]`,
registered under its config name with `@register(name)`. Adding one = a function + a test. The loss
around them (chunking, token selection, the masked global mean) is `objective.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from distillspec_jax.sampling import MASK_VALUE

# (p_logits [..., V], q_logits [..., V], **hyperparameters) -> per-token values [...]
DivergenceFn = Callable[..., jax.Array]

@dataclasses.dataclass(frozen=True)
class Divergence:
    """A registered divergence and what it needs."""

    fn: DivergenceFn
    uses_target: bool = True  # False: p is the one-hot of the next token (labels), no target model
    hyperparams: tuple[str, ...] = ()  # LossSpec fields passed to fn as keyword arguments


DIVERGENCES: dict[str, Divergence] = {}


def register(name: str, *, uses_target: bool = True, hyperparams: tuple[str, ...] = ()):
    """Decorator: registers a per-token divergence under its config name."""

    def add(fn: DivergenceFn) -> DivergenceFn:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = Divergence(fn, uses_target, hyperparams)
        return fn

    return add


def _log_probs(logits_tv: jax.Array) -> jax.Array:
    # Masked entries hold MASK_VALUE (finite), so they get log-probability ~-1e30 and probability
    # exactly 0; every `p * (log p - log q)` below is then 0 * 0 for them, never 0 * inf = NaN.
    return jax.nn.log_softmax(logits_tv.astype(jnp.float32), axis=-1)


def _kl(logp_tv: jax.Array, logq_tv: jax.Array) -> jax.Array:
    """KL(p‖q) = Σ_v p (log p − log q) from log-probabilities; returns [...]."""
    return jnp.sum(jnp.exp(logp_tv) * (logp_tv - logq_tv), axis=-1)


@register("fkl")
def forward_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p‖q): mass-covering; the draft is pushed to put mass wherever the target does."""
    return _kl(_log_probs(p_logits), _log_probs(q_logits))


@register("rkl")
def reverse_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(q‖p): mode-seeking; the draft is penalised for mass where the target has little."""
    return _kl(_log_probs(q_logits), _log_probs(p_logits))


@register("jsd", hyperparams=("jsd_beta",))
def jensen_shannon(p_logits: jax.Array, q_logits: jax.Array, jsd_beta: float = 0.5) -> jax.Array:
    """JSD[β] = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; bounded by the entropy of Bernoulli(β).

    log m is a logsumexp of log β + log p and log(1−β) + log q, so it stays finite and accurate where
    p or q underflow. β = 0 or 1 makes m equal q or p and JSD identically 0.
    """
    if jsd_beta in (0.0, 1.0):
        return jnp.zeros(jnp.broadcast_shapes(p_logits.shape, q_logits.shape)[:-1], jnp.float32)
    logp, logq = _log_probs(p_logits), _log_probs(q_logits)
    logm = jnp.logaddexp(math.log(jsd_beta) + logp, math.log1p(-jsd_beta) + logq)
    return jsd_beta * _kl(logp, logm) + (1.0 - jsd_beta) * _kl(logq, logm)


@register("tvd")
def total_variation(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """TVD = ½ Σ_v |p − q| ∈ [0, 1]; 1 − TVD = Σ min(p, q) is the speculative acceptance probability."""
    p, q = jnp.exp(_log_probs(p_logits)), jnp.exp(_log_probs(q_logits))
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


@register("ce", uses_target=False)
def cross_entropy(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """H(p, q) = −Σ p log q. With p the one-hot of the next token (how the loss calls it, since 'ce'
    uses no target model) this is the usual next-token cross-entropy, −log q(label): supervised
    baselines and training models from scratch."""
    return -jnp.sum(jnp.exp(_log_probs(p_logits)) * _log_probs(q_logits), axis=-1)


def one_hot_logits(labels_bt: jax.Array, vocab_size: int) -> jax.Array:
    """Logits [B, T, V] of the point mass on each label: 0 at the label, MASK_VALUE elsewhere."""
    hit_btv = labels_bt[..., None] == jnp.arange(vocab_size)
    return jnp.where(hit_btv, 0.0, MASK_VALUE).astype(jnp.float32)
