"""Synthetic queries (Magpie, Xu et al. 2024; Hong et al. 2025 §4): the target writes the training prompts itself.

An aligned chat model given only the chat template's empty user prefix (Qwen3: `<|im_start|>user\\n`) samples a
user turn, which ends with its end-of-turn token: a query from the distribution of queries it was tuned on. Each
query is then rendered as a whole user turn through the same template (with the assistant header), and the
configured generator gives it a response as it would a dataset prompt. A base model (`chat=False`, the `:tiny`
pair) has no user turn: its empty prefix is the document boundary (the pad / end-of-text token its corpus
separates files with), and a query is the document start it samples, cut at `max_tokens`.

Queries are deduplicated (exact text, whitespace-stripped) and filtered by length (`min_tokens`); sampling repeats
in rounds until `num_prompts` distinct queries are found, and fails, naming the fix, when `max_rounds` do not
suffice. Evaluation prompts stay the dataset's (the point is to train on synthetic and test on real queries).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from distillspec_jax.data import tasks
from distillspec_jax.sampling import Sampler

_SENTINEL = "\u0000QUERY\u0000"  # marks where the user's text goes in the rendered template
QUERY_TASK = tasks.Task("query", lambda ex: ex["query"], lambda ex: None, has_responses=False)


@dataclasses.dataclass(frozen=True)
class SyntheticQueries:
    """config.synthetic: how many queries the target writes, and how. Validated on creation."""

    num_prompts: int = 0  # training prompts written by the target; 0 = the dataset's own prompts
    temperature: float = 1.0  # sampling temperature of the queries (> 0: greedy would write one query)
    top_p: float = 1.0  # nucleus filter of the queries; 1 = off
    max_tokens: int = 128  # budget of one query
    min_tokens: int = 8  # shorter queries are dropped
    max_rounds: int = 8  # sampling rounds of num_prompts candidates before giving up

    def __post_init__(self):
        if self.num_prompts < 0:
            raise ValueError(f"synthetic.num_prompts must be >= 0 (0 = off), got {self.num_prompts}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"synthetic.temperature must be > 0 and top_p in (0, 1]; got {self.temperature}, "
                             f"{self.top_p}: greedy sampling writes the same query every time")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"synthetic.min_tokens must be in [1, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.max_rounds < 1:
            raise ValueError(f"synthetic.max_rounds must be >= 1, got {self.max_rounds}")

    @property
    def enabled(self) -> bool:
        return self.num_prompts > 0

    @property
    def sampler(self) -> Sampler:
        return Sampler(temperature=self.temperature, top_p=self.top_p)


def query_prefix(tokenizer, chat: bool) -> list[int]:
    """The token ids a query is sampled after: the chat template up to the user's text, or the document boundary."""
    if not chat:
        boundary = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return [int(boundary)]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=False)
    if _SENTINEL not in rendered:
        raise ValueError("the tokenizer's chat template does not render the user's text; it cannot write queries")
    return tokenizer.encode(rendered[: rendered.index(_SENTINEL)], add_special_tokens=False)


def distinct_queries(texts: Sequence[str], token_counts: Sequence[int], min_tokens: int,
                     seen: set[str]) -> list[str]:
    """The texts, whitespace-stripped, that are long enough and not in `seen` (which they are added to), in order."""
    out = []
    for text, count in zip(texts, token_counts):
        text = text.strip()
        if count >= min_tokens and text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def write_queries(model, tokenizer, spec: SyntheticQueries, *, chat: bool, eos_ids: tuple[int, ...], pad_id: int,
                  batch_rows: int, rng: jax.Array, mesh) -> list[str]:
    """`spec.num_prompts` distinct queries sampled by `model` from the empty user prefix (see the module)."""
    from distillspec_jax.data import generators, pipeline

    prefix = np.asarray(query_prefix(tokenizer, chat), np.int32)
    generation = generators.GeneratorSpec(kind="target", sampler=spec.sampler, max_new_tokens=spec.max_tokens,
                                          eos_ids=eos_ids, pad_id=pad_id)
    seen: set[str] = set()
    queries: list[str] = []
    eos = set(eos_ids)
    for round_ in range(spec.max_rounds):
        wanted = spec.num_prompts - len(queries)
        candidates = -(-wanted // batch_rows) * batch_rows
        sampled = generators.generate_responses(model, [prefix] * candidates, generation, batch_rows,
                                                pipeline.round_up(len(prefix), 8), jax.random.fold_in(rng, round_),
                                                mesh, stage=f"data: synthetic queries (round {round_ + 1})")
        ids = [[int(t) for t in r if int(t) not in eos] for r in sampled]
        queries += distinct_queries([tokenizer.decode(x) for x in ids], [len(x) for x in ids], spec.min_tokens, seen)
        if len(queries) >= spec.num_prompts:
            return queries[: spec.num_prompts]
    raise ValueError(f"the target wrote {len(queries)} distinct queries of >= {spec.min_tokens} tokens in "
                     f"{spec.max_rounds} rounds, fewer than synthetic.num_prompts={spec.num_prompts}; lower it, or raise "
                     "synthetic.temperature or synthetic.max_rounds")


def query_examples(queries: Sequence[str]) -> list[dict]:
    """Examples of QUERY_TASK: each query is the whole user turn."""
    return [{"query": q} for q in queries]
