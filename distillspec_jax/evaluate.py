"""Evaluation of a draft/target pair for speculative decoding (design §5): measured and predicted speedup,
analytic acceptance, and γ sweeps.

Every function returns plain Python numbers (JSON-serialisable) so `main.py` can call them for the
draft before and after distillation, at each temperature, and write them to results.json.

  measured speedup   = wall time of target-only decoding / wall time of speculative decoding, same prompts,
                       budget, sampler and EOS ids, both compiled and warmed up, median of a few runs.
  c                  = one draft decode step / one target decode step (single-token cached steps, compiled).
  predicted speedup  = τ / (γ·c + 1).
  analytic α̂         = mean over positions of target-sampled continuations of Σ_v min(p, q) = 1 − TVD(p, q);
  τ̂                  = (1 − α̂^(γ+1)) / (1 − α̂).
  lossy frontier     = per lenience form and ε (`lenience.py`): τ, α, α̂(ε) = mean Σ_v min(q, f(p, ε)) on the
                       same kind of continuations, and the quality of the lossy outputs themselves: the target's
                       log-likelihood per token (temperature 1) and TVD(P_ε, p), the closed-form law's distance
                       to the target's at each position they visit.

Dimension letters (style.md): B batch, S sequence positions, C positions of one chunk, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distillspec_jax import lenience as lenience_forms
from distillspec_jax import objective
from distillspec_jax.divergences import total_variation
from distillspec_jax import generate as gen
from distillspec_jax import sampling
from distillspec_jax import speculative
from distillspec_jax.models import qwen3
from distillspec_jax.sampling import Sampler

TIMING_RUNS = 5  # timed repetitions; the median is reported
WARMUP_RUNS = 1  # untimed calls first: compilation and first-touch allocation
STEPS_PER_TIMING = 16  # cached decode steps inside one timed call of the step benchmark (amortises dispatch)
POSITION_CHUNK = 128  # positions whose [B, chunk, V] distributions exist at once in the analytic acceptance


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def expected_block_efficiency(alpha: float, gamma: int) -> float:
    """τ̂ = (1 − α^(γ+1)) / (1 − α): the mean block length when each draft token is accepted independently
    with probability α (the limit γ + 1 at α = 1)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return float((1.0 - alpha ** (gamma + 1)) / (1.0 - alpha))


def predicted_speedup(block_efficiency: float, gamma: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """τ / (γ·c + v): one block costs γ draft steps and one target call of v target steps (v = 1 in design §5)."""
    return float(block_efficiency / (gamma * cost_ratio + verify_ratio))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], runs: int = TIMING_RUNS, warmup: int = WARMUP_RUNS) -> tuple[float, Any]:
    """(median wall seconds over `runs` calls, the last output). Each call is waited for with block_until_ready,
    so asynchronous dispatch does not hide the work; warm-up calls compile and are not timed."""
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "tokens_per_step"))
def _decode_steps(graphdef, state, cache: qwen3.KVCache, first_b: jax.Array, *, steps: int,
                  tokens_per_step: int) -> jax.Array:
    """`steps` cached decode steps of `tokens_per_step` tokens each, feeding the argmax back (so no step is dead
    code). Every step starts at the cache's given lengths, so each costs a step at that context (attention reads
    the window that holds it) and the cache never runs out."""
    model = nnx.merge(graphdef, state)

    def one(_, carry):
        cache_i, tokens_b = carry
        tokens_bt = jnp.broadcast_to(tokens_b[:, None], (tokens_b.shape[0], tokens_per_step))
        logits_btv, cache_i = model.step(tokens_bt, cache_i)
        # The cache is carried (updated in place, as in the decode loops) but rewound to its start length.
        return cache_i.with_lengths(cache.lengths), jnp.argmax(logits_btv[:, -1], axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, one, (cache, first_b))[1]


