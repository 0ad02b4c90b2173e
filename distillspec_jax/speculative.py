"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a draft and a target Qwen3, and its statistics.

One block, for every row b at once (design §5):
  1. The draft proposes x_1..x_γ autoregressively from its own cache, keeping q_i(·).
  2. The target scores [last, x_1..x_γ] in ONE `step` call, giving p_1..p_{γ+1}.
  3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn
     from norm(max(p_i − q_i, 0)); if all γ are accepted a bonus token is drawn from p_{γ+1}.
     At temperature 0 this is: accept while x_i = argmax p_i, then emit argmax p at the first mismatch.
     With a lenience form (lossy, DistillSpec §5; `lenience.py`) the test is min(1, f(p_i(x_i), ε) / q_i(x_i))
     and everything else stays: the static form's name selects f, ε is traced (one program for a sweep),
     and lenience=None is the lossless program itself. Greedy decoding keeps its exact rule.
  4. Each row advances by (accepted + 1) tokens, truncated at its first EOS and at its budget, and
     both caches roll back per row by lowering their lengths.

Dimension letters (style.md): B batch, T prompt positions (right-padded), P positions of one block (γ draft
proposals, or γ + 1 target positions with the bonus), R new tokens (the response budget), V vocabulary.

Cache bookkeeping. Per row, `committed_b` counts the tokens before `last_b` (the newest emitted token,
or the last prompt token), and both caches hold valid entries for exactly those. The target verifies
[last, x_1..x_γ] at slots committed..committed+γ; after accepting n it keeps committed + 1 + n.
The draft, having fed last, x_1..x_{γ-1}, already holds every accepted token *except* x_γ after a full
accept. Rather than a conditional extra draft call for those rows, every block's first draft step feeds
two tokens, [prev, last], starting one slot back: re-writing prev's entry (same token, same position,
same prefix) is harmless, and after a full accept prev = x_γ is exactly the missing entry. A row with
no token before `last` (a one-token prompt, first block) feeds [last, last] from slot 0 and reads the
logits of index 0; the second copy lies beyond the length and is overwritten by x_1.

Kept teacher (online learning while serving). With keep_top_k = k > 0 the loop also returns, for every emitted
token, the target's top-k log-probabilities and tail at the position that generated it (`sparse_teacher.TopK`,
at `teacher_temperature`): the distributions the verify call already computed, so keeping them costs one top-k per
block and no extra model call. Index i of a block's target logits generates candidate i (x_{i+1}, or y at the end),
so the kept rows are written beside the emitted tokens, in the same slots.

Statistics (per row, so callers can aggregate over rows and batches; design §5 definitions):
  target_calls: blocks in which the row was active; τ = Σ emitted / Σ target_calls.
  accepted / proposed: draft tokens accepted by verification (the leading accepts, n per block, even if
    an EOS or the budget then truncates the emission) / γ per block; α = Σ accepted / Σ proposed.
  accepted_at[i]: blocks in which x_{i+1} was accepted; a_i = Σ accepted_at[i] / Σ target_calls.
  lenient_accepted: accepted draft tokens that the lossless test (same uniform) would have rejected.
  batch_blocks: iterations of the batched loop, which runs until its slowest row is done (wall time).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distillspec_jax import checks, decoding, lenience as lenience_forms, sparse_teacher
from distillspec_jax import sampling
from distillspec_jax.data import pipeline
from distillspec_jax.models import qwen3
from distillspec_jax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class AcceptanceRule:
    """How verification accepts draft tokens and what it emits at the first rejection, per row and position.

    accept(p_x_bp, q_x_bp, u_bp) -> bool [B, γ]: whether x_i passes, from p_i(x_i), q_i(x_i) and a uniform u_i.
    residual(p_bv, q_bv) -> [B, V] unnormalised weights of the token emitted after a rejection (with q = 0,
      after a full accept, the bonus token).
    """

    accept: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    residual: Callable[[jax.Array, jax.Array], jax.Array]


