"""Online learning while serving (generator `serving`; the "online distillation" of Online Speculative Decoding,
Liu et al. 2023): the training prompts arrive as a stream of requests, served by speculative decoding with the
current draft; the target's distributions that the verify calls computed anyway are kept for every emitted token,
and every `requests_per_update` requests the draft takes `steps_per_update` optimizer steps on that buffer, with
the configured divergence on the stored-teacher buckets (`sparse_teacher`).

It is a batch source of the ordinary training loop, so serving and updating share the jitted programs that exist:
`speculative.speculative_generate` (with `keep_top_k`) serves, `Distiller.step` updates, and checkpoints, resume
and SIGTERM are the loop's. Optimizer step s belongs to update s // steps_per_update; the first step of each update
serves its K requests first, with the draft as it is then, so served request r always met the draft trained on
the requests before its update. The buffer keeps the newest records up to `buffer_tokens` response tokens; a batch
takes its rows uniformly from it (seeded by the data position). A resumed run starts its update by serving again
(the buffer is not checkpointed): like on-policy data, the requests it then serves meet the restored draft.

`serving.jsonl` in the workdir gets one line per update: requests served so far, τ and α of this update's requests
(as `speculative.summarize` defines them), the serving seconds, and the previous update's training seconds (the
extra cost: per request, that divided by K).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath

from distillspec_jax import sharding as shd
from distillspec_jax import speculative
from distillspec_jax.data import pipeline, teacher_store
from distillspec_jax.data import source as data_source
from distillspec_jax.sampling import Sampler

LOG_FILE = "serving.jsonl"
_ROWS_STREAM = 0x7365  # separates the buffer's row draws from other randomness ("se")


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """config.serving: how requests are served and how often the draft learns from them. Validated on creation."""

    gamma: int = 4  # draft tokens per verify block while serving
    temperature: float = 0.0  # serving's decoding temperature (0 = greedy); the loss keeps distill.temperature
    requests_per_update: int = 64  # K: requests served between two updates (a multiple of distill.batch_size)
    steps_per_update: int = 4  # optimizer steps of one update on the buffer
    buffer_tokens: int = 16384  # response tokens the buffer keeps (the newest requests'); >= one verify block

    def __post_init__(self):
        if self.gamma < 1 or self.requests_per_update < 1 or self.steps_per_update < 1:
            raise ValueError("serving.gamma, serving.requests_per_update and serving.steps_per_update must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"serving.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.buffer_tokens < self.gamma + 1:
            raise ValueError(f"serving.buffer_tokens={self.buffer_tokens} is smaller than one verify block (gamma + 1 = "
                             f"{self.gamma + 1} tokens): it could not hold what one target call verifies; raise it, "
                             "e.g. --config.serving.buffer_tokens=16384")

    def check_batch(self, batch_size: int) -> None:
        if self.requests_per_update % batch_size:
            raise ValueError(f"serving.requests_per_update={self.requests_per_update} must be a multiple of "
                             f"distill.batch_size={batch_size} (requests are served in batches of that size)")


class _Buffer:
    """The newest records, up to a number of response tokens (always at least the newest one)."""

    def __init__(self, tokens: int):
        self.tokens, self.records, self._held = tokens, deque(), 0

    def add(self, record: dict) -> None:
        self.records.append(record)
        self._held += len(record["ids"])
        while len(self.records) > 1 and self._held > self.tokens:
            self._held -= len(self.records.popleft()["ids"])


def make_source(spec: ServingSpec, target, batcher: pipeline.Batcher, prompt_len: int, *, max_new_tokens: int,
                eos_ids: tuple[int, ...], pad_id: int, logits_k: int, loss_temperature: float, seed: int,
                log_dir: str | None) -> data_source.BatchSource:
    """The serving source over `batcher`'s prompts (the request stream, in its order); see the module."""
    spec.check_batch(batcher.global_batch)
    rows = batcher.global_batch // jax.process_count()
    length = prompt_len + max_new_tokens
    serve_sampler = Sampler(temperature=spec.temperature)
    batches_per_update = spec.requests_per_update // batcher.global_batch
    log = epath.Path(log_dir) / LOG_FILE if log_dir and jax.process_index() == 0 else None

    def serve(update: int, draft, rng, mesh) -> tuple[list[dict], dict]:
        """Serves update `update`'s K requests; returns this host's records and the update's serving figures."""
        records, stats, start = [], [], time.perf_counter()
        mine = shd.host_slice(batcher.global_batch)
        for i in range(batches_per_update):
            local = batcher.prompts(update * batches_per_update + i, length=prompt_len)
            out = speculative.speculative_generate(
                target, draft, shd.global_batch(local["prompts"], mesh), shd.global_batch(local["prompt_lens"], mesh),
                spec.gamma, max_new_tokens, serve_sampler, jax.random.fold_in(rng, i), eos_ids=eos_ids, pad_id=pad_id,
                keep_top_k=logits_k, teacher_temperature=loss_temperature)
            host = shd.to_host({"tokens": out.tokens, "lengths": out.lengths, "teacher": tuple(out.teacher)})
            stats.append(out.stats)
            for row, b in enumerate(range(mine.start, mine.stop)):
                n, start_b = int(host["lengths"][b]), int(local["prompt_lens"][row])
                ids, logprobs, tail = (x[b, :n] for x in host["teacher"])
                records.append({"example": -1, "tokens": np.concatenate([local["prompts"][row, :start_b],
                                                                         host["tokens"][b, :n]]).astype(np.int32),
                                "prompt_len": start_b, "ids": ids, "logprobs": logprobs, "tail": tail})
        summary = speculative.summarize(speculative.merge_stats(stats))
        return records, {"block_efficiency": summary["block_efficiency"], "acceptance_rate": summary["acceptance_rate"],
                         "serve_s": time.perf_counter() - start}

    def batches(position: int, context: data_source.DataContext) -> Iterator[dict[str, np.ndarray]]:
        buffer = _Buffer(spec.buffer_tokens)
        trained_since = None  # when the previous update's training began (its cost is logged with the next)
        while True:
            update, step_in_update = divmod(position, spec.steps_per_update)
            if step_in_update == 0 or not buffer.records:
                records, row = serve(update, context.draft(), jax.random.fold_in(context.rng, update), context.mesh)
                for record in records:
                    buffer.add(record)
                row = {"update": update, "requests_served": (update + 1) * spec.requests_per_update, **row,
                       "train_s_previous_update": None if trained_since is None else time.perf_counter() - trained_since}
                if log is not None:
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                trained_since = time.perf_counter()
            draw = np.random.default_rng([seed, _ROWS_STREAM, position, jax.process_index()])
            chosen = draw.integers(0, len(buffer.records), rows)
            yield teacher_store.pack_records([buffer.records[int(j)] for j in chosen], length, pad_id)
            position += 1

    return batches

