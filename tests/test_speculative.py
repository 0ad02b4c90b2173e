"""Speculative decoding is lossless and its statistics mean what design §5 says.

* greedy speculative output equals the target's own greedy output token for token (several γ, ragged batch,
  a draft that mostly disagrees, one that partly agrees, and draft = target with τ in closed form);
* at temperature > 0 the joint law of the first two tokens equals exact target sampling (chi-square over
  20,000 samples), and two deliberately wrong acceptance rules fail the same test;
* acceptance statistics match Σ min(p, q) and, for context-free pairs, (1 − α^(γ+1)) / (1 − α);
* EOS inside a block stops only its row, budgets are exact; transformers' assisted generation agrees;
* a second call with the same shapes does not compile; bad inputs fail before compiling.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from distillspec_jax import decoding
from distillspec_jax import generate as gen
from distillspec_jax import sampling
from distillspec_jax import speculative as spec
from distillspec_jax.models import convert, qwen3, qwen3_moe
from distillspec_jax.sampling import Sampler

GREEDY = Sampler(temperature=0.0)
# Random init (std 0.02) gives nearly uniform next-token distributions; scaling the weights gives moderate
# entropies (about 2.7 nats of log(24) = 3.2 in the tiny-vocabulary pair), so argmaxes are well separated
# and acceptance is partial rather than almost sure.
WEIGHT_SCALE = 8.0
NEAR_DRAFT_NOISE = 0.07  # relative weight noise of the "near" draft: greedy acceptance roughly a third to a half

# A ragged batch of 4 prompts (right-padded), vocabulary 96.
VOCAB = 96
PROMPTS = np.array([[11, 5, 42, 7, 9, 3, 60], [5, 61, 0, 0, 0, 0, 0], [71, 0, 0, 0, 0, 0, 0], [9, 8, 77, 6, 0, 0, 0]])
PROMPT_LENS = np.array([7, 2, 1, 4])
BUDGET = 23  # not a multiple of γ + 1 for any tested γ, so the budget truncates the last block

# Lossless test: tiny vocabulary, one prompt repeated over a large batch.
TINY_VOCAB = 24
NUM_SAMPLES = 20_000
LOSSLESS_GAMMA = 2
LOSSLESS_PROMPT = np.array([3, 7, 1])
MIN_EXPECTED = 5.0  # chi-square cells with smaller expected counts are pooled into one
PASS_LEVEL = 1e-3  # the correct sampler must reach p > PASS_LEVEL ...
POWER_LEVEL = 1e-6  # ... and every wrong one p < POWER_LEVEL
Z_TOLERANCE = 5.0  # statistical checks: |estimate − closed form| < 5 standard errors (seeds are fixed)


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------


def tiny_config(vocab: int = VOCAB, layers: int = 2, hidden: int = 64) -> qwen3.Qwen3Config:
    return qwen3.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=256, rope_theta=10_000.0)


def tiny_moe_config(vocab: int = VOCAB, layers: int = 2, hidden: int = 64) -> qwen3_moe.Qwen3MoeConfig:
    """An MoE target: 8 experts, 2 per token, the first layer dense (mlp_only_layers), so both MLPs and two
    runs of layers are on the path."""
    return qwen3_moe.Qwen3MoeConfig.from_dense(tiny_config(vocab, layers, hidden), num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=hidden // 2, mlp_only_layers=(0,))


def map_params(model: qwen3.Qwen3, fn) -> qwen3.Qwen3:
    """A new model whose parameters are fn(path, array) of the old ones (the old model is untouched)."""
    graphdef, state = nnx.split(model)
    pure = jax.tree_util.tree_map_with_path(fn, nnx.to_pure_dict(state))
    new_state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new_state, pure)
    return nnx.merge(graphdef, new_state)


def make_model(seed: int, cfg: qwen3.Qwen3Config | None = None, scale: float = WEIGHT_SCALE) -> qwen3.Qwen3:
    """A random Qwen3 with every non-norm weight scaled by `scale` (sharper, context-dependent logits)."""
    model = qwen3.init_model(cfg or tiny_config(), seed)
    return map_params(model, lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * scale)


def perturb(model: qwen3.Qwen3, noise: float, seed: int) -> qwen3.Qwen3:
    """The model with Gaussian noise of `noise` times each weight's std added: a draft that partly agrees."""
    keys = iter(jax.random.split(jax.random.key(seed), 4096))
    return map_params(model, lambda path, x: x + noise * jnp.std(x) * jax.random.normal(next(keys), x.shape))


