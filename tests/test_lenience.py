"""Lossy speculative decoding (DistillSpec §5, `distillspec_jax/lenience.py`) does what its closed form says.

* ε = 1 gives token for token the lossless loop's output for the same keys, for every form;
* for every form and two ε, the joint law of the first two tokens (20,000 rows, vocabulary 24) passes a
  chi-square test against the closed-form lossy law, computed here in float64 NumPy, and fails it against the
  target's own law p, so the test tells the two apart;
* on a context-free pair (the same p and q at every position) the measured acceptance equals α̂(ε) of the
  frontier within 5 standard errors, and tends to 1 as ε → 0;
* on constructed pairs TVD(P_ε, p) is 0 at ε = 1, grows as ε falls, and equals β_ε − β_1;
* bad lenience settings fail before anything compiles, in the API and in the config.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import jsd
from distillspec_jax import evaluate as ev
from distillspec_jax import experiment, lenience
from distillspec_jax import sampling
from distillspec_jax import speculative as spec
from distillspec_jax.sampling import Sampler
from tests.test_speculative import (LOSSLESS_GAMMA, LOSSLESS_PROMPT, NUM_SAMPLES, PASS_LEVEL, POWER_LEVEL, PROMPTS,
                                    PROMPT_LENS, TINY_VOCAB, Z_TOLERANCE, _np, chi_square, context_free,
                                    exact_first_two, first_two_counts, make_model, tiny_config, tiny_pair)

SAMPLED = Sampler(temperature=1.0)
# Two ε per form, lenient enough that P_ε is far from p at 20,000 rows, not so lenient that it is just q.
EPSILONS = {"p_over_eps": (0.6, 0.3), "p_over_eps2": (0.8, 0.5), "p_pow_eps": (0.9, 0.75)}
FORMS = tuple(EPSILONS)

assert tiny_pair  # a fixture of test_speculative, used here by name


def lossy_law_np(p_v: np.ndarray, q_v: np.ndarray, f_v: np.ndarray) -> np.ndarray:
    """P(y) = min(q, f(p))(y) + (1 − Σ min(q, f(p))) · norm(max(p − q, 0))(y), in float64 (the reference)."""
    accepted_v = np.minimum(q_v, f_v)
    residual_v = np.maximum(p_v - q_v, 0.0)
    rejected = 1.0 - accepted_v.sum(axis=-1, keepdims=True)
    mass = residual_v.sum(axis=-1, keepdims=True)
    return accepted_v + rejected * np.divide(residual_v, mass, out=np.zeros_like(residual_v), where=mass > 0)


FORMS_NP = {"p_over_eps": lambda p, e: p / e, "p_over_eps2": lambda p, e: p / e**2, "p_pow_eps": lambda p, e: p**e}


def exact_lossy_first_two(target, draft, prompt: np.ndarray, form: str, eps: float) -> np.ndarray:
    """P_ε(x1) P_ε(x2 | x1) [V, V]: every position follows the lossy law of its own (p, q) (γ ≥ 2, so neither
    of the first two tokens can be a bonus token drawn from p)."""
    v = target.cfg.vocab_size
    seqs = jnp.asarray(np.concatenate([np.repeat(prompt[None], v, 0), np.arange(v)[:, None]], axis=1))

    def dists(model):
        probs = _np(sampling.probs(model(seqs), SAMPLED, v)).astype(np.float64)
        probs /= probs.sum(axis=-1, keepdims=True)
        return probs[0, -2], probs[:, -1]

    (p1, p2), (q1, q2) = dists(target), dists(draft)
    law1 = lossy_law_np(p1, q1, FORMS_NP[form](p1, eps))
    law2 = lossy_law_np(p2, q2, FORMS_NP[form](p2, eps))
    np.testing.assert_allclose(_np(lenience.output_law(jnp.asarray(p2, jnp.float32), jnp.asarray(q2, jnp.float32),
                                                       form, eps)), law2, atol=1e-6)
    return law1[:, None] * law2


@pytest.mark.parametrize("form", FORMS)
def test_epsilon_one_is_the_lossless_loop_token_for_token(form):
    target, draft = make_model(0, tiny_config()), make_model(1, tiny_config(layers=1))
    for seed in (0, 1):
        kwargs = dict(sampler=SAMPLED, rng=jax.random.key(seed), return_sequences=False)
        lossless = spec.speculative_generate(target, draft, PROMPTS, PROMPT_LENS, 3, 23, **kwargs)
        lossy = spec.speculative_generate(target, draft, PROMPTS, PROMPT_LENS, 3, 23, **kwargs, lenience=form,
                                          epsilon=1.0)
        np.testing.assert_array_equal(_np(lossy.tokens), _np(lossless.tokens))
        np.testing.assert_array_equal(_np(lossy.stats.accepted), _np(lossless.stats.accepted))
        assert spec.summarize(lossy.stats)["lenient_fraction"] == 0.0
        assert 0 < spec.summarize(lossless.stats)["acceptance_rate"] < 1


@pytest.mark.parametrize("eps_index", [0, 1])
@pytest.mark.parametrize("form", FORMS)
def test_lossy_sampling_follows_the_closed_form_law(tiny_pair, form, eps_index):
    """Chi-square of the first two tokens' joint against P_ε (passes) and against p (fails)."""
    target, draft = tiny_pair
    eps = EPSILONS[form][eps_index]
    prompts = np.repeat(LOSSLESS_PROMPT[None], NUM_SAMPLES, 0)
    lens = np.full(NUM_SAMPLES, len(LOSSLESS_PROMPT))
    out = spec.speculative_generate(target, draft, prompts, lens, LOSSLESS_GAMMA, 2, SAMPLED, jax.random.key(321),
                                    lenience=form, epsilon=eps)
    assert (_np(out.lengths) == 2).all()
    counts = first_two_counts(_np(out.tokens), TINY_VOCAB)
    lossy = exact_lossy_first_two(target, draft, LOSSLESS_PROMPT, form, eps)
    lossless = exact_first_two(target, LOSSLESS_PROMPT, SAMPLED)
    stat, dof, pvalue = chi_square(counts, lossy)
    stat_p, dof_p, pvalue_p = chi_square(counts, lossless)
    summary = spec.summarize(out.stats)
    print(f"lossy {form} ε={eps}: against P_ε chi2={stat:.1f} dof={dof} p={pvalue:.3g}; against p chi2={stat_p:.1f} "
          f"dof={dof_p} p={pvalue_p:.3g}; TVD(joint P_ε, joint p)={0.5 * np.abs(lossy - lossless).sum():.3f}, "
          f"α={summary['acceptance_rate']:.3f}, lenient fraction {summary['lenient_fraction']:.3f}")
    assert pvalue > PASS_LEVEL
    assert pvalue_p < POWER_LEVEL
    assert 0 < summary["lenient_fraction"] < 1 and summary["acceptance_rate"] < 1


