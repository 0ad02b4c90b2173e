"""Autoregressive generation equals a step-by-step full-forward reference (greedy and sampled, ragged prompts),
stops rows at EOS, keeps the budget exactly, packs prompt+response sequences, and compiles once per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import decoding
from distillspec_jax import generate as gen
from distillspec_jax import sampling
from distillspec_jax.sampling import Sampler
from tests.test_speculative import (PROMPT_LENS, PROMPTS, TINY_VOCAB, VOCAB, _bypassed_sampler, chi_square,
                                    make_model, tiny_config)

BUDGET = 17
SAMPLER = Sampler(temperature=0.9, top_k=40, top_p=0.9)
FIRST_TOKEN_SAMPLES = 8192
PASS_LEVEL = 1e-3


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def reference_decode(model, prompts_bt, lens_b, budget, sampler, rng, eos_ids=(), pad_id=decoding.DEFAULT_PAD_ID):
    """Step i: one full causal forward over prompt + tokens so far, then `sampling.sample` with key
    fold_in(rng, i) at each row's last position; rows stop after an EOS. No cache anywhere."""
    batch, prompt_len = prompts_bt.shape
    seq_bs = np.zeros((batch, prompt_len + budget), np.int32)
    seq_bs[:, :prompt_len] = prompts_bt
    forward = jax.jit(lambda tokens: model(tokens))
    tokens_bn = np.full((batch, budget), pad_id, np.int32)
    lengths_b, done_b = np.zeros(batch, np.int32), np.zeros(batch, bool)
    rows = np.arange(batch)
    for i in range(budget):
        logits_bv = forward(jnp.asarray(seq_bs))[rows, lens_b + i - 1]
        new_b = np.asarray(sampling.sample(jax.random.fold_in(rng, i), logits_bv, sampler, model.cfg.real_vocab_size))
        new_b = np.where(done_b, pad_id, new_b)
        tokens_bn[:, i] = new_b
        lengths_b += ~done_b
        done_b |= np.isin(new_b, eos_ids)
        seq_bs[rows, lens_b + i] = new_b
    return tokens_bn, lengths_b


@pytest.mark.parametrize("sampler", [Sampler(temperature=0.0), SAMPLER], ids=["greedy", "sampled"])
def test_generate_equals_step_by_step_reference(model, sampler):
    rng = jax.random.key(42)
    out = gen.generate(model, PROMPTS, PROMPT_LENS, BUDGET, sampler, rng)
    ref_tokens, ref_lengths = reference_decode(model, PROMPTS, PROMPT_LENS, BUDGET, sampler, rng)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), ref_lengths)
    assert (ref_lengths == BUDGET).all()  # budget exact without EOS
    assert len({tuple(r) for r in ref_tokens}) == len(PROMPTS)  # rows really differ


@pytest.mark.parametrize("sampler", [Sampler(temperature=0.0), SAMPLER], ids=["greedy", "sampled"])
def test_generate_eos_stops_each_row(model, sampler):
    """EOS = a token row 1 emits mid-way: each row ends at its own first EOS (kept), pads after, others go on."""
    rng = jax.random.key(3)
    free = np.asarray(gen.generate(model, PROMPTS, PROMPT_LENS, BUDGET, sampler, rng).tokens)
    position = next(i for i in range(3, BUDGET) if free[1, i] not in free[1, :i])
    eos = int(free[1, position])
    out = gen.generate(model, PROMPTS, PROMPT_LENS, BUDGET, sampler, rng, eos_ids=[eos], pad_id=-1)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(free[b] == eos)
        length = hits[0] + 1 if hits.size else BUDGET
        assert lengths[b] == length
        np.testing.assert_array_equal(tokens[b, :length], free[b, :length])  # same stream up to the EOS
        assert (tokens[b, length:] == -1).all()
    assert lengths[1] == position + 1 and lengths.max() > lengths[1]
    ref_tokens, ref_lengths = reference_decode(model, PROMPTS, PROMPT_LENS, BUDGET, sampler, rng, (eos,), -1)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_lengths)


def test_generate_first_token_distribution():
    """Statistically, independent of the reference sampler: 8192 first tokens vs softmax of the full forward."""
    model = make_model(10, tiny_config(TINY_VOCAB, layers=2, hidden=32))
    prompt = np.array([3, 7, 1, 4])
    sampler = Sampler(temperature=1.0)
    out = gen.generate(model, np.repeat(prompt[None], FIRST_TOKEN_SAMPLES, 0), np.full(FIRST_TOKEN_SAMPLES, 4), 1,
                       sampler, jax.random.key(9))
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=TINY_VOCAB)
    probs = np.asarray(jax.nn.softmax(model(jnp.asarray(prompt[None]))[0, -1])).astype(np.float64)
    stat, dof, pvalue = chi_square(counts, probs / probs.sum())
    print(f"first-token chi2={stat:.1f} dof={dof} p={pvalue:.3g}")
    assert pvalue > PASS_LEVEL