def context_free(model: qwen3.Qwen3) -> qwen3.Qwen3:
    """Makes every embedding row equal. Each position then sees the same input vector; attention averages
    identical values (v carries no RoPE), so every hidden state, and with an untied head every next-token
    distribution, is the same whatever the context: acceptances become i.i.d. across positions."""
    assert not model.cfg.tie_word_embeddings
    return map_params(model, lambda path, x: jnp.broadcast_to(x[:1], x.shape) if jax.tree_util.keystr(path) == "['embed']" else x)


@pytest.fixture(scope="module")
def target():
    return make_model(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"random": make_model(1), "near": perturb(target, NEAR_DRAFT_NOISE, seed=2), "same": target}


@pytest.fixture(scope="module")
def tiny_pair():
    """Tiny-vocabulary target and a different, smaller random draft (partial acceptance, moderate entropy)."""
    return (make_model(10, tiny_config(TINY_VOCAB, layers=2, hidden=32)),
            make_model(11, tiny_config(TINY_VOCAB, layers=1, hidden=32)))


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("draft_name", ["random", "near"])
def test_spec_greedy_equals_target_greedy(target, drafts, gamma, draft_name):
    ref = gen.generate(target, PROMPTS, PROMPT_LENS, BUDGET, GREEDY)
    out = spec.speculative_generate(target, drafts[draft_name], PROMPTS, PROMPT_LENS, gamma, BUDGET, GREEDY)
    summary = spec.summarize(out.stats)
    print(f"greedy γ={gamma} draft={draft_name}: α={summary['acceptance_rate']:.3f} τ={summary['block_efficiency']:.3f}")
    np.testing.assert_array_equal(_np(out.tokens), _np(ref.tokens))
    np.testing.assert_array_equal(_np(out.lengths), np.full(len(PROMPTS), BUDGET))
    if draft_name == "near":  # rollbacks of different depths per row were exercised
        assert 0.0 < summary["acceptance_rate"] < 1.0
        assert len(set(_np(out.stats.accepted).tolist())) > 1


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_spec_draft_equals_target_block_efficiency_closed_form(target, drafts, gamma):
    """With draft = target every draft token is accepted: blocks of γ + 1, the last one cut by the budget."""
    out = spec.speculative_generate(target, drafts["same"], PROMPTS, PROMPT_LENS, gamma, BUDGET, GREEDY)
    summary = spec.summarize(out.stats)
    blocks_per_row = math.ceil(BUDGET / (gamma + 1))
    print(f"draft=target γ={gamma}: τ={summary['block_efficiency']} closed form {BUDGET / blocks_per_row}")
    np.testing.assert_array_equal(_np(out.stats.target_calls), blocks_per_row)
    assert summary["block_efficiency"] == BUDGET / blocks_per_row
    assert summary["acceptance_rate"] == 1.0
    assert summary["per_position_acceptance"] == [1.0] * gamma
    assert summary["draft_calls"] == gamma * summary["target_calls"]
    assert summary["emitted_tokens"] == BUDGET * len(PROMPTS)
    np.testing.assert_array_equal(_np(out.tokens), _np(gen.generate(target, PROMPTS, PROMPT_LENS, BUDGET).tokens))


