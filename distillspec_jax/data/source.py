"""The protocol between the data and the training loop.

A source is `batches(position, context) -> Iterator[batch]`: the batches starting at data
position `position` (the number of batches consumed before), each one this host's rows of a global
batch. Resuming calls it again with the restored position, so the stream continues exactly. The
context carries the run's RNG (per-batch keys are `fold_in(context.rng, position)`) and a callable
returning the draft with its current parameters: an on-policy source regenerates its responses with
it every K positions. The loop asks for the next batch only after the previous step has finished, so
the draft it sees is up to date; it must use the parameters at once and not keep them (the next step
donates their buffers).

A batch is a dict of [B, T] arrays: `tokens` (int32, prompt + response, right padded) and `loss_mask`
(1 where position t's next-token distribution, the one generating token t + 1, is trained). A source of
stored teacher outputs adds `teacher_ids` and `teacher_logprobs` [B, T, k] and `teacher_tail` [B, T]
(`sparse_teacher`). Other keys are ignored by the train step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from distillspec_jax.models import qwen3
from distillspec_jax.sparse_teacher import TEACHER_KEYS

BATCH_KEYS = ("tokens", "loss_mask")  # what the train step reads of every batch
Batch = dict[str, Any]


def batch_ranks(stored_teacher: bool) -> dict[str, int]:
    """The arrays the train step reads of a batch, with their ranks: [B, T] each, and with a stored teacher
    its [B, T, k] ids and log-probabilities and [B, T] tail."""
    ranks = dict.fromkeys(BATCH_KEYS, 2)
    if stored_teacher:
        ranks.update(zip(TEACHER_KEYS, (3, 3, 2)))
    return ranks


@dataclasses.dataclass(frozen=True)
class DataContext:
    """What a data source may use besides its position."""

    rng: jax.Array  # the run's data key (checkpointed); the batch at position i uses fold_in(rng, i)
    draft: Callable[[], qwen3.Qwen3]  # the draft with its current parameters (on-policy regeneration)
    mesh: Mesh  # for sources that generate with sharded models


BatchSource = Callable[[int, DataContext], Iterator[Batch]]