def decode_step_seconds(model: qwen3.Qwen3, batch: int, cache_len: int, runs: int = TIMING_RUNS,
                        steps: int = STEPS_PER_TIMING, tokens_per_step: int = 1, context: int | None = None) -> float:
    """Median wall seconds of one cached decode step of `tokens_per_step` tokens (1: a decode step; γ + 1: the
    target's verification call) at batch `batch` with a `cache_len`-slot cache, every row holding `context`
    tokens before the step (default: cache_len − tokens_per_step, the cache full after the step)."""
    if not 1 <= tokens_per_step <= cache_len:
        raise ValueError(f"tokens_per_step={tokens_per_step} must be in [1, cache_len={cache_len}]")
    context = cache_len - tokens_per_step if context is None else context
    if not 0 <= context <= cache_len - tokens_per_step:
        raise ValueError(f"context={context} must be in [0, cache_len - tokens_per_step = {cache_len - tokens_per_step}]")
    graphdef, state = nnx.split(model)
    cache = qwen3.KVCache.init(model.cfg, batch, cache_len).with_lengths(jnp.full((batch,), context))
    first_b = jnp.zeros((batch,), jnp.int32)
    seconds, _ = median_seconds(
        lambda: _decode_steps(graphdef, state, cache, first_b, steps=steps, tokens_per_step=tokens_per_step), runs=runs)
    return seconds / steps


def cost_ratio(target: qwen3.Qwen3, draft: qwen3.Qwen3, batch: int, cache_len: int,
               runs: int = TIMING_RUNS, steps: int = STEPS_PER_TIMING) -> dict[str, float]:
    """c = draft step time / target step time, both single-token steps measured the same way."""
    target_s = decode_step_seconds(target, batch, cache_len, runs, steps)
    draft_s = decode_step_seconds(draft, batch, cache_len, runs, steps)
    return {"target_step_s": target_s, "draft_step_s": draft_s, "cost_ratio": draft_s / target_s}


def verify_cost_ratio(target: qwen3.Qwen3, gamma: int, batch: int, cache_len: int, runs: int = TIMING_RUNS,
                      target_step_s: float | None = None, steps: int = STEPS_PER_TIMING) -> float:
    """Time of the target's (γ + 1)-token verification call / its single-token step. The predicted speedup
    τ / (γ·c + 1) takes this as 1, which holds where decoding is memory-bound (accelerators); on a CPU the
    call costs more, and τ / (γ·c + this) is the better prediction."""
    if target_step_s is None:
        target_step_s = decode_step_seconds(target, batch, cache_len, runs, steps)
    return decode_step_seconds(target, batch, cache_len, runs, steps, tokens_per_step=gamma + 1) / target_step_s


# ----------------------------------------------------------------------------------------------
# Analytic acceptance
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("sampler", "chunk", "lenience", "quality"))
def _position_sums(target_graphdef, draft_graphdef, target_state, draft_state, sequences_bs, predicts_bs, epsilons_e,
                   *, sampler: Sampler, chunk: int, lenience: str | None, quality: bool) -> dict[str, jax.Array]:
    """Sums over the positions where predicts_bs is True, computed chunk by chunk over positions
    (`objective.scan_positions`) so that only [B, C, V] distributions of each model exist at once (V dominates
    memory, design §3):
      beta: Σ β, with β = Σ_v min(p, q) = 1 − TVD(p, q) (lenience None, []) or β_ε = Σ_v min(q, f(p, ε)) for
        each ε of epsilons_e ([E], one ε at a time: [E, B, C, V] never exists);
      with quality: log_likelihood, Σ log p(next token) under the target at temperature 1, and law_tvd [E],
        Σ TVD(P_ε, p) (lenience only)."""
    target = nnx.merge(target_graphdef, target_state)
    draft = nnx.merge(draft_graphdef, draft_state)
    real_v = target.cfg.real_vocab_size
    xs = (target.hidden_states(sequences_bs), draft.hidden_states(sequences_bs), predicts_bs,
          objective.next_token_shift(sequences_bs))

    def one_chunk(totals, xs_c):
        h_target_bcd, h_draft_bcd, predicts_bc, next_bc = xs_c
        target_logits_bcv = target.logits(h_target_bcd)
        # filtered_logits: the sampler's temperature and top-k/top-p; temperature 1 when greedy.
        p_logits_bcv = sampling.filtered_logits(target_logits_bcv, sampler, real_v)
        q_logits_bcv = sampling.filtered_logits(draft.logits(h_draft_bcd), sampler, real_v)
        weight_bc = predicts_bc.astype(jnp.float32)
        new = dict(totals)
        if lenience is None:
            # 1 − TVD rather than Σ min(p, q): equal when both sum to 1, and exactly 1 when p and q are identical.
            new["beta"] = totals["beta"] + jnp.sum(weight_bc * (1.0 - total_variation(p_logits_bcv, q_logits_bcv)))
        else:
            p_bcv, q_bcv = jax.nn.softmax(p_logits_bcv, axis=-1), jax.nn.softmax(q_logits_bcv, axis=-1)

            def at(eps):
                beta = jnp.sum(weight_bc * lenience_forms.acceptance_probability(p_bcv, q_bcv, lenience, eps))
                tvd = jnp.sum(weight_bc * lenience_forms.law_distance(p_bcv, q_bcv, lenience, eps)) if quality else 0.0
                return beta, tvd

            beta_e, tvd_e = jax.lax.map(at, epsilons_e)
            new["beta"] = totals["beta"] + beta_e
            if quality:
                new["law_tvd"] = totals["law_tvd"] + tvd_e
        if quality:
            log_p_bcv = jax.nn.log_softmax(sampling.filtered_logits(target_logits_bcv, Sampler(temperature=1.0), real_v))
            log_p_next_bc = jnp.take_along_axis(log_p_bcv, next_bc[..., None], axis=-1)[..., 0]
            new["log_likelihood"] = totals["log_likelihood"] + jnp.sum(jnp.where(predicts_bc, log_p_next_bc, 0.0))
        return new, None

    per_eps = jnp.zeros(epsilons_e.shape, jnp.float32)
    init = {"beta": jnp.zeros((), jnp.float32) if lenience is None else per_eps}
    if quality:
        init["log_likelihood"] = jnp.zeros((), jnp.float32)
        if lenience is not None:
            init["law_tvd"] = per_eps
    totals, _ = objective.scan_positions(one_chunk, init, xs, chunk)
    return totals