@pytest.mark.parametrize("draft_case", ["tied_gqa", "untied_gqa"])
def test_spec_matches_hf_assisted_generation(tiny_checkpoints, draft_case):
    """Our greedy speculative tokens equal transformers' `generate(..., assistant_model=draft)` (batch 1)."""
    import torch
    from transformers import Qwen3ForCausalLM

    target_path, draft_path = tiny_checkpoints["untied_gqa"], tiny_checkpoints[draft_case]
    prompt = np.array([[5, 17, 200, 33, 9, 81]])
    new_tokens = 20
    target_hf = Qwen3ForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    draft_hf = Qwen3ForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
    # The tiny checkpoints have no EOS, so neither side stops early; pad_token_id only silences a warning.
    with torch.no_grad():
        hf = target_hf.generate(torch.tensor(prompt), assistant_model=draft_hf, do_sample=False,
                                max_new_tokens=new_tokens, pad_token_id=0).numpy()[:, prompt.shape[1]:]
    out = spec.speculative_generate(convert.load_hf(target_path), convert.load_hf(draft_path), prompt,
                                    np.array([prompt.shape[1]]), 3, new_tokens, GREEDY)
    print(f"HF assisted ({draft_case}): {spec.summarize(out.stats)['block_efficiency']=}")
    assert hf.shape == (1, new_tokens)
    np.testing.assert_array_equal(_np(out.tokens), hf)


@pytest.fixture(scope="module")
def moe_target():
    return make_model(20, tiny_moe_config())


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_spec_greedy_with_moe_target_equals_its_greedy(moe_target, gamma):
    """An MoE target and a draft that partly agrees with it (the target perturbed, itself MoE): verify calls of
    γ + 1 tokens per row (the experts of all the rows' tokens at once) and rollbacks of different depths give
    token for token the target's own greedy decoding."""
    ref = gen.generate(moe_target, PROMPTS, PROMPT_LENS, BUDGET, GREEDY)
    draft = perturb(moe_target, NEAR_DRAFT_NOISE, seed=3)
    out = spec.speculative_generate(moe_target, draft, PROMPTS, PROMPT_LENS, gamma, BUDGET, GREEDY)
    summary = spec.summarize(out.stats)
    print(f"greedy moe target γ={gamma}: α={summary['acceptance_rate']:.3f} τ={summary['block_efficiency']:.3f}")
    np.testing.assert_array_equal(_np(out.tokens), _np(ref.tokens))
    assert 0.0 < summary["acceptance_rate"] < 1.0 and len(set(_np(out.stats.accepted).tolist())) > 1


# ----------------------------------------------------------------------------------------------
# Lossless sampling
# ----------------------------------------------------------------------------------------------


def exact_first_two(target: qwen3.Qwen3, prompt: np.ndarray, sampler: Sampler) -> np.ndarray:
    """p(x1, x2) = p(x1) p(x2 | x1) [V, V] by enumerating x1 with full forward passes (float64, normalised)."""
    v = target.cfg.vocab_size
    seqs = np.concatenate([np.repeat(prompt[None], v, 0), np.arange(v)[:, None]], axis=1)
    logits_btv = target(jnp.asarray(seqs))
    p1_v = _np(sampling.probs(logits_btv[0, -2], sampler, target.cfg.real_vocab_size)).astype(np.float64)
    p2_vv = _np(sampling.probs(logits_btv[:, -1], sampler, target.cfg.real_vocab_size)).astype(np.float64)
    p1_v /= p1_v.sum()
    p2_vv /= p2_vv.sum(axis=1, keepdims=True)
    return p1_v[:, None] * p2_vv


def chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int, float]:
    """Pearson chi-square of counts against probabilities: (statistic, dof, p-value). Cells with expected count
    below MIN_EXPECTED are pooled into one; any count in a zero-probability cell gives p = 0."""
    observed, probs = observed.ravel().astype(np.float64), probs.ravel()
    if observed[probs == 0].sum() > 0:
        return math.inf, 0, 0.0
    expected = probs * observed.sum()
    big = expected >= MIN_EXPECTED
    small = (~big) & (probs > 0)
    obs = np.append(observed[big], observed[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    return stat, dof, float(scipy.stats.chi2.sf(stat, dof))


def first_two_counts(tokens_bn: np.ndarray, vocab: int) -> np.ndarray:
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens_bn[:, 0], tokens_bn[:, 1]), 1)
    return counts


# Deliberately wrong acceptance rules, registered here and not in production code: they show the
# lossless-sampling test has power.
#   accept_always: accept every draft token without the ratio test (the output follows q, not p).
#   resample_from_p: at a rejection draw from p_i instead of norm(max(p_i - q_i, 0)).
spec.register_acceptance_rule("accept_always", spec.AcceptanceRule(
    accept=lambda p_x_bt, q_x_bt, u_bt: jnp.ones(p_x_bt.shape, bool), residual=spec.lossless_residual))
spec.register_acceptance_rule("resample_from_p", spec.AcceptanceRule(
    accept=spec.lossless_accept, residual=lambda p_bv, q_bv: p_bv))

LOSSLESS_CASES = {
    "T=1": (Sampler(temperature=1.0), None),
    "T=0.7,top_k=12,top_p=0.95": (Sampler(temperature=0.7, top_k=12, top_p=0.95), None),
    "wrong:accept_always": (Sampler(temperature=1.0), "accept_always"),
    "wrong:resample_from_p": (Sampler(temperature=1.0), "resample_from_p"),
}


@pytest.mark.parametrize("case", list(LOSSLESS_CASES))
def test_spec_sampling_is_lossless(tiny_pair, case):
    """Joint of the first two tokens over 20k rows vs the exact target joint; wrong rules must be rejected."""
    sampler, variant = LOSSLESS_CASES[case]
    target, draft = tiny_pair
    prompts = np.repeat(LOSSLESS_PROMPT[None], NUM_SAMPLES, 0)
    lens = np.full(NUM_SAMPLES, len(LOSSLESS_PROMPT))
    out = spec.speculative_generate(target, draft, prompts, lens, LOSSLESS_GAMMA, 2, sampler, jax.random.key(123),
                                    acceptance=variant or "lossless")
    tokens = _np(out.tokens)
    assert (_np(out.lengths) == 2).all()
    stat, dof, pvalue = chi_square(first_two_counts(tokens, TINY_VOCAB), exact_first_two(target, LOSSLESS_PROMPT, sampler))
    summary = spec.summarize(out.stats)
    print(f"lossless {case}: chi2={stat:.1f} dof={dof} p={pvalue:.3g} (α={summary['acceptance_rate']:.3f}, "
          f"τ={summary['block_efficiency']:.3f}, n={NUM_SAMPLES})")
    assert 0.05 < summary["acceptance_rate"] < 0.95 or variant == "accept_always"  # acceptance is partial
    if variant is None:
        assert pvalue > PASS_LEVEL
    else:
        assert pvalue < POWER_LEVEL