def test_generate_sequences_and_response_mask(model):
    out = gen.generate(model, PROMPTS, PROMPT_LENS, BUDGET, eos_ids=[int(7)], pad_id=-1, return_sequences=True)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    seqs, mask = np.asarray(out.sequences), np.asarray(out.response_mask)
    assert seqs.shape == mask.shape == (len(PROMPTS), PROMPTS.shape[1] + BUDGET)
    for b, (p, n) in enumerate(zip(PROMPT_LENS, lengths)):
        np.testing.assert_array_equal(seqs[b, :p], PROMPTS[b, :p])
        np.testing.assert_array_equal(seqs[b, p:p + n], tokens[b, :n])
        assert (seqs[b, p + n:] == -1).all()
        np.testing.assert_array_equal(np.flatnonzero(mask[b]), np.arange(p, p + n))
    # The packed sequences are what one causal pass scores: greedy tokens are its argmaxes.
    logits = np.asarray(model(jnp.asarray(np.maximum(seqs, 0))))
    predicted = logits.argmax(-1)[:, :-1][mask[:, 1:]]
    np.testing.assert_array_equal(predicted, seqs[:, 1:][mask[:, 1:]])


def test_generate_budget_of_one_and_single_token_prompts(model):
    prompts, lens = np.array([[4], [9]]), np.array([1, 1])
    out = gen.generate(model, prompts, lens, 1)
    ref_tokens, _ = reference_decode(model, prompts, lens, 1, Sampler(temperature=0.0), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), [1, 1])


def test_generate_no_recompile_for_same_shapes(model):
    gen.generate(model, PROMPTS, PROMPT_LENS, BUDGET, SAMPLER, jax.random.key(0))
    compiled = gen.compiled_cache_size()
    other = make_model(5)  # same config, different weights: same graphdef, new state
    out = gen.generate(other, (PROMPTS + 3) % VOCAB, PROMPT_LENS[::-1].copy(), BUDGET, SAMPLER, jax.random.key(1))
    jax.block_until_ready(out)
    assert gen.compiled_cache_size() == compiled


BAD_INPUTS = {
    "empty_batch": (dict(prompts=PROMPTS[:0], lens=PROMPT_LENS[:0]), "empty batch"),
    "prompt_len_zero": (dict(lens=np.array([7, 0, 1, 4])), "prompt_lens"),
    "prompt_len_too_long": (dict(lens=np.array([8, 2, 1, 4])), "prompt_lens"),
    "lens_shape": (dict(lens=PROMPT_LENS[:2]), "prompt_lens"),
    "budget_zero": (dict(budget=0), "max_new_tokens"),
    "cache_too_small": (dict(cache_len=PROMPTS.shape[1] + 2), "cache"),
    "beyond_max_positions": (dict(budget=400), "max_position_embeddings"),
    "negative_temperature": (dict(sampler=_bypassed_sampler(-1.0)), "temperature"),
    "eos_outside_vocab": (dict(eos_ids=[VOCAB]), "eos"),
    "sampling_without_rng": (dict(sampler=Sampler(temperature=1.0), rng=None), "rng"),
    # JAX indexes past the embedding table with NaN rows instead of failing: checked on the host.
    "token_id_too_large": (dict(prompts=np.where(PROMPTS == PROMPTS[0, 0], VOCAB, PROMPTS)), "outside the model's vocabulary"),
    "token_id_negative": (dict(prompts=np.where(PROMPTS == PROMPTS[0, 0], -1, PROMPTS)), "outside the model's vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_generate_bad_inputs_raise_before_compiling(model, case):
    args = dict(prompts=PROMPTS, lens=PROMPT_LENS, budget=BUDGET, sampler=Sampler(temperature=0.0),
                rng=jax.random.key(0), eos_ids=(), cache_len=None)
    overrides, message = BAD_INPUTS[case]
    args.update(overrides)
    compiled = gen.compiled_cache_size()
    with pytest.raises((ValueError, TypeError), match=message):
        gen.generate(model, args["prompts"], args["lens"], args["budget"], args["sampler"], args["rng"],
                     eos_ids=args["eos_ids"], cache_len=args["cache_len"])
    assert gen.compiled_cache_size() == compiled
