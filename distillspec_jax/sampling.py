"""How a next-token distribution is formed from logits: vocabulary padding mask, temperature, top-k, top-p.

One function, `filtered_logits`, serves every place that forms a distribution: autoregressive
sampling, the draft and the target inside speculative decoding (the same filters on p and q keep
rejection sampling lossless for the filtered target distribution), and the divergences.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The model's finite minus infinity (its attention masks with it too): exp() of it is exactly 0, and
# 0 * (MASK_VALUE - MASK_VALUE) stays 0 where -inf would give NaN in p * (log p - log q).
from distillspec_jax.models.qwen3 import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A decoding strategy. Hashable, so it can be a static argument of a jitted function."""

    temperature: float = 1.0  # softmax temperature; 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # keep the smallest set of tokens with probability >= top_p; 1 disables

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_padding_vocab(logits_tv: jax.Array, real_vocab_size: int) -> jax.Array:
    """Sets the logits of vocabulary padding rows (ids >= real_vocab_size) to MASK_VALUE.

    Applied wherever a distribution is formed (divergences, sampling), for target and draft alike:
    the padding rows of a checkpoint hold untrained weights and must never receive probability mass.
    """
    if real_vocab_size >= logits_tv.shape[-1]:
        return logits_tv
    real_v = jnp.arange(logits_tv.shape[-1]) < real_vocab_size
    return jnp.where(real_v, logits_tv, MASK_VALUE)


def filtered_logits(logits_bv: jax.Array, sampler: Sampler, real_vocab_size: int) -> jax.Array:
    """float32 logits [..., V] of the distribution `sampler` draws from; removed ids hold MASK_VALUE.

    Greedy samplers keep temperature 1 here: the argmax does not depend on it, and the divergences
    and analytic acceptance of a greedy run are taken at temperature 1.
    """
    logits = logits_bv.astype(jnp.float32)
    if not sampler.greedy:
        # Before masking: MASK_VALUE / T overflows to -inf for a tiny T, and 0 · (-inf) in a KL is NaN.
        logits = logits / sampler.temperature
    logits = mask_padding_vocab(logits, real_vocab_size)
    if sampler.top_k:
        kth_largest = jax.lax.top_k(logits, sampler.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, MASK_VALUE)
    if sampler.top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs_desc = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs_desc, axis=-1) - probs_desc
        # The smallest logit still inside the nucleus; the most likely token is always kept.
        kept = jnp.where(mass_before < sampler.top_p, sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, MASK_VALUE)
    return logits


def probs(logits_bv: jax.Array, sampler: Sampler, real_vocab_size: int) -> jax.Array:
    """The sampled distribution [..., V]: one-hot argmax when greedy, else softmax of filtered logits."""
    logits = filtered_logits(logits_bv, sampler, real_vocab_size)
    if sampler.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def sample(rng: jax.Array, logits_bv: jax.Array, sampler: Sampler, real_vocab_size: int) -> jax.Array:
    """Draws token ids [...] (int32) from the filtered distribution, or the argmax when greedy."""
    logits = filtered_logits(logits_bv, sampler, real_vocab_size)
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