def test_spec_first_block_acceptance_matches_sum_min(tiny_pair):
    """One block per row (budget 1): a_1 ≈ β(prompt) = Σ min(p, q) and a_2 ≈ Σ_x min(p, q)(x) β(prompt + x)."""
    target, draft = tiny_pair
    sampler = Sampler(temperature=1.0)
    prompts = np.repeat(LOSSLESS_PROMPT[None], NUM_SAMPLES, 0)
    lens = np.full(NUM_SAMPLES, len(LOSSLESS_PROMPT))
    out = spec.speculative_generate(target, draft, prompts, lens, LOSSLESS_GAMMA, 1, sampler, jax.random.key(7))
    summary = spec.summarize(out.stats)
    assert summary["target_calls"] == NUM_SAMPLES

    seqs = np.concatenate([np.repeat(LOSSLESS_PROMPT[None], TINY_VOCAB, 0), np.arange(TINY_VOCAB)[:, None]], axis=1)
    p_btv = _np(sampling.probs(target(jnp.asarray(seqs)), sampler, TINY_VOCAB)).astype(np.float64)
    q_btv = _np(sampling.probs(draft(jnp.asarray(seqs)), sampler, TINY_VOCAB)).astype(np.float64)
    min_v = np.minimum(p_btv[0, -2], q_btv[0, -2])
    beta_next_v = np.minimum(p_btv[:, -1], q_btv[:, -1]).sum(axis=1)
    exact = [min_v.sum(), (min_v * beta_next_v).sum()]
    for i, (got, want) in enumerate(zip(summary["per_position_acceptance"], exact)):
        stderr = math.sqrt(want * (1 - want) / NUM_SAMPLES)
        print(f"a_{i + 1}: measured {got:.4f} closed form {want:.4f} (stderr {stderr:.4f})")
        assert abs(got - want) < Z_TOLERANCE * stderr


def expected_blocks_with_budget(beta: float, gamma: int, budget: int) -> float:
    """E[blocks] to emit `budget` tokens when each draft token is accepted i.i.d. w.p. beta (no EOS)."""
    length_probs = [beta ** (j - 1) * (1 - beta) for j in range(1, gamma + 1)] + [beta**gamma]  # P(L = j)
    blocks = np.zeros(budget + gamma + 2)
    for emitted in range(budget - 1, -1, -1):
        blocks[emitted] = 1 + sum(pj * blocks[emitted + j] for j, pj in enumerate(length_probs, start=1))
    return float(blocks[0])


def test_spec_statistics_match_closed_forms_for_context_free_pair():
    """Context-free p and q: a_i = β^i, α = Σ_i β^i / γ, mean verified block length = (1 − β^(γ+1)) / (1 − β),
    and τ (with the budget's truncation) = N / E[blocks] from the exact recursion."""
    cfg = tiny_config(TINY_VOCAB, layers=1, hidden=32)
    target, draft = context_free(make_model(20, cfg)), context_free(make_model(21, cfg))
    sampler, gamma, batch, budget = Sampler(temperature=1.0), 3, 512, 32
    probe = jnp.asarray(np.random.RandomState(0).randint(0, TINY_VOCAB, (2, 9)))
    p_btv, q_btv = (_np(sampling.probs(m(probe), sampler, TINY_VOCAB)).astype(np.float64) for m in (target, draft))
    np.testing.assert_allclose(p_btv, np.broadcast_to(p_btv[:1, :1], p_btv.shape), atol=1e-6)  # context-free
    beta = float(np.minimum(p_btv[0, 0], q_btv[0, 0]).sum())

    prompts = np.random.RandomState(1).randint(0, TINY_VOCAB, (batch, 4))
    out = spec.speculative_generate(target, draft, prompts, np.full(batch, 4), gamma, budget, sampler, jax.random.key(3))
    s = spec.summarize(out.stats)
    blocks = s["target_calls"]
    length_probs = np.array([beta ** (j - 1) * (1 - beta) for j in range(1, gamma + 1)] + [beta**gamma])
    lengths = np.arange(1, gamma + 2)
    mean_len, var_len = (length_probs * lengths).sum(), (length_probs * lengths**2).sum() - (length_probs * lengths).sum() ** 2
    calls_b = _np(out.stats.target_calls).astype(np.float64)
    tau_budget = budget / expected_blocks_with_budget(beta, gamma, budget)
    checks = {  # name: (measured, closed form, standard error)
        **{f"a_{i}": (s["per_position_acceptance"][i - 1], beta**i, math.sqrt(beta**i * (1 - beta**i) / blocks))
           for i in range(1, gamma + 1)},
        "alpha": (s["acceptance_rate"], sum(beta**i for i in range(1, gamma + 1)) / gamma,
                  math.sqrt(var_len / blocks) / gamma),
        "verified_block_length": (s["verified_block_length"], (1 - beta ** (gamma + 1)) / (1 - beta),
                                  math.sqrt(var_len / blocks)),
        "tau_with_budget": (s["block_efficiency"], tau_budget,
                            tau_budget * calls_b.std() / (math.sqrt(batch) * calls_b.mean())),
    }
    print(f"context-free pair: β = Σmin(p,q) = {beta:.4f}, γ={gamma}, {blocks} blocks")
    assert abs(mean_len - (1 - beta ** (gamma + 1)) / (1 - beta)) < 1e-12  # the closed form is the mean
    for name, (got, want, stderr) in checks.items():
        print(f"  {name}: measured {got:.4f} closed form {want:.4f} (stderr {stderr:.4f})")
        assert abs(got - want) < Z_TOLERANCE * stderr