def _position_means(target: qwen3.Qwen3, draft: qwen3.Qwen3, sequences_bs, response_mask_bs, sampler: Sampler,
                    chunk: int, lenience: str | None = None, epsilons: Sequence[float] = (),
                    quality: bool = False) -> dict[str, Any]:
    """`_position_sums` over every position whose next token is a response token (where a draft would propose),
    divided by their number: {'beta', 'num_positions'} and with quality {'log_likelihood'} (+ 'law_tvd');
    per-ε entries are lists."""
    speculative.check_pair(target, draft)
    response_mask_bs = jnp.asarray(response_mask_bs, bool)
    predicts_bs = objective.next_token_shift(response_mask_bs)  # position s predicts token s + 1
    count = int(jnp.sum(predicts_bs))
    if count == 0:
        raise ValueError("no response positions to score: response_mask is all False")
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(draft)
    sums = _position_sums(tg, dg, ts, ds, jnp.asarray(sequences_bs, jnp.int32), predicts_bs,
                          jnp.asarray(epsilons, jnp.float32), sampler=sampler, chunk=min(chunk, predicts_bs.shape[1]),
                          lenience=lenience, quality=quality)
    means = {k: (np.asarray(v, np.float64) / count).tolist() for k, v in sums.items()}
    return {**means, "num_positions": count}


def acceptance_from_sequences(target: qwen3.Qwen3, draft: qwen3.Qwen3, sequences_bs, response_mask_bs,
                              sampler: Sampler, chunk: int = POSITION_CHUNK) -> dict[str, float | int]:
    """α̂ over given sequences: the mean of β = Σ_v min(p, q) = 1 − TVD(p, q) over every position whose next
    token is a response token (the positions where a draft would propose).

    sequences_bs / response_mask_bs: [B, S] as returned by `generate(..., return_sequences=True)`.
    Distributions use the sampler's filters; a greedy sampler is scored at temperature 1 (the argmax
    acceptance 1[argmax p = argmax q] is too coarse per position, and temperature 1 is where a distilled
    draft's distribution is trained to match), so α̂ at temperature 0 is an estimate, not the exact rate.
    """
    means = _position_means(target, draft, sequences_bs, response_mask_bs, sampler, chunk)
    return {"alpha_hat": means["beta"], "num_positions": means["num_positions"]}


def analytic_acceptance(target: qwen3.Qwen3, draft: qwen3.Qwen3, prompts_bt, prompt_lens_b, max_new_tokens: int,
                        sampler: Sampler, rng: jax.Array, *, eos_ids: int | Iterable[int] | None = ()) -> dict[str, float | int]:
    """α̂ on continuations the target samples with `sampler` (greedy ones when greedy), one forward pass of
    each model over prompt + continuation. See `acceptance_from_sequences`."""
    out = gen.generate(target, prompts_bt, prompt_lens_b, max_new_tokens, sampler, rng, eos_ids=eos_ids,
                       return_sequences=True)
    return acceptance_from_sequences(target, draft, out.sequences, out.response_mask, sampler)


