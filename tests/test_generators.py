"""DistillSpec's data generators: what each trains on (fixed, target, on-policy draft, mix), where the loss
mask points, that on-policy data comes from the current draft, and that batches are addressed by position
(a resumed run draws the same data)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from distillspec_jax import generate as gen
from distillspec_jax import sharding as shd
from distillspec_jax import train
from distillspec_jax.data import generators, pipeline
from distillspec_jax.data import source as data_source
from distillspec_jax.sampling import Sampler
from tests import distill_helpers as h

BATCH, PROMPT_LEN, NEW = 8, 8, 6
N_EXAMPLES = 20
SAMPLER = Sampler(temperature=1.0)


def _items(seed: int = 0) -> list[pipeline.Tokenized]:
    rng = np.random.default_rng(seed)
    return [pipeline.Tokenized(rng.integers(1, h.REAL_VOCAB, rng.integers(2, PROMPT_LEN + 1)).astype(np.int32),
                               rng.integers(1, h.REAL_VOCAB, rng.integers(1, 5)).astype(np.int32))
            for _ in range(N_EXAMPLES)]


def _spec(kind: str, **kw) -> generators.GeneratorSpec:
    return generators.GeneratorSpec(kind=kind, sampler=SAMPLER, max_new_tokens=NEW, eos_ids=(), pad_id=0, **kw)


def _batcher(items=None) -> pipeline.Batcher:
    return pipeline.Batcher(items or _items(), BATCH, seed=0, pad_id=0, pad_multiple=4, bucket=True)


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(-1, 1, 1)


@pytest.fixture(scope="module")
def draft():
    return h.make_draft(seed=0, layer_scale=20.0)


def _context(mesh, model_fn) -> data_source.DataContext:
    return data_source.DataContext(rng=jax.random.key(7), draft=model_fn, mesh=mesh)


def test_fixed_batch_trains_the_positions_before_response_tokens(mesh):
    batcher = _batcher()
    source = generators.make_source(_spec("fixed"), batcher, PROMPT_LEN, seed=0)
    batch = next(source(2, _context(mesh, lambda: None)))
    rows = batcher.indices(2)
    assert batch["tokens"].shape == (BATCH, PROMPT_LEN + NEW) == batch["loss_mask"].shape
    for b, i in enumerate(rows):
        item = batcher.items[i]
        p, r = len(item.prompt), len(item.response)
        np.testing.assert_array_equal(batch["tokens"][b, : p + r], np.concatenate([item.prompt, item.response]))
        expected = np.zeros(PROMPT_LEN + NEW, np.float32)
        expected[p - 1 : p + r - 1] = 1.0  # position t is trained when token t + 1 is a response token
        np.testing.assert_array_equal(batch["loss_mask"][b], expected)


def test_draft_generator_samples_from_the_current_draft(mesh, draft):
    batcher = _batcher()
    source = generators.make_source(_spec("draft"), batcher, PROMPT_LEN, seed=0)
    context = _context(mesh, lambda: draft)
    batch = next(source(3, context))
    prompts = batcher.prompts(3, length=PROMPT_LEN)
    direct = gen.generate(draft, prompts["prompts"], prompts["prompt_lens"], NEW, SAMPLER,
                          jax.random.fold_in(context.rng, 3), return_sequences=True)
    np.testing.assert_array_equal(batch["tokens"], np.asarray(direct.sequences))
    mask = np.asarray(direct.response_mask, np.float32)
    np.testing.assert_array_equal(batch["loss_mask"][:, :-1], mask[:, 1:])
    assert batch["loss_mask"].sum() == int(np.sum(direct.lengths))


def _changed(model, scale: float):
    graphdef, state = nnx.split(model)
    scaled = jax.tree_util.tree_map_with_path(lambda path, x: x * scale if train.is_matrix(x.shape, path) else x,
                                              nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, scaled)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("every, refreshed", [(1, True), (2, False)])
def test_on_policy_refresh_follows_regenerate_every(mesh, draft, every, refreshed):
    # The loop swaps in new parameters after each step; the source must pick them up at the next refresh.
    current = {"model": draft}
    source = generators.make_source(_spec("draft", regenerate_every=every), _batcher(), PROMPT_LEN, seed=0)
    stream = source(0, _context(mesh, lambda: current["model"]))
    next(stream)
    current["model"] = _changed(draft, 3.0)
    second = next(stream)  # position 1
    fresh = next(generators.make_source(_spec("draft"), _batcher(), PROMPT_LEN, seed=0)(
        1, _context(mesh, lambda: current["model"] if refreshed else draft)))
    np.testing.assert_array_equal(second["tokens"], fresh["tokens"])


def test_batches_are_addressed_by_position(mesh, draft):
    # A resumed run starts its source at the restored position and must see the same batches.
    for kind in ("fixed", "draft"):
        source = generators.make_source(_spec(kind), _batcher(), PROMPT_LEN, seed=0)
        stream = source(0, _context(mesh, lambda: draft))
        straight = [next(stream) for _ in range(4)]
        resumed = next(source(3, _context(mesh, lambda: draft)))
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(resumed[key], straight[3][key])


def test_mix_chooses_per_example(mesh, draft):
    batcher = _batcher()
    context = _context(mesh, lambda: draft)

    def first(kind, **kw):
        return next(generators.make_source(_spec(kind, **kw), batcher, PROMPT_LEN, seed=0)(0, context))

    fixed, on_policy = first("fixed"), first("draft")
    only_other = first("mix", mix_lambda=0.0, mix_other="fixed")
    only_draft = first("mix", mix_lambda=1.0, mix_other="fixed")
    np.testing.assert_array_equal(only_other["tokens"], fixed["tokens"])
    np.testing.assert_array_equal(only_draft["tokens"], on_policy["tokens"])
    half = first("mix", mix_lambda=0.5, mix_other="fixed")
    takes_b = generators.mix_takes_draft(0, 0, _batcher().indices(0), 0.5)
    for b in range(BATCH):
        np.testing.assert_array_equal(half["tokens"][b], (on_policy if takes_b[b] else fixed)["tokens"][b])
    assert 0 < takes_b.sum() < BATCH  # both kinds present in this batch of 8 (fixed seed)
    np.testing.assert_array_equal(first("mix", mix_lambda=0.5, mix_other="fixed")["tokens"], half["tokens"])


@pytest.mark.parametrize("mix_lambda", [0.1, 0.5, 0.8])
def test_mix_honours_lambda_statistically(mix_lambda):
    """The draft share over many (batch, example) coins is Binomial(n, λ): within 4.5 standard deviations,
    a bound a correct coin misses for about one seed in 150000; a coin that ignored λ or its inputs misses by far."""
    positions, rows = 400, 50
    takes = np.stack([generators.mix_takes_draft(3, pos, np.arange(rows), mix_lambda) for pos in range(positions)])
    n = takes.size
    assert abs(takes.mean() - mix_lambda) <= 4.5 * np.sqrt(mix_lambda * (1 - mix_lambda) / n)
    # Independent across batches: the same example in consecutive batches agrees as often as independent coins.
    agree = np.mean(takes[1:] == takes[:-1])
    expected = mix_lambda**2 + (1 - mix_lambda) ** 2
    assert abs(agree - expected) <= 4.5 * np.sqrt(expected * (1 - expected) / takes[1:].size)


def test_generate_responses_covers_every_prompt(mesh, draft):
    prompts = [it.prompt for it in _items()]
    rng = jax.random.key(3)
    responses = generators.generate_responses(draft, prompts, _spec("target"), BATCH, PROMPT_LEN, rng, mesh)
    assert len(responses) == N_EXAMPLES
    # The third batch holds the last 4 prompts (filled up to 8); compare with a direct call.
    last = pipeline.pad_prompts(prompts[16:] + [prompts[0]] * 4, PROMPT_LEN, 0)
    direct = gen.generate(draft, last["prompts"], last["prompt_lens"], NEW, SAMPLER, jax.random.fold_in(rng, 2))
    for b in range(4):
        np.testing.assert_array_equal(responses[16 + b], np.asarray(direct.tokens[b, : int(direct.lengths[b])]))


@pytest.mark.parametrize("kw, message", [
    (dict(kind="teacher"), "unknown generator"),
    (dict(kind="mix", mix_lambda=1.5), "mix_lambda"),
    (dict(kind="mix", mix_other="draft"), "mix_other"),
    (dict(kind="draft", regenerate_every=0), "regenerate_every"),
])
def test_bad_generator_settings(kw, message):
    kind = kw.pop("kind")
    with pytest.raises(ValueError, match=message):
        _spec(kind, **kw)