# ----------------------------------------------------------------------------------------------
# EOS and budget
# ----------------------------------------------------------------------------------------------


def test_spec_eos_inside_block_stops_only_its_row(target, drafts):
    """An EOS emitted mid-block ends that row right there; other rows go on; everything equals target greedy."""
    gamma = 5
    free = _np(spec.speculative_generate(target, drafts["same"], PROMPTS, PROMPT_LENS, gamma, BUDGET).tokens)
    # Choose as EOS a token of row 0 that sits strictly inside a block (blocks are γ + 1 long with draft =
    # target) and does not occur earlier in row 0.
    position = next(i for i in range(2, BUDGET) if i % (gamma + 1) not in (0, gamma) and free[0, i] not in free[0, :i])
    eos = int(free[0, position])
    for draft_name in ("same", "near"):
        out = spec.speculative_generate(target, drafts[draft_name], PROMPTS, PROMPT_LENS, gamma, BUDGET, eos_ids=[eos])
        ref = gen.generate(target, PROMPTS, PROMPT_LENS, BUDGET, eos_ids=[eos])
        tokens, lengths = _np(out.tokens), _np(out.lengths)
        np.testing.assert_array_equal(tokens, _np(ref.tokens))
        np.testing.assert_array_equal(lengths, _np(ref.lengths))
        assert lengths[0] == position + 1 and tokens[0, position] == eos
        assert (tokens[0, position + 1:] == decoding.DEFAULT_PAD_ID).all()
        for b in range(len(PROMPTS)):
            hits = np.flatnonzero(free[b] == eos)
            assert lengths[b] == (hits[0] + 1 if hits.size else BUDGET)  # budget exact where no EOS
        assert lengths.max() > lengths[0]  # other rows continued after row 0 stopped


def test_spec_sampling_eos_and_budget(tiny_pair):
    """Sampling path: a row ends at its first EOS (kept) or exactly at the budget, with padding after."""
    target, draft = tiny_pair
    eos, budget, batch = 5, 13, 256
    prompts = np.random.RandomState(2).randint(0, TINY_VOCAB, (batch, 3))
    lens = np.random.RandomState(3).randint(1, 4, batch)
    out = spec.speculative_generate(target, draft, prompts, lens, 3, budget, Sampler(temperature=1.0),
                                    jax.random.key(5), eos_ids=eos, pad_id=-1)
    tokens, lengths = _np(out.tokens), _np(out.lengths)
    for b in range(batch):
        row = tokens[b, : lengths[b]]
        assert (row[:-1] != eos).all() and (row >= 0).all()
        assert row[-1] == eos or lengths[b] == budget
        assert (tokens[b, lengths[b]:] == -1).all()
    np.testing.assert_array_equal(_np(out.stats.emitted), lengths)
    assert 0 < (lengths < budget).sum() < batch  # both endings occur


# ----------------------------------------------------------------------------------------------
# Compilation and input checks
# ----------------------------------------------------------------------------------------------