def lossless_accept(p_x_bp: jax.Array, q_x_bp: jax.Array, u_bp: jax.Array) -> jax.Array:
    """u < min(1, p/q), written without the division: q(x) > 0 because x was drawn from q, and p >= q accepts
    surely."""
    return u_bp * q_x_bp < p_x_bp


def lossless_residual(p_bv: jax.Array, q_bv: jax.Array) -> jax.Array:
    """max(p − q, 0), normalised by the draw: the correction that makes the output follow p exactly."""
    return jnp.maximum(p_bv - q_bv, 0.0)


# Name -> rule. "lossless" (Leviathan et al.; Chen et al.) is the one production rule and the default; the
# lossy rules of DistillSpec §5 keep it and relax the p(x) it tests (`lenience=`, forms in lenience.py). Tests
# register deliberately wrong rules to show that the lossless-sampling test has power; they are not part of
# this module.
ACCEPTANCE_RULES: dict[str, AcceptanceRule] = {"lossless": AcceptanceRule(lossless_accept, lossless_residual)}


def register_acceptance_rule(name: str, rule: AcceptanceRule) -> AcceptanceRule:
    """Adds `rule` under `name` (refused if the name is taken), so that `speculative_generate(..., acceptance=name)`
    runs it."""
    if name in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance rule {name!r} is already registered")
    ACCEPTANCE_RULES[name] = rule
    return rule

# Split of each block's PRNG key: draft proposals, acceptance uniforms, the correction/bonus draw.
_KEY_DRAFT, _KEY_ACCEPT, _KEY_CORRECTION = range(3)


class SpeculativeStats(NamedTuple):
    """Per-row int32 counters of one run (see the module docstring). Sum over rows to aggregate."""

    target_calls: jax.Array  # [B] blocks the row was active in (one target call each)
    draft_calls: jax.Array  # [B] draft forward steps the row took part in (γ per block)
    proposed: jax.Array  # [B] draft tokens proposed (γ per block)
    accepted: jax.Array  # [B] draft tokens accepted by verification
    emitted: jax.Array  # [B] tokens emitted (= the row's length)
    accepted_at: jax.Array  # [B, γ] blocks in which x_i was accepted, per draft position i
    # [B] iterations of the batched loop that ran the row (the same for every row of a batch): rows advance in
    # lockstep, so wall time follows this count, the slowest row's number of blocks.
    batch_blocks: jax.Array
    lenient_accepted: jax.Array  # [B] accepted draft tokens the lossless test would have rejected (lossy rule)


class SpeculativeOutput(NamedTuple):
    """tokens: [B, R] int32 (pad_id after the end); lengths: [B] int32; stats: per-row counters;
    sequences / response_mask: [B, T + R] as in `generate.GenerationOutput` when requested, else None;
    teacher: with keep_top_k, the target's TopK ([B, R, k], [B, R]) that generated each emitted token, else None."""

    tokens: jax.Array
    lengths: jax.Array
    stats: SpeculativeStats
    sequences: jax.Array | None = None
    response_mask: jax.Array | None = None
    teacher: sparse_teacher.TopK | None = None


class _BlockCarry(NamedTuple):
    """State of the block loop; per-row fields are [B]."""

    target_cache: qwen3.KVCache
    draft_cache: qwen3.KVCache
    committed_b: jax.Array  # tokens before last_b, all held by both caches (target's true length)
    last_b: jax.Array  # newest token, not yet in either cache
    prev_b: jax.Array  # the token before last_b (meaningful when committed_b >= 1)
    tokens_br: jax.Array  # [B, R + γ + 1] output buffer; the slack absorbs a whole block's write at any start
    teacher_br: sparse_teacher.TopK | None  # keep_top_k: the target's top-k beside each token, [B, R + γ + 1, ...]
    done_b: jax.Array  # bool: the row emitted EOS or reached its budget
    block: jax.Array  # [] int32, iterations so far (keys each block's randomness)
    stats: SpeculativeStats


def _propose(rng: jax.Array, logits_bv: jax.Array, sampler: Sampler, real_v: int) -> tuple[jax.Array, jax.Array | None]:
    """One draft token per row and the distribution q it was drawn from (None when greedy: unused)."""
    x_b = sampling.sample(rng, logits_bv, sampler, real_v)
    return x_b, None if sampler.greedy else sampling.probs(logits_bv, sampler, real_v)