# ----------------------------------------------------------------------------------------------
# Measured speedup and γ sweeps
# ----------------------------------------------------------------------------------------------


def target_decode_seconds(target: qwen3.Qwen3, prompts_bt, prompt_lens_b, max_new_tokens: int, sampler: Sampler,
                          rng: jax.Array, *, eos_ids=(), runs: int = TIMING_RUNS) -> dict[str, float | int]:
    """The baseline: median wall time of target-only autoregressive decoding (compiled, warmed up)."""
    # return_sequences as in analytic_acceptance: one compiled program serves both (packing costs nothing
    # next to the decode), where the flag alone would compile the whole loop twice.
    seconds, out = median_seconds(
        lambda: gen.generate(target, prompts_bt, prompt_lens_b, max_new_tokens, sampler, rng, eos_ids=eos_ids,
                             return_sequences=True),
        runs=runs)
    return {"target_time_s": seconds, "target_tokens": int(np.sum(out.lengths))}


def measure_speculative(target: qwen3.Qwen3, draft: qwen3.Qwen3, prompts_bt, prompt_lens_b, gamma: int,
                        max_new_tokens: int, sampler: Sampler, rng: jax.Array, *, eos_ids=(),
                        runs: int = TIMING_RUNS, target_time_s: float | None = None,
                        cost: float | None = None, verify_ratio: float | None = None,
                        alpha_hat: float | None = None) -> dict[str, Any]:
    """One γ: the run's statistics (`speculative.summarize`), its median wall time (runs = 0 skips timing), and,
    when given, the measured speedup against `target_time_s`, the predicted speedup from c = `cost` (also with
    the measured verification cost `verify_ratio`), and τ̂ from `alpha_hat`."""
    call = functools.partial(speculative.speculative_generate, target, draft, prompts_bt, prompt_lens_b, gamma,
                             max_new_tokens, sampler, rng, eos_ids=eos_ids)
    seconds, out = median_seconds(call, runs=runs) if runs > 0 else (None, call())
    return _sweep_entry(gamma, sampler, speculative.summarize(out.stats), seconds, target_time_s, cost, verify_ratio,
                        alpha_hat)


PromptBatch = tuple[Any, Any]  # (prompts_bt [B, T] right-padded ids, prompt_lens_b [B])


def analytic_acceptance_batches(target: qwen3.Qwen3, draft: qwen3.Qwen3, batches: Sequence[PromptBatch],
                                max_new_tokens: int, sampler: Sampler, rng: jax.Array, *,
                                eos_ids=()) -> dict[str, float | int]:
    """α̂ over several prompt batches: the position-weighted mean of `analytic_acceptance` per batch."""
    parts = [analytic_acceptance(target, draft, p, lens, max_new_tokens, sampler, jax.random.fold_in(rng, i),
                                 eos_ids=eos_ids) for i, (p, lens) in enumerate(batches)]
    positions = sum(part["num_positions"] for part in parts)
    return {"alpha_hat": sum(part["alpha_hat"] * part["num_positions"] for part in parts) / positions,
            "num_positions": positions}


def _batch_rng(rng: jax.Array, index: int) -> jax.Array:
    """The sampling key of prompt batch `index`: independent draws per batch (row r of every batch would
    otherwise reuse the same uniforms). Batch 0 keeps the caller's key, so a one-batch evaluation draws
    exactly what a direct call with that key draws."""
    return rng if index == 0 else jax.random.fold_in(rng, index)


def step_costs(target: qwen3.Qwen3, draft: qwen3.Qwen3, batches: Sequence[PromptBatch], gammas: Sequence[int],
               max_new_tokens: int, runs: int = TIMING_RUNS, steps: int = STEPS_PER_TIMING) -> dict[str, Any]:
    """c and the verify-call cost of every γ, measured once at the first batch's size with a cache of T + N
    slots, `steps` cached steps per timed call: {'cost_ratio', 'target_step_s', 'draft_step_s',
    'verify_cost_ratio': {γ: ratio}}."""
    batch, prompt_len = np.shape(batches[0][0])
    cache_len = prompt_len + max_new_tokens
    step_s = cost_ratio(target, draft, batch, cache_len, runs, steps)
    verify = {g: verify_cost_ratio(target, g, batch, cache_len, runs, step_s["target_step_s"], steps) for g in gammas}
    return {**step_s, "verify_cost_ratio": verify}


