"""Autoregressive generation: a prefill, then a `lax.while_loop` of cached one-token decode steps, under jit.

This is both the baseline that speculative decoding is timed against and the sampler of distillation
data (target-generated and draft-generated responses, design §4).

Dimension letters (style.md): B batch, T prompt positions (right-padded), R new tokens (the response budget),
S positions of a packed prompt+response sequence, V vocabulary.

The prefill, the input checks and the stopping rule are shared with `speculative.py` (`decoding.py`).
Sampling: step i (0-based, counted over the whole batch) draws with key `fold_in(rng, i)` through
    `sampling.sample`, so a run is reproducible from `rng` alone.

Shapes, the sampler, the budget, EOS ids and the cache length are static: the jitted function is
cached by them and a second call with the same shapes does not compile again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distillspec_jax import decoding, sampling
from distillspec_jax.data import pipeline
from distillspec_jax.models import qwen3
from distillspec_jax.sampling import Sampler


class GenerationOutput(NamedTuple):
    """What `generate` returns.

    tokens: [B, R] int32, the new tokens of each row, `pad_id` after lengths[b].
    lengths: [B] int32, tokens emitted per row (an EOS that ended the row is included).
    sequences: [B, T + R] int32 or None: prompt[:prompt_lens[b]] ++ tokens[:lengths[b]] ++ pad,
      packed from position 0 so the sequence can be scored by one causal pass (distillation data).
    response_mask: [B, T + R] bool or None: True exactly at the response positions of `sequences`.
    """

    tokens: jax.Array
    lengths: jax.Array
    sequences: jax.Array | None = None
    response_mask: jax.Array | None = None


class _DecodeCarry(NamedTuple):
    """State of the decode loop. `last_b` is the newest token of each row, not yet in the cache."""

    cache: qwen3.KVCache
    last_b: jax.Array  # [B] int32
    tokens_br: jax.Array  # [B, R] int32
    lengths_b: jax.Array  # [B] int32
    done_b: jax.Array  # [B] bool
    step: jax.Array  # [] int32, loop iterations so far


# ----------------------------------------------------------------------------------------------
# The jitted decode
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("max_new_tokens", "sampler", "eos_ids", "pad_id", "cache_len", "return_sequences"),
)
def _generate_jit(graphdef, state, prompts_bt, prompt_lens_b, rng, *, max_new_tokens: int, sampler: Sampler,
                  eos_ids: tuple[int, ...], pad_id: int, cache_len: int, return_sequences: bool) -> GenerationOutput:
    model = nnx.merge(graphdef, state)
    real_v = model.cfg.real_vocab_size
    batch = prompts_bt.shape[0]
    cache, last_b = decoding.prefill(model, prompts_bt, prompt_lens_b, cache_len)

    def cond(c: _DecodeCarry) -> jax.Array:
        return (c.step < max_new_tokens) & ~jnp.all(c.done_b)

    def body(c: _DecodeCarry) -> _DecodeCarry:
        logits_b1v, cache = model.step(c.last_b[:, None], c.cache)
        new_b = sampling.sample(jax.random.fold_in(rng, c.step), logits_b1v[:, 0], sampler, real_v)
        new_b = jnp.where(c.done_b, pad_id, new_b)  # finished rows keep stepping but emit nothing
        tokens_br = jax.lax.dynamic_update_slice_in_dim(c.tokens_br, new_b[:, None], c.step, axis=1)
        return _DecodeCarry(
            cache=cache,
            last_b=new_b,
            tokens_br=tokens_br,
            lengths_b=c.lengths_b + (~c.done_b).astype(jnp.int32),
            done_b=c.done_b | decoding.is_eos(new_b, eos_ids),
            step=c.step + 1,
        )

    init = _DecodeCarry(
        cache=cache,
        last_b=last_b,
        tokens_br=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        lengths_b=jnp.zeros((batch,), jnp.int32),
        done_b=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
    )
    out = jax.lax.while_loop(cond, body, init)
    if not return_sequences:
        return GenerationOutput(out.tokens_br, out.lengths_b)
    sequences_bs, response_mask_bs = pipeline.pack_sequences(prompts_bt, prompt_lens_b, out.tokens_br, out.lengths_b,
                                                             pad_id)
    return GenerationOutput(out.tokens_br, out.lengths_b, sequences_bs, response_mask_bs)


def generate(
    model: qwen3.Qwen3,
    prompts_bt,
    prompt_lens_b,
    max_new_tokens: int,
    sampler: Sampler = Sampler(temperature=0.0),
    rng: jax.Array | None = None,
    *,
    eos_ids: int | Iterable[int] | None = (),
    pad_id: int = decoding.DEFAULT_PAD_ID,
    cache_len: int | None = None,
    return_sequences: bool = False,
) -> GenerationOutput:
    """Samples up to `max_new_tokens` tokens after each right-padded prompt.

    prompts_bt: [B, T] int token ids, right-padded. prompt_lens_b: [B] int, each in [1, T].
    sampler: greedy (temperature 0) or temperature sampling with optional top-k / top-p.
    rng: a PRNG key (needed only when sampling; greedy ignores it).
    eos_ids: ids that end a row (emitted and counted). cache_len: KV slots (default: the minimum).
    return_sequences: also return packed prompt+response sequences and their response mask.
    """
    decoding.check_sampler(sampler)
    cfg = model.cfg
    batch, prompt_len = decoding.check_prompts(cfg, prompts_bt, prompt_lens_b, max_new_tokens)
    eos = decoding.normalize_eos_ids(eos_ids, cfg.vocab_size)
    what = f"generating {max_new_tokens} tokens after prompts of length {prompt_len}"
    cache_len = decoding.check_cache_len(cfg, prompt_len, decoding.required_cache_len(prompt_len, max_new_tokens),
                                         cache_len, what)
    rng = decoding.default_rng(rng, sampler)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef, state, jnp.asarray(prompts_bt, jnp.int32), jnp.asarray(prompt_lens_b, jnp.int32), rng,
        max_new_tokens=int(max_new_tokens), sampler=sampler, eos_ids=eos, pad_id=int(pad_id), cache_len=cache_len,
        return_sequences=bool(return_sequences),
    )


def compiled_cache_size() -> int:
    """Number of compiled variants of the decode function (tests use it to prove there are no recompiles)."""
    return _generate_jit._cache_size()