def test_spec_no_recompile_for_same_shapes(target, drafts):
    args = dict(gamma=3, max_new_tokens=BUDGET, sampler=Sampler(temperature=1.0))
    spec.speculative_generate(target, drafts["random"], PROMPTS, PROMPT_LENS, rng=jax.random.key(0), **args)
    compiled = spec.compiled_cache_size()
    other_prompts = (PROMPTS + 1) % VOCAB
    out = spec.speculative_generate(target, drafts["near"], other_prompts, PROMPT_LENS[::-1].copy(),
                                    rng=jax.random.key(1), **args)
    jax.block_until_ready(out)
    assert spec.compiled_cache_size() == compiled


def _bypassed_sampler(temperature: float) -> Sampler:
    sampler = Sampler()
    object.__setattr__(sampler, "temperature", temperature)  # skips __post_init__, as a careless caller might
    return sampler


BAD_INPUTS = {
    "gamma_zero": (dict(gamma=0), "gamma"),
    "gamma_not_int": (dict(gamma=2.0), "gamma"),
    "gamma_beyond_cache": (dict(gamma=8, cache_len=PROMPTS.shape[1] + BUDGET), "cache"),
    "prompt_longer_than_cache": (dict(cache_len=PROMPTS.shape[1] - 1), "do not fit"),
    "beyond_max_positions": (dict(max_new_tokens=300), "max_position_embeddings"),
    "vocab_size_differs": (dict(draft=tiny_config(vocab=VOCAB + 32)), "vocabularies differ"),
    "real_vocab_differs": (dict(draft=tiny_config().replace(num_real_tokens=VOCAB - 10)), "vocabularies differ"),
    "negative_temperature": (dict(sampler=_bypassed_sampler(-0.5)), "temperature"),
    "empty_batch": (dict(prompts=PROMPTS[:0], prompt_lens=PROMPT_LENS[:0]), "empty batch"),
    "prompt_len_zero": (dict(prompt_lens=np.array([7, 0, 1, 4])), "prompt_lens"),
    "prompt_len_too_long": (dict(prompt_lens=np.array([8, 2, 1, 4])), "prompt_lens"),
    "budget_zero": (dict(max_new_tokens=0), "max_new_tokens"),
    "unknown_acceptance_rule": (dict(acceptance="typo"), "acceptance"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_spec_bad_inputs_raise_before_compiling(target, case):
    overrides, message = BAD_INPUTS[case]
    args = dict(draft=target, prompts=PROMPTS, prompt_lens=PROMPT_LENS, gamma=3, max_new_tokens=BUDGET,
                sampler=GREEDY, cache_len=None, acceptance="lossless")
    args.update(overrides)
    if isinstance(args["draft"], qwen3.Qwen3Config):
        args["draft"] = qwen3.init_model(args["draft"], 0)
    compiled = spec.compiled_cache_size()
    with pytest.raises((ValueError, TypeError), match=message):
        spec.speculative_generate(target, args["draft"], args["prompts"], args["prompt_lens"], args["gamma"],
                                  args["max_new_tokens"], args["sampler"], jax.random.key(0),
                                  cache_len=args["cache_len"], acceptance=args["acceptance"])
    assert spec.compiled_cache_size() == compiled


def test_sampler_rejects_negative_temperature_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature=-1.0)


def test_spec_stats_merge_across_runs(target, drafts):
    """Per-row counters of several runs concatenate; the merged summary is the ratio of the summed counts."""
    runs = [spec.speculative_generate(target, drafts[name], PROMPTS, PROMPT_LENS, 3, BUDGET, GREEDY).stats
            for name in ("random", "near")]
    merged = spec.summarize(spec.merge_stats(runs))
    parts = [spec.summarize(s) for s in runs]
    assert merged["rows"] == 2 * len(PROMPTS)
    for key in ("target_calls", "draft_calls", "emitted_tokens", "accepted_tokens", "proposed_tokens"):
        assert merged[key] == sum(p[key] for p in parts)
    assert merged["block_efficiency"] == merged["emitted_tokens"] / merged["target_calls"]
    assert merged["acceptance_rate"] == merged["accepted_tokens"] / merged["proposed_tokens"]
    batch_blocks = sum(int(np.sum(_np(s.batch_blocks))) for s in runs)
    assert merged["batch_block_efficiency"] == merged["emitted_tokens"] / batch_blocks
    assert merged["batch_block_efficiency"] <= merged["block_efficiency"]


@pytest.mark.parametrize("case", ["T=1", "wrong:accept_always"])
def test_spec_sampling_is_lossless_with_moe_target(case):
    """The chi-square test of the first two tokens with an MoE target (and a dense draft): the lossless rule
    passes, the wrong one is rejected."""
    sampler, variant = LOSSLESS_CASES[case]
    target = make_model(30, tiny_moe_config(TINY_VOCAB, layers=2, hidden=32))
    draft = make_model(11, tiny_config(TINY_VOCAB, layers=1, hidden=32))
    prompts = np.repeat(LOSSLESS_PROMPT[None], NUM_SAMPLES, 0)
    lens = np.full(NUM_SAMPLES, len(LOSSLESS_PROMPT))
    out = spec.speculative_generate(target, draft, prompts, lens, LOSSLESS_GAMMA, 2, sampler, jax.random.key(7),
                                    acceptance=variant or "lossless")
    stat, dof, pvalue = chi_square(first_two_counts(_np(out.tokens), TINY_VOCAB),
                                   exact_first_two(target, LOSSLESS_PROMPT, sampler))
    summary = spec.summarize(out.stats)
    print(f"lossless moe target {case}: chi2={stat:.1f} dof={dof} p={pvalue:.3g} "
          f"(α={summary['acceptance_rate']:.3f}, n={NUM_SAMPLES})")
    assert 0.05 < summary["acceptance_rate"] < 0.95 or variant == "accept_always"
    assert pvalue > PASS_LEVEL if variant is None else pvalue < POWER_LEVEL


@pytest.mark.parametrize("sampler", [GREEDY, Sampler(temperature=1.0)], ids=["greedy", "t1"])
def test_kept_teacher_is_the_targets_top_k_at_each_emitted_token(target, drafts, sampler):
    """keep_top_k returns, beside every emitted token, the target's top-k and tail at the position that generated
    it: the same as a full forward of the target over the final sequence (online learning while serving)."""
    from distillspec_jax import sparse_teacher

    k, temperature, gamma = 5, 0.8, 3
    out = spec.speculative_generate(target, drafts["near"], PROMPTS, PROMPT_LENS, gamma, BUDGET, sampler,
                                    jax.random.key(4), keep_top_k=k, teacher_temperature=temperature,
                                    return_sequences=True)
    plain = spec.speculative_generate(target, drafts["near"], PROMPTS, PROMPT_LENS, gamma, BUDGET, sampler,
                                      jax.random.key(4))
    np.testing.assert_array_equal(_np(out.tokens), _np(plain.tokens))  # keeping changes nothing that is served
    logits = sampling.filtered_logits(target(out.sequences), Sampler(temperature=temperature), VOCAB)
    full = sparse_teacher.top_k(logits, k)
    for b, (start, n) in enumerate(zip(PROMPT_LENS, _np(out.lengths))):
        rows = slice(start - 1, start - 1 + n)  # position t generates token t + 1
        np.testing.assert_array_equal(_np(out.teacher.ids)[b, :n], _np(full.ids)[b, rows])
        np.testing.assert_allclose(_np(out.teacher.logprobs)[b, :n], _np(full.logprobs)[b, rows], atol=2e-5)
        np.testing.assert_allclose(_np(out.teacher.tail)[b, :n], _np(full.tail)[b, rows], atol=2e-5)
