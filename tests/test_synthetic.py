"""Synthetic (Magpie-style) queries: the empty user prefix of Qwen3's template, queries sampled by a model with the
Qwen3 vocabulary that render back through the chat template, deduplication and the length filter, the error when
too few distinct queries come out, and the config checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import jsd
from distillspec_jax import checks
from distillspec_jax import sharding as shd
from distillspec_jax.data import generators, pipeline, synthetic
from distillspec_jax.models import qwen3
from distillspec_jax.tokenizer import offline_qwen3_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return offline_qwen3_tokenizer()


def test_the_chat_prefix_is_the_template_up_to_the_users_text(tokenizer):
    assert tokenizer.decode(synthetic.query_prefix(tokenizer, chat=True)) == "<|im_start|>user\n"
    assert synthetic.query_prefix(tokenizer, chat=False) == [tokenizer.pad_token_id]


def test_duplicates_and_short_queries_are_dropped():
    seen: set[str] = {"old"}
    kept = synthetic.distinct_queries(["a b c", " a b c ", "old", "short", "", "new one"], [3, 3, 3, 1, 0, 2], 2, seen)
    assert kept == ["a b c", "new one"]
    assert synthetic.distinct_queries(["new one", "third"], [2, 2], 2, seen) == ["third"]


def test_queries_written_by_a_model_render_through_the_chat_template(tokenizer):
    cfg = qwen3.Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    model = qwen3.init_model(cfg, seed=0)
    eos = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
    spec = synthetic.SyntheticQueries(num_prompts=6, max_tokens=10, min_tokens=3)
    queries = synthetic.write_queries(model, tokenizer, spec, chat=True, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                                      batch_rows=4, rng=jax.random.key(0), mesh=shd.make_mesh(1, 1, 1,
                                                                                              jax.devices()[:1]))
    assert len(queries) == 6 and len(set(queries)) == 6
    items = pipeline.tokenize(synthetic.query_examples(queries), synthetic.QUERY_TASK, tokenizer, max_prompt_len=64,
                              max_response_len=8)
    header = tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    prefix = synthetic.query_prefix(tokenizer, chat=True)
    for query, item in zip(queries, items):
        ids = item.prompt.tolist()
        assert ids[: len(prefix)] == prefix and ids[-len(header) :] == header
        assert query in tokenizer.decode(ids) and item.response is None


def test_too_few_distinct_queries_is_an_error(tokenizer, monkeypatch):
    monkeypatch.setattr(generators, "generate_responses",
                        lambda model, prompts, *a, **kw: [np.arange(5, 15, dtype=np.int32)] * len(prompts))
    spec = synthetic.SyntheticQueries(num_prompts=4, max_tokens=10, min_tokens=3, max_rounds=2)
    with pytest.raises(ValueError, match="1 distinct queries .* in 2 rounds, fewer than synthetic.num_prompts=4"):
        synthetic.write_queries(None, tokenizer, spec, chat=True, eos_ids=(), pad_id=0, batch_rows=4,
                                rng=jax.random.key(0), mesh=None)


@pytest.mark.parametrize("field, value, message", [
    ("synthetic.num_prompts", 3, "at least distill.batch_size=8"),
    ("synthetic.temperature", 0.0, "synthetic.temperature"),
    ("synthetic.min_tokens", 500, r"\[1, 128\]"),
])
def test_bad_synthetic_settings_fail_validation(field, value, message):
    c = jsd.get_config("test")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=message):
        checks.check_fields(c)


def test_synthetic_queries_need_a_generator_that_writes_responses():
    c = jsd.get_config("test")
    c.synthetic.num_prompts, c.generator.kind = 16, "fixed"
    with pytest.raises(ValueError, match="generator.kind=target"):
        checks.check_fields(c)