def test_acceptance_tends_to_one_and_matches_alpha_hat(tiny_pair):
    """Context-free models give every position the same (p, q), so with γ = 1 each block accepts
    independently with probability β_ε: the measured α must equal the frontier's α̂(ε) within 5 standard
    errors, rise as ε falls, and reach 1 as ε → 0."""
    cfg = tiny_config(TINY_VOCAB, layers=1, hidden=32).replace(tie_word_embeddings=False)
    target, draft = context_free(make_model(30, cfg)), context_free(make_model(31, cfg))
    rows_n, budget = 512, 16
    batches = [(np.repeat(LOSSLESS_PROMPT[None], rows_n, 0), np.full(rows_n, len(LOSSLESS_PROMPT)))]
    epsilons = (1.0, 0.5, 0.1, 1e-3)
    rows = ev.lenience_frontier(target, draft, batches, [1], budget, SAMPLED, jax.random.key(5), forms=FORMS,
                                epsilons=epsilons, measure_time=False)
    assert [(r["lenience"], r["epsilon"]) for r in rows] == [("lossless", 1.0)] + [(f, e) for f in FORMS
                                                                                    for e in epsilons]
    for form in FORMS:
        mine = [r for r in rows if r["lenience"] == form]
        alphas = [r["acceptance_rate"] for r in mine]
        for r in mine:
            stderr = math.sqrt(max(r["alpha_hat"] * (1 - r["alpha_hat"]), 1e-12) / r["proposed_tokens"])
            print(f"{form} ε={r['epsilon']:g}: α={r['acceptance_rate']:.4f} α̂={r['alpha_hat']:.4f} (stderr "
                  f"{stderr:.4f}), TVD(P_ε, p)={r['law_tvd']:.4f}, log-likelihood {r['log_likelihood']:.3f}")
            assert abs(r["acceptance_rate"] - r["alpha_hat"]) < Z_TOLERANCE * stderr + 1e-6
        assert alphas == sorted(alphas) and alphas[0] < 0.9 and alphas[-1] > 0.99
        assert mine[0]["law_tvd"] < 1e-6 and mine[-1]["law_tvd"] > 0.05