def _draft_block(draft: qwen3.Qwen3, cache: qwen3.KVCache, committed_b, prev_b, last_b, rng, gamma: int,
                 sampler: Sampler):
    """The draft's γ proposals: x_bp [B, γ], q_bpv [B, γ, V] (None when greedy), and its advanced cache."""
    real_v = draft.cfg.real_vocab_size
    has_prev_b = committed_b >= 1
    # First step: [prev, last] from slot committed - 1, which also (re)writes prev (see the module docstring).
    pair_b2 = jnp.stack([jnp.where(has_prev_b, prev_b, last_b), last_b], axis=1)
    logits_b2v, cache = draft.step(pair_b2, cache.with_lengths(jnp.maximum(committed_b - 1, 0)))
    logits_bv = jnp.take_along_axis(logits_b2v, has_prev_b.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    cache = cache.with_lengths(committed_b + 1)
    x1_b, q1_bv = _propose(jax.random.fold_in(rng, 0), logits_bv, sampler, real_v)
    if gamma == 1:
        return x1_b[:, None], None if q1_bv is None else q1_bv[:, None], cache

    def one_step(carry, i):
        cache, x_b = carry
        logits_b1v, cache = draft.step(x_b[:, None], cache)
        x_b, q_bv = _propose(jax.random.fold_in(rng, i), logits_b1v[:, 0], sampler, real_v)
        return (cache, x_b), (x_b, q_bv)

    (cache, _), (x_pb, q_pbv) = jax.lax.scan(one_step, (cache, x1_b), jnp.arange(1, gamma))
    x_bp = jnp.concatenate([x1_b[:, None], x_pb.T], axis=1)
    q_bpv = None if q1_bv is None else jnp.concatenate([q1_bv[:, None], jnp.swapaxes(q_pbv, 0, 1)], axis=1)
    return x_bp, q_bpv, cache


def _verify(logits_bpv: jax.Array, x_bp: jax.Array, q_bpv: jax.Array | None, rng: jax.Array, sampler: Sampler,
            real_v: int, rule: AcceptanceRule, lenience: str | None = None,
            epsilon: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Modified rejection sampling. logits_bpv: target logits [B, γ+1, V]. Returns (n_b accepted, y_b emitted,
    lenient_b: how many of the n accepted the lossless test would have rejected; None without lenience).
    With `lenience`, the test compares f(p(x), ε) instead of p(x) (sampling only: the caller refuses greedy)."""
    gamma = x_bp.shape[1]
    key_accept, key_correction = jax.random.fold_in(rng, _KEY_ACCEPT), jax.random.fold_in(rng, _KEY_CORRECTION)
    if sampler.greedy:
        # Temperature 0: p and q are one-hot at their argmax, so p(x) = 1[x = argmax p], q(x) = 1, and no uniform
        # is drawn (u = 0: the lossless test accepts iff x_i = argmax p_i). norm(max(p - q, 0)) at a mismatch is
        # that same one-hot: emit the target's argmax.
        target_argmax_bp = jnp.argmax(sampling.filtered_logits(logits_bpv, sampler, real_v), axis=-1).astype(jnp.int32)
        p_x_bp = (x_bp == target_argmax_bp[:, :gamma]).astype(jnp.float32)
        q_x_bp, u_bp = jnp.ones_like(p_x_bp), jnp.zeros_like(p_x_bp)
    else:
        p_bpv = sampling.probs(logits_bpv, sampler, real_v)
        p_x_bp = jnp.take_along_axis(p_bpv[:, :gamma], x_bp[..., None], axis=-1)[..., 0]
        q_x_bp = jnp.take_along_axis(q_bpv, x_bp[..., None], axis=-1)[..., 0]
        u_bp = jax.random.uniform(key_accept, x_bp.shape)
    lenient_b = None
    if lenience is None:
        accept_bp = rule.accept(p_x_bp, q_x_bp, u_bp)
        n_b = jnp.sum(jnp.cumprod(accept_bp.astype(jnp.int32), axis=1), axis=1)  # the leading accepts
    else:
        accept_bp = rule.accept(lenience_forms.lenient_p(p_x_bp, lenience, epsilon), q_x_bp, u_bp)
        leading_bp = jnp.cumprod(accept_bp.astype(jnp.int32), axis=1)
        n_b = jnp.sum(leading_bp, axis=1)
        lenient_b = jnp.sum(leading_bp * (~rule.accept(p_x_bp, q_x_bp, u_bp)).astype(jnp.int32), axis=1)
    if sampler.greedy:
        return n_b, jnp.take_along_axis(target_argmax_bp, n_b[:, None], axis=1)[:, 0], lenient_b

    # The residual at index n: norm(max(p_n - q_n, 0)) after a rejection; with q padded by a zero
    # distribution at index γ, the same formula yields p_{γ+1} for the bonus token after a full accept.
    q_padded_bpv = jnp.concatenate([q_bpv, jnp.zeros_like(q_bpv[:, :1])], axis=1)
    p_n_bv = jnp.take_along_axis(p_bpv, n_b[:, None, None], axis=1)[:, 0]
    q_n_bv = jnp.take_along_axis(q_padded_bpv, n_b[:, None, None], axis=1)[:, 0]
    residual_bv = rule.residual(p_n_bv, q_n_bv)
    # A rejection implies p(x) < q(x) (also under lenience: f(p) >= p), hence some mass where p > q; only
    # rounding can leave none, and then p itself is the (indistinguishable) answer.
    residual_bv = jnp.where(jnp.sum(residual_bv, axis=-1, keepdims=True) > 0, residual_bv, p_n_bv)
    log_residual_bv = jnp.where(residual_bv > 0, jnp.log(jnp.where(residual_bv > 0, residual_bv, 1.0)), qwen3.MASK_VALUE)
    y_b = jax.random.categorical(key_correction, log_residual_bv, axis=-1).astype(jnp.int32)
    return n_b, y_b, lenient_b


@functools.partial(
    jax.jit,
    static_argnums=(0, 1),
    static_argnames=("gamma", "max_new_tokens", "sampler", "eos_ids", "pad_id", "cache_len", "return_sequences",
                     "acceptance", "keep_top_k", "teacher_temperature", "lenience"),
)
def _speculative_jit(target_graphdef, draft_graphdef, target_state, draft_state, prompts_bt, prompt_lens_b, rng,
                     epsilon, *, gamma: int, max_new_tokens: int, sampler: Sampler, eos_ids: tuple[int, ...],
                     pad_id: int, cache_len: int, return_sequences: bool, acceptance: str, keep_top_k: int,
                     teacher_temperature: float, lenience: str | None) -> SpeculativeOutput:
    target = nnx.merge(target_graphdef, target_state)
    draft = nnx.merge(draft_graphdef, draft_state)
    real_v = target.cfg.real_vocab_size
    batch = prompts_bt.shape[0]
    i_1p = jnp.arange(gamma + 1)[None, :]

    target_cache, last_b = decoding.prefill(target, prompts_bt, prompt_lens_b, cache_len)
    draft_cache, _ = decoding.prefill(draft, prompts_bt, prompt_lens_b, cache_len)
    prev_b = jnp.take_along_axis(prompts_bt, jnp.maximum(prompt_lens_b - 2, 0)[:, None], axis=1)[:, 0]

    def body(c: _BlockCarry) -> _BlockCarry:
        key = jax.random.fold_in(rng, c.block)
        active_b = ~c.done_b
        emitted_b = c.stats.emitted

        x_bp, q_bpv, draft_cache = _draft_block(draft, c.draft_cache, c.committed_b, c.prev_b, c.last_b,
                                                jax.random.fold_in(key, _KEY_DRAFT), gamma, sampler)
        # The target's single call: [last, x_1..x_γ] at slots committed..committed+γ (its cache length).
        logits_bpv, target_cache = target.step(jnp.concatenate([c.last_b[:, None], x_bp], axis=1), c.target_cache)
        n_b, y_b, lenient_b = _verify(logits_bpv, x_bp, q_bpv, key, sampler, real_v, ACCEPTANCE_RULES[acceptance],
                                      lenience, epsilon)

        # Tokens this block would emit: x_1..x_n then y; cut after the first EOS and at the budget.
        x_padded_bp = jnp.concatenate([x_bp, jnp.zeros_like(x_bp[:, :1])], axis=1)
        candidates_bp = jnp.where(i_1p < n_b[:, None], x_padded_bp, y_b[:, None])
        eos_bp = decoding.is_eos(candidates_bp, eos_ids) & (i_1p <= n_b[:, None])
        up_to_eos_b = jnp.where(jnp.any(eos_bp, axis=1), jnp.argmax(eos_bp, axis=1) + 1, n_b + 1)
        count_b = jnp.minimum(up_to_eos_b, max_new_tokens - emitted_b)
        count_b = jnp.where(active_b, count_b, 0)
        block_out_bp = jnp.where(i_1p < count_b[:, None], candidates_bp, pad_id)
        # Everything at and beyond a row's emitted count is pad, so writing the whole padded block is safe;
        # the buffer's γ + 1 slack keeps the start unclamped even for finished rows (emitted = R).
        write = jax.vmap(lambda row, new, start: jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0))
        tokens_br = write(c.tokens_br, block_out_bp, emitted_b)
        teacher_br = None
        if keep_top_k:  # what generated each candidate; slots past the emitted count are overwritten later
            teacher_logits_bpv = sampling.filtered_logits(logits_bpv, Sampler(temperature=teacher_temperature), real_v)
            kept_bp = sparse_teacher.top_k(teacher_logits_bpv, keep_top_k)
            teacher_br = jax.tree.map(lambda buf, new: write(buf, new, emitted_b), c.teacher_br, kept_bp)

        new_emitted_b = emitted_b + count_b
        hit_eos_b = jnp.any(eos_bp & (i_1p < count_b[:, None]), axis=1)
        done_b = c.done_b | hit_eos_b | (new_emitted_b >= max_new_tokens)
        # Roll back: keep the old last token and the n accepted drafts; y becomes the new uncached last.
        # Finished rows stay where they are, which keeps every later write inside the cache.
        committed_b = jnp.where(active_b & ~done_b, c.committed_b + 1 + n_b, c.committed_b)
        prev_b = jnp.where(n_b >= 1, jnp.take_along_axis(x_padded_bp, jnp.maximum(n_b - 1, 0)[:, None], axis=1)[:, 0],
                           c.last_b)

        active_i = active_b.astype(jnp.int32)
        s = c.stats
        stats = SpeculativeStats(
            target_calls=s.target_calls + active_i,
            draft_calls=s.draft_calls + gamma * active_i,
            proposed=s.proposed + gamma * active_i,
            accepted=s.accepted + n_b * active_i,
            emitted=new_emitted_b,
            accepted_at=s.accepted_at + ((i_1p[:, :gamma] < n_b[:, None]) & active_b[:, None]).astype(jnp.int32),
            batch_blocks=s.batch_blocks + 1,
            lenient_accepted=s.lenient_accepted if lenient_b is None else s.lenient_accepted + lenient_b * active_i,
        )
        return _BlockCarry(
            target_cache=target_cache.with_lengths(committed_b),
            draft_cache=draft_cache.with_lengths(committed_b),
            committed_b=committed_b,
            last_b=y_b,
            prev_b=prev_b,
            tokens_br=tokens_br,
            teacher_br=teacher_br,
            done_b=done_b,
            block=c.block + 1,
            stats=stats,
        )

    zeros_b = jnp.zeros((batch,), jnp.int32)
    slots = max_new_tokens + gamma + 1
    teacher_br = None
    if keep_top_k:
        teacher_br = sparse_teacher.TopK(jnp.zeros((batch, slots, keep_top_k), jnp.int32),
                                         jnp.zeros((batch, slots, keep_top_k), jnp.float32),
                                         jnp.zeros((batch, slots), jnp.float32))
    init = _BlockCarry(
        target_cache=target_cache,
        draft_cache=draft_cache,
        committed_b=prompt_lens_b - 1,
        last_b=last_b,
        prev_b=prev_b,
        tokens_br=jnp.full((batch, slots), pad_id, jnp.int32),
        teacher_br=teacher_br,
        done_b=jnp.zeros((batch,), bool),
        block=jnp.zeros((), jnp.int32),
        stats=SpeculativeStats(zeros_b, zeros_b, zeros_b, zeros_b, zeros_b, jnp.zeros((batch, gamma), jnp.int32),
                               zeros_b, zeros_b),
    )
    # Every active row emits at least one token per block, so the loop ends within R iterations.
    out = jax.lax.while_loop(lambda c: ~jnp.all(c.done_b), body, init)
    tokens_br = out.tokens_br[:, :max_new_tokens]
    lengths_b = out.stats.emitted
    teacher = None if out.teacher_br is None else jax.tree.map(lambda x: x[:, :max_new_tokens], out.teacher_br)
    if not return_sequences:
        return SpeculativeOutput(tokens_br, lengths_b, out.stats, teacher=teacher)
    sequences_bs, response_mask_bs = pipeline.pack_sequences(prompts_bt, prompt_lens_b, tokens_br, lengths_b, pad_id)
    return SpeculativeOutput(tokens_br, lengths_b, out.stats, sequences_bs, response_mask_bs, teacher)


def check_pair(target: qwen3.Qwen3, draft: qwen3.Qwen3) -> None:
    """Draft and target must share one vocabulary: rejection sampling compares p and q id by id."""
    checks.check_same_vocabulary(draft.cfg, target.cfg, "target", "speculative decoding")


def speculative_generate(
    target: qwen3.Qwen3,
    draft: qwen3.Qwen3,
    prompts_bt,
    prompt_lens_b,
    gamma: int,
    max_new_tokens: int,
    sampler: Sampler = Sampler(temperature=0.0),
    rng: jax.Array | None = None,
    *,
    eos_ids: int | Iterable[int] | None = (),
    pad_id: int = decoding.DEFAULT_PAD_ID,
    cache_len: int | None = None,
    return_sequences: bool = False,
    acceptance: str = "lossless",
    keep_top_k: int = 0,
    teacher_temperature: float = 1.0,
    lenience: str | None = None,
    epsilon: float | None = None,
) -> SpeculativeOutput:
    """Samples up to `max_new_tokens` tokens per prompt from the target, proposing γ at a time with the draft.

    prompts_bt: [B, T] right-padded ids; prompt_lens_b: [B], each in [1, T]. gamma: draft tokens per block.
    The output has the target's distribution (exactly its greedy output at temperature 0).
    cache_len: KV slots of both caches (default: `decoding.required_cache_len`).
    acceptance: a name in ACCEPTANCE_RULES; "lossless" (the default) is the rule above.
    keep_top_k: k > 0 also returns the target's top-k beside each emitted token, at teacher_temperature (the
    loss's), for online learning while serving; 0 keeps nothing.
    lenience, epsilon: a form of `lenience.LENIENCE_FORMS` and ε in (0, 1]: lossy speculative sampling, whose
    output follows `lenience.output_law` position by position instead of p; None (the default) is lossless.
    Everything is validated on the host before tracing.
    """
    if not isinstance(gamma, (int, np.integer)) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"gamma (draft tokens per block) must be an integer >= 1, got {gamma!r}")
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {sorted(ACCEPTANCE_RULES)}, got {acceptance!r}")
    decoding.check_sampler(sampler)
    lenience_forms.check_lenience(lenience, epsilon)
    if lenience is not None and sampler.greedy:
        raise ValueError(f"lenience {lenience!r} needs a sampling temperature > 0: greedy decoding keeps its exact "
                         "rule (accept while x = argmax p), so there is nothing to relax; decode with temperature > 0 "
                         "or drop the lenience")
    check_pair(target, draft)
    if not 0 <= keep_top_k <= target.cfg.real_vocab_size or not teacher_temperature > 0:
        raise ValueError(f"keep_top_k must be in [0, {target.cfg.real_vocab_size}] and teacher_temperature > 0; got "
                         f"{keep_top_k}, {teacher_temperature}")
    _, prompt_len = decoding.check_prompts(target.cfg, prompts_bt, prompt_lens_b, max_new_tokens)
    eos = decoding.normalize_eos_ids(eos_ids, target.cfg.vocab_size)
    required = decoding.required_cache_len(prompt_len, max_new_tokens, gamma)
    what = f"speculative decoding with gamma={gamma}, prompts of length {prompt_len} and {max_new_tokens} new tokens"
    cache_len = decoding.check_cache_len(target.cfg, prompt_len, required, cache_len, what)
    decoding.check_cache_len(draft.cfg, prompt_len, required, cache_len, what)
    rng = decoding.default_rng(rng, sampler)
    target_graphdef, target_state = nnx.split(target)
    draft_graphdef, draft_state = nnx.split(draft)
    return _speculative_jit(
        target_graphdef, draft_graphdef, target_state, draft_state,
        jnp.asarray(prompts_bt, jnp.int32), jnp.asarray(prompt_lens_b, jnp.int32), rng,
        None if lenience is None else jnp.float32(epsilon), gamma=int(gamma), max_new_tokens=int(max_new_tokens), sampler=sampler, eos_ids=eos, pad_id=int(pad_id),
        cache_len=cache_len, return_sequences=bool(return_sequences), acceptance=acceptance,
        keep_top_k=int(keep_top_k), teacher_temperature=float(teacher_temperature), lenience=lenience,
    )


def compiled_cache_size() -> int:
    """Number of compiled variants of the speculative loop (tests use it to prove there are no recompiles)."""
    return _speculative_jit._cache_size()


# ----------------------------------------------------------------------------------------------
# Statistics on the host
# ----------------------------------------------------------------------------------------------


def merge_stats(stats: Sequence[SpeculativeStats]) -> SpeculativeStats:
    """Concatenates the per-row counters of several runs (same γ) so `summarize` aggregates over all rows."""
    host = [jax.tree.map(np.asarray, s) for s in stats]
    return SpeculativeStats(*(np.concatenate([getattr(s, f) for s in host]) for f in SpeculativeStats._fields))


def summarize(stats: SpeculativeStats) -> dict[str, Any]:
    """The design §5 statistics, summed over rows, as JSON-serialisable Python numbers.

    block_efficiency τ = emitted / target_calls; acceptance_rate α = accepted / proposed;
    per_position_acceptance[i] = blocks with x_{i+1} accepted / blocks; verified_block_length =
    (accepted + target_calls) / target_calls is τ before EOS/budget truncation, the quantity whose closed
    form is (1 − α^(γ+1)) / (1 − α) when acceptances are i.i.d. with probability α.
    batch_block_efficiency = emitted / Σ batch_blocks: tokens per row per batched iteration, the τ a lockstep
    batch actually realises (wall time follows its slowest row), at most block_efficiency.
    lenient_fraction = lenient_accepted / accepted: the share of accepted draft tokens that only the lossy
    rule accepted (0 for the lossless rule).
    """
    s = jax.tree.map(np.asarray, stats)
    target_calls, accepted, proposed = int(s.target_calls.sum()), int(s.accepted.sum()), int(s.proposed.sum())
    emitted = int(s.emitted.sum())
    return {
        "block_efficiency": emitted / target_calls,
        "acceptance_rate": accepted / proposed,
        "per_position_acceptance": [float(a) / target_calls for a in s.accepted_at.sum(axis=0)],
        "verified_block_length": (accepted + target_calls) / target_calls,
        "target_calls": target_calls,
        "draft_calls": int(s.draft_calls.sum()),
        "emitted_tokens": emitted,
        "accepted_tokens": accepted,
        "proposed_tokens": proposed,
        "batch_block_efficiency": emitted / int(s.batch_blocks.sum()),
        "lenient_fraction": int(s.lenient_accepted.sum()) / accepted if accepted else 0.0,
        "rows": int(len(s.emitted)),
        "gamma": int(s.accepted_at.shape[1]),
    }