def gamma_sweep(target: qwen3.Qwen3, draft: qwen3.Qwen3, batches: Sequence[PromptBatch], gammas: Sequence[int],
                max_new_tokens: int, sampler: Sampler, rng: jax.Array, *, eos_ids=(), runs: int = TIMING_RUNS,
                measure_time: bool = True, analytic: bool = True, costs: dict[str, Any] | None = None,
                on_gamma: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One dict per γ (in the order given), over every prompt batch: the statistics of `speculative.summarize`
    aggregated over all rows, τ̂ from α̂ (with analytic), and, with measure_time, the measured speedup (summed
    wall times of all batches, target-only against speculative) and the predicted speedups. The baseline
    time, c and α̂ do not depend on γ and are computed once; step costs use a cache of T + N slots (attention
    cost grows with the cache) at the batch size of the first batch; `costs` (from `step_costs`) reuses them
    across samplers, since a step's time does not depend on the sampler. on_gamma(γ) is called after each γ."""
    if not gammas:
        raise ValueError("gammas is empty; give at least one γ")
    if not batches:
        raise ValueError("no prompt batches to evaluate")
    alpha_hat = None
    if analytic:
        alpha_hat = analytic_acceptance_batches(target, draft, batches, max_new_tokens, sampler, rng,
                                                eos_ids=eos_ids)["alpha_hat"]
    target_time_s = cost = None
    verify = dict.fromkeys(gammas)
    if measure_time:
        target_time_s = sum(target_decode_seconds(target, p, lens, max_new_tokens, sampler, _batch_rng(rng, i),
                                                  eos_ids=eos_ids, runs=runs)["target_time_s"]
                            for i, (p, lens) in enumerate(batches))
        costs = costs or step_costs(target, draft, batches, gammas, max_new_tokens, runs)
        cost, verify = costs["cost_ratio"], {g: costs["verify_cost_ratio"][g] for g in gammas}
    results = []
    for g in gammas:
        seconds, stats = 0.0, []
        for i, (p, lens) in enumerate(batches):
            call = functools.partial(speculative.speculative_generate, target, draft, p, lens, g, max_new_tokens, sampler,
                                     _batch_rng(rng, i), eos_ids=eos_ids)
            elapsed, out = median_seconds(call, runs=runs) if measure_time else (0.0, call())
            seconds += elapsed
            stats.append(out.stats)
        results.append(_sweep_entry(g, sampler, speculative.summarize(speculative.merge_stats(stats)),
                                    seconds if measure_time else None, target_time_s, cost, verify[g], alpha_hat))
        if on_gamma is not None:
            on_gamma(g)
    return results


def _sweep_entry(gamma: int, sampler: Sampler, summary: dict[str, Any], seconds: float | None,
                 target_time_s: float | None, cost: float | None, verify_ratio: float | None,
                 alpha_hat: float | None) -> dict[str, Any]:
    """A γ's statistics plus whichever of the speedups and the closed-form τ̂ its inputs allow."""
    result = {"gamma": int(gamma), "temperature": float(sampler.temperature), **summary}
    tau = result["block_efficiency"]
    if seconds is not None:
        result["speculative_time_s"] = float(seconds)
        if target_time_s is not None:
            result["target_time_s"] = float(target_time_s)
            result["measured_speedup"] = float(target_time_s / seconds)
    if cost is not None:
        result["cost_ratio"] = float(cost)
        result["predicted_speedup"] = predicted_speedup(tau, gamma, cost)
        if verify_ratio is not None:
            result["verify_cost_ratio"] = float(verify_ratio)
            result["predicted_speedup_with_verify_cost"] = predicted_speedup(tau, gamma, cost, verify_ratio)
    if alpha_hat is not None:
        result["alpha_hat"] = float(alpha_hat)
        result["expected_block_efficiency"] = expected_block_efficiency(alpha_hat, gamma)
    return result


# ----------------------------------------------------------------------------------------------
# Lossy speculative decoding: the quality–latency frontier
# ----------------------------------------------------------------------------------------------


def _position_weighted(parts: Sequence[dict[str, Any]], key: str):
    """The mean of `key` over batches weighted by their positions (a list: elementwise)."""
    total = sum(part["num_positions"] for part in parts)
    return (np.sum([np.asarray(part[key]) * part["num_positions"] for part in parts], axis=0) / total).tolist()


def lenience_frontier(target: qwen3.Qwen3, draft: qwen3.Qwen3, batches: Sequence[PromptBatch], gammas: Sequence[int],
                      max_new_tokens: int, sampler: Sampler, rng: jax.Array, *, forms: Sequence[str],
                      epsilons: Sequence[float], eos_ids=(), runs: int = TIMING_RUNS, measure_time: bool = True,
                      reference: Sequence[dict[str, Any]] = (),
                      score: Callable[[int, Any, Any], list[bool]] | None = None,
                      on_point: Callable[[int, str, float], None] | None = None) -> list[dict[str, Any]]:
    """Rows of the frontier at one sampling temperature: for every γ the lossless run ('lenience': 'lossless',
    ε = 1) and one run per (form, ε), each over every prompt batch, with the statistics of the γ sweep (τ, α, the
    lenient fraction, speedups) and
      alpha_hat, expected_block_efficiency: α̂(ε) = mean Σ_v min(q, f(p, ε)) on target-sampled continuations (the
        same ones, and so at ε = 1 the same value, as the lossless α̂ of `gamma_sweep` with this rng), and τ̂;
      log_likelihood: the target's mean log-probability (temperature 1) per emitted token of these outputs;
      law_tvd: the mean over the positions these outputs visit of TVD(P_ε, p), the closed-form law's distance.
    `reference`: the `gamma_sweep` rows of this temperature, whose target-only time, c and verify cost the
    speedups reuse (the step costs do not depend on the acceptance rule).
    `score(batch_index, tokens_br, lengths_b)`: whether each row's output answers its prompt correctly (tasks
    with checkable answers, `data.answers`); adds task_accuracy and task_scored."""
    if sampler.greedy:
        raise ValueError("the lossy frontier needs a sampling temperature > 0: greedy decoding keeps its exact rule")
    for form in forms:
        for eps in epsilons:
            lenience_forms.check_lenience(form, eps)
    continuations = [gen.generate(target, p, lens, max_new_tokens, sampler, jax.random.fold_in(rng, i), eos_ids=eos_ids,
                                  return_sequences=True) for i, (p, lens) in enumerate(batches)]

    def alpha_hat(form: str | None) -> list[float]:
        parts = [_position_means(target, draft, out.sequences, out.response_mask, sampler, POSITION_CHUNK, form,
                                 epsilons if form else ()) for out in continuations]
        value = _position_weighted(parts, "beta")
        return [value] if form is None else value

    alpha = {form: dict(zip((1.0,) if form is None else epsilons, alpha_hat(form))) for form in (None, *forms)}
    by_gamma = {r["gamma"]: r for r in reference}
    rows = []
    for g in gammas:
        ref = by_gamma.get(g, {})
        for form, eps in [(None, 1.0)] + [(f, float(e)) for f in forms for e in epsilons]:
            seconds, stats, quality, correct = 0.0, [], [], []
            for i, (p, lens) in enumerate(batches):
                call = functools.partial(speculative.speculative_generate, target, draft, p, lens, g, max_new_tokens,
                                         sampler, _batch_rng(rng, i), eos_ids=eos_ids, return_sequences=True,
                                         lenience=form, epsilon=None if form is None else eps)
                elapsed, out = median_seconds(call, runs=runs) if measure_time else (0.0, call())
                seconds += elapsed
                stats.append(out.stats)
                if score is not None:
                    correct += score(i, out.tokens, out.lengths)
                quality.append(_position_means(target, draft, out.sequences, out.response_mask, sampler,
                                               POSITION_CHUNK, form, () if form is None else (eps,), quality=True))
            row = _sweep_entry(g, sampler, speculative.summarize(speculative.merge_stats(stats)),
                               seconds if measure_time else None, ref.get("target_time_s"), ref.get("cost_ratio"),
                               ref.get("verify_cost_ratio"), alpha[form][eps])
            row.update(lenience=form or "lossless", epsilon=eps,
                       log_likelihood=_position_weighted(quality, "log_likelihood"),
                       law_tvd=0.0 if form is None else _position_weighted(quality, "law_tvd")[0])
            if score is not None:
                row.update(task_accuracy=float(np.mean(correct)), task_scored=len(correct))
            rows.append(row)
            if on_point is not None:
                on_point(g, form or "lossless", eps)
    return rows
