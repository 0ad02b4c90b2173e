"""Evaluation helpers: analytic acceptance α̂ (exactly 1 for draft = target; equal to a direct Σ min(p, q)
computation otherwise), the τ̂ and predicted-speedup formulas, step-cost ratio, and γ sweeps."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import evaluate as ev
from distillspec_jax import generate as gen
from distillspec_jax import sampling
from distillspec_jax.sampling import Sampler
from tests.test_speculative import BUDGET, NEAR_DRAFT_NOISE, PROMPT_LENS, PROMPTS, make_model, perturb, tiny_config

GREEDY = Sampler(temperature=0.0)
SMALL_CHUNK = 4  # forces several position chunks, the last one padded


@pytest.fixture(scope="module")
def target():
    return make_model(0)


@pytest.fixture(scope="module")
def near_draft(target):
    return perturb(target, NEAR_DRAFT_NOISE, seed=2)


@pytest.mark.parametrize("sampler", [GREEDY, Sampler(temperature=1.0)], ids=["greedy", "T=1"])
def test_analytic_acceptance_is_one_for_identical_models(target, sampler):
    twin = make_model(0)  # a separate model object with the same weights
    for draft in (target, twin):
        result = ev.analytic_acceptance(target, draft, PROMPTS, PROMPT_LENS, BUDGET, sampler, jax.random.key(0))
        assert result["alpha_hat"] == 1.0
        assert result["num_positions"] == len(PROMPTS) * BUDGET


@pytest.mark.parametrize("sampler", [GREEDY, Sampler(temperature=0.7, top_k=20)], ids=["greedy", "T=0.7,top_k"])
def test_analytic_acceptance_equals_direct_sum_min(target, near_draft, sampler):
    """Chunked, masked α̂ equals mean Σ_v min(p, q) from plain full forwards over the response-predicting
    positions; greedy is scored at temperature 1 (softmax of the unscaled filtered logits)."""
    out = gen.generate(target, PROMPTS, PROMPT_LENS, BUDGET, sampler, jax.random.key(1), eos_ids=[3],
                       return_sequences=True)
    got = ev.acceptance_from_sequences(target, near_draft, out.sequences, out.response_mask, sampler, chunk=SMALL_CHUNK)
    seqs, mask = np.asarray(out.sequences), np.asarray(out.response_mask)

    def dist(model):
        logits = sampling.filtered_logits(model(jnp.asarray(seqs)), sampler, model.cfg.real_vocab_size)
        return np.asarray(jax.nn.softmax(logits, axis=-1)).astype(np.float64)

    beta_bs = np.minimum(dist(target), dist(near_draft)).sum(-1)
    predicts = mask[:, 1:]
    want = beta_bs[:, :-1][predicts].mean()
    print(f"α̂ ({sampler}): chunked {got['alpha_hat']:.6f} direct {want:.6f} over {got['num_positions']} positions")
    assert got["num_positions"] == predicts.sum() == np.asarray(out.lengths).sum()
    assert 0.0 < want < 1.0
    assert abs(got["alpha_hat"] - want) < 1e-5


@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999, 1.0])
def test_expected_block_efficiency_formula(alpha, gamma):
    geometric_sum = sum(alpha**i for i in range(gamma + 1))  # E[block length] = Σ_{i=0..γ} α^i
    assert math.isclose(ev.expected_block_efficiency(alpha, gamma), geometric_sum, rel_tol=1e-9)


def test_predicted_speedup_formula():
    assert ev.predicted_speedup(3.0, 4, 0.25) == 3.0 / (4 * 0.25 + 1)
    assert ev.predicted_speedup(1.0, 2, 0.0) == 1.0


def test_cost_ratio_is_measured_and_finite():
    big = make_model(0, tiny_config(layers=4, hidden=128))
    small = make_model(1, tiny_config(layers=1, hidden=32))
    result = ev.cost_ratio(big, small, batch=4, cache_len=32, runs=3)
    print(f"step cost: {result}")
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert result["cost_ratio"] == result["draft_step_s"] / result["target_step_s"]


def test_gamma_sweep_one_entry_per_gamma(target, near_draft):
    gammas = [1, 3]
    sweep = ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)], gammas, BUDGET, GREEDY, jax.random.key(0), runs=1)
    print(json.dumps(sweep, indent=1))
    json.dumps(sweep, allow_nan=False)  # plain, finite Python numbers
    assert [entry["gamma"] for entry in sweep] == gammas
    for entry in sweep:
        for key in ("block_efficiency", "acceptance_rate", "measured_speedup", "predicted_speedup", "cost_ratio",
                    "alpha_hat", "expected_block_efficiency", "speculative_time_s", "target_time_s",
                    "verify_cost_ratio", "predicted_speedup_with_verify_cost", "batch_block_efficiency"):
            assert math.isfinite(entry[key]) and entry[key] > 0, key
        assert len(entry["per_position_acceptance"]) == entry["gamma"]
        assert 1.0 <= entry["block_efficiency"] <= entry["gamma"] + 1
        assert entry["predicted_speedup"] == ev.predicted_speedup(entry["block_efficiency"], entry["gamma"],
                                                                  entry["cost_ratio"])
        assert entry["expected_block_efficiency"] == ev.expected_block_efficiency(entry["alpha_hat"], entry["gamma"])
    assert len({entry["alpha_hat"] for entry in sweep}) == 1  # α̂ does not depend on γ


def test_gamma_sweep_without_timing(target, near_draft):
    sweep = ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)], [2], BUDGET, Sampler(temperature=1.0),
                           jax.random.key(0), measure_time=False)
    assert len(sweep) == 1 and "measured_speedup" not in sweep[0] and "predicted_speedup" not in sweep[0]
    assert math.isfinite(sweep[0]["expected_block_efficiency"])
    with pytest.raises(ValueError, match="gammas"):
        ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)], [], BUDGET, GREEDY, jax.random.key(0))


def test_gamma_sweep_over_batches_equals_one_batch(target, near_draft):
    # Greedy rows do not interact, so splitting the prompts into two batches must give the same aggregate
    # statistics (merged per row) and the same position-weighted α̂ as one batch of all of them.
    half = len(PROMPT_LENS) // 2
    split = [(PROMPTS[:half], PROMPT_LENS[:half]), (PROMPTS[half:], PROMPT_LENS[half:])]
    whole = ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)], [3], BUDGET, GREEDY, jax.random.key(0),
                           measure_time=False)[0]
    parts = ev.gamma_sweep(target, near_draft, split, [3], BUDGET, GREEDY, jax.random.key(0), measure_time=False)[0]
    for key in ("block_efficiency", "acceptance_rate", "per_position_acceptance", "emitted_tokens", "target_calls",
                "rows"):
        assert parts[key] == whole[key], key
    assert parts["alpha_hat"] == pytest.approx(whole["alpha_hat"], abs=1e-5)


def test_gamma_sweep_draws_each_batch_independently(target, near_draft):
    # Two copies of one batch, sampled: with one key for both they would accept exactly the same tokens.
    sampled = Sampler(temperature=1.0)
    one = ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)], [3], BUDGET, sampled, jax.random.key(3),
                         measure_time=False, analytic=False)[0]
    two = ev.gamma_sweep(target, near_draft, [(PROMPTS, PROMPT_LENS)] * 2, [3], BUDGET, sampled, jax.random.key(3),
                         measure_time=False, analytic=False)[0]
    assert two["rows"] == 2 * one["rows"]
    assert two["accepted_tokens"] != 2 * one["accepted_tokens"] or two["target_calls"] != 2 * one["target_calls"]
