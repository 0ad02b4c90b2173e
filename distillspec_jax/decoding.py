"""What autoregressive (`generate.py`) and speculative (`speculative.py`) decoding share: the checks of their
inputs on the host, the cache length they need, the prefill and the EOS test.

Conventions of both loops:
  * Prompts of different lengths are right-padded to a common T and described by `prompt_lens_b`.
  * The prefill writes each prompt *except its last token* into the cache; decoding starts by
    feeding that last token. The prefill's logits are never used, so XLA drops its [B, T, V] LM-head
    product, and a prompt of a single token needs no special case.
  * Row b stops after it emits one of `eos_ids` (the EOS is emitted and counted) or after
    `max_new_tokens` tokens. Slots after a row's end hold `pad_id`.

Dimension letters (style.md): B batch, T prompt positions (right-padded).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax import checks
from distillspec_jax.models import qwen3
from distillspec_jax.sampling import Sampler

DEFAULT_PAD_ID = 0  # written after a row's end; any id works since lengths/masks say what is real


# ----------------------------------------------------------------------------------------------
# Validation (runs on the host, before anything is traced)
# ----------------------------------------------------------------------------------------------


def normalize_eos_ids(eos_ids: int | Iterable[int] | None, vocab_size: int) -> tuple[int, ...]:
    """A sorted tuple of distinct EOS ids (hashable, so it can be static); None or () means no EOS."""
    if eos_ids is None:
        return ()
    ids = (int(eos_ids),) if isinstance(eos_ids, (int, np.integer)) else tuple(int(i) for i in eos_ids)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"eos ids {bad} are outside the vocabulary [0, {vocab_size})")
    return tuple(sorted(set(ids)))


def check_sampler(sampler: Sampler) -> None:
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a sampling.Sampler, got {type(sampler).__name__}")
    # Sampler validates itself on construction; this repeats the check in case it was bypassed, so a
    # negative temperature never reaches a trace (where it would silently sharpen and flip logits).
    if sampler.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {sampler.temperature}")


def check_prompts(cfg: qwen3.Qwen3Config, prompts_bt, prompt_lens_b, max_new_tokens: int) -> tuple[int, int]:
    """Checks shapes (and, when concrete, the ids' and lengths' values). Returns (B, T)."""
    if np.ndim(prompts_bt) != 2:
        raise ValueError(f"prompts must be [B, T] token ids, got shape {np.shape(prompts_bt)}")
    batch, prompt_len = np.shape(prompts_bt)
    if batch == 0:
        raise ValueError("empty batch: prompts has 0 rows")
    if prompt_len == 0:
        raise ValueError("prompts have 0 positions; every prompt needs at least one token")
    if np.shape(prompt_lens_b) != (batch,):
        raise ValueError(f"prompt_lens must have shape [B] = ({batch},), got {np.shape(prompt_lens_b)}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    checks.check_token_ids(cfg, prompts_bt, "prompts")
    lens = checks.concrete(prompt_lens_b)
    if lens is not None and (lens.min() < 1 or lens.max() > prompt_len):
        raise ValueError(
            f"prompt_lens must lie in [1, T={prompt_len}] (right-padded prompts), got min {lens.min()} max {lens.max()}"
        )
    return int(batch), int(prompt_len)


def default_rng(rng: jax.Array | None, sampler: Sampler) -> jax.Array:
    """The caller's key, or a fixed one for greedy decoding (which draws nothing); sampling needs a key."""
    if rng is not None:
        return rng
    if not sampler.greedy:
        raise ValueError("sampling at temperature > 0 needs an rng key")
    return jax.random.key(0)


def check_cache_len(cfg: qwen3.Qwen3Config, prompt_len: int, required: int, cache_len: int | None,
                    what: str) -> int:
    """Resolves the KV cache length: `required` slots unless the caller fixed one, and never past the
    model's trained positions. Raising here matters: `dynamic_update_slice` would silently clamp an
    out-of-range write, overwriting the last valid cache entries instead of failing."""
    if cache_len is None:
        cache_len = required
    if prompt_len > cache_len:
        raise ValueError(f"prompts of padded length {prompt_len} do not fit in a KV cache of {cache_len} slots")
    if required > cache_len:
        raise ValueError(f"{what} needs a KV cache of {required} slots, but cache_len={cache_len}")
    if required > cfg.max_position_embeddings:
        raise ValueError(
            f"{what} needs positions up to {required - 1}, beyond the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}; shorten the prompts or the budget"
        )
    return int(cache_len)


def required_cache_len(prompt_len: int, max_new_tokens: int, gamma: int = 0) -> int:
    """KV slots a run writes. gamma = 0 is autoregressive decoding: the prompt, then one per step; the final
    token is never fed. Speculative decoding (gamma >= 1): an active row has emitted e <= R - 1 tokens (R the
    budget), so committed <= T + R - 2, and the target writes γ + 1 slots from there (finished rows stop advancing, so
    they never go further)."""
    return prompt_len + max_new_tokens + gamma - 1


# ----------------------------------------------------------------------------------------------
# Traced pieces
# ----------------------------------------------------------------------------------------------


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Boolean mask, same shape as tokens: the token is one of eos_ids (all False when there are none)."""
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


def prefill(model: qwen3.Qwen3, prompts_bt: jax.Array, prompt_lens_b: jax.Array, cache_len: int) -> tuple[qwen3.KVCache, jax.Array]:
    """Writes every prompt but its last token into a fresh cache; returns (cache, last_b).

    The padded tail (and the last prompt token) are written too but lie beyond `lengths`, so they are
    masked and overwritten by decoding; the unused logits are dead code that XLA removes.
    """
    cache = qwen3.KVCache.init(model.cfg, prompts_bt.shape[0], cache_len)
    _, cache = model.step(prompts_bt, cache)
    last_b = jnp.take_along_axis(prompts_bt, (prompt_lens_b - 1)[:, None], axis=1)[:, 0]
    return cache.with_lengths(prompt_lens_b - 1), last_b