def test_law_distance_is_zero_at_one_grows_as_epsilon_falls_and_equals_the_acceptance_gained():
    rng = np.random.default_rng(0)
    p_nv = rng.dirichlet(np.full(16, 0.5), size=64)
    q_nv = rng.dirichlet(np.full(16, 0.5), size=64)
    q_nv[0] = p_nv[0]  # p = q: nothing to relax, the law stays p at every ε
    p, q = jnp.asarray(p_nv, jnp.float32), jnp.asarray(q_nv, jnp.float32)
    epsilons = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.01)
    for form in FORMS:
        tvd_en = np.stack([_np(lenience.law_distance(p, q, form, e)) for e in epsilons])
        beta_en = np.stack([_np(lenience.acceptance_probability(p, q, form, e)) for e in epsilons])
        law_env = np.stack([_np(lenience.output_law(p, q, form, e)) for e in epsilons])
        reference = np.stack([0.5 * np.abs(lossy_law_np(p_nv, q_nv, FORMS_NP[form](p_nv, e)) - p_nv).sum(-1)
                              for e in epsilons])
        np.testing.assert_allclose(law_env.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(tvd_en, reference, atol=1e-5)
        assert np.abs(tvd_en[0]).max() < 1e-6 and np.abs(tvd_en[:, 0]).max() < 1e-6
        assert (np.diff(tvd_en, axis=0) >= -1e-6).all() and (tvd_en[-1, 1:] > tvd_en[1, 1:]).all()
        np.testing.assert_allclose(tvd_en, beta_en - beta_en[:1], atol=1e-5)  # the distance paid = acceptance gained


@pytest.mark.parametrize("kwargs, message", [
    (dict(lenience="p_over", epsilon=0.5), "unknown lenience form 'p_over'"),
    (dict(lenience="p_over_eps", epsilon=0.0), r"epsilon in \(0, 1\]"),
    (dict(lenience="p_over_eps", epsilon=1.5), r"epsilon in \(0, 1\]"),
    (dict(lenience=None, epsilon=0.5), "without a lenience form"),
    (dict(lenience="p_over_eps", epsilon=0.5, sampler=Sampler(temperature=0.0)), "temperature > 0"),
])
def test_bad_lenience_fails_before_compiling(kwargs, message):
    target, draft = make_model(0, tiny_config()), make_model(1, tiny_config(layers=1))
    before = spec.compiled_cache_size()
    kwargs.setdefault("sampler", SAMPLED)
    with pytest.raises(ValueError, match=message):
        spec.speculative_generate(target, draft, PROMPTS, PROMPT_LENS, 2, 4, rng=jax.random.key(0), **kwargs)
    assert spec.compiled_cache_size() == before


@pytest.mark.parametrize("settings, message", [
    (dict(lenience="p_over"), "unknown: p_over"),
    (dict(lenience="p_over_eps", epsilons=(0.5, 0.0)), r"ε in \(0, 1\]"),
    (dict(lenience="p_over_eps", epsilons=(1.5,)), r"ε in \(0, 1\]"),
    (dict(epsilons=(0.5,)), "needs the lenience function"),
    (dict(lenience="p_over_eps"), "unless eval.epsilons"),
    (dict(lenience="p_over_eps", epsilons=(0.5,), temperatures=(0.0,)), "add a temperature > 0"),
])
def test_bad_lenience_config_fails_validation(settings, message):
    c = jsd.get_config("test")
    c.eval.update(settings)
    with pytest.raises(ValueError, match=message):
        experiment.validate(c)
