"""Tokenisation, deterministic order, host slicing, length bucketing and static-shape padding.

`pack_sequences` is the one layout of a prompt+response sequence, for fixed responses here and for
generated ones inside the decode loops.

Batches are addressed by a global position (the number of batches drawn before them), so that a
resumed run draws exactly the batches an uninterrupted one would, and every host computes the same
order and keeps only its own rows. Sequence lengths are padded up to a multiple of `pad_multiple`,
so jit sees a handful of shapes rather than one per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax.data import tasks as tasks_lib

BUCKET_WINDOW = 16  # batches per sorting window: large enough to group lengths, small enough to stay random


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """One example as token ids: the prompt and, where the data has one, the fixed response."""

    prompt: np.ndarray  # [Tp] int32
    response: np.ndarray | None  # [Tr] int32, or None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize(examples: Sequence[dict], task: tasks_lib.Task, tokenizer, *, max_prompt_len: int,
             max_response_len: int, chat: bool = True, enable_thinking: bool = False) -> list[Tokenized]:
    """Renders and tokenises every example. Prompts keep their template: the instruction text is what
    gets truncated (its end), so the chat markers and the assistant header always survive."""
    if max_prompt_len < 1 or max_response_len < 1:
        raise ValueError(f"max_prompt_len and max_response_len must be >= 1, got {max_prompt_len}, {max_response_len}")
    out = []
    for ex in examples:
        prompt = _encode(tokenizer, tasks_lib.render_prompt(task, ex, tokenizer, chat, enable_thinking))
        if len(prompt) > max_prompt_len:
            prompt = _truncated_prompt(task, ex, tokenizer, chat, enable_thinking, max_prompt_len)
        response_text = tasks_lib.render_response(task, ex, tokenizer, chat)
        response = None
        if response_text is not None:
            response = np.asarray(_encode(tokenizer, response_text)[:max_response_len], np.int32)
        out.append(Tokenized(np.asarray(prompt, np.int32), response))
    return out


def _truncated_prompt(task, ex, tokenizer, chat, enable_thinking, max_len) -> list[int]:
    text_fn = task.instruction if chat else (task.raw_prompt or task.instruction)
    text_ids = _encode(tokenizer, text_fn(ex))

    def render(ids):
        cut_task = dataclasses.replace(task, instruction=lambda _: tokenizer.decode(ids),
                                       raw_prompt=lambda _: tokenizer.decode(ids))
        return _encode(tokenizer, tasks_lib.render_prompt(cut_task, ex, tokenizer, chat, enable_thinking))

    overhead = len(render([])) if chat else 0
    keep = max(0, max_len - overhead)
    prompt = render(text_ids[:keep])
    while len(prompt) > max_len and keep > 0:  # decode/encode at the cut can merge into a longer tail
        keep -= 1
        prompt = render(text_ids[:keep])
    if len(prompt) > max_len:
        raise ValueError(f"the {task.name} template alone needs {len(prompt)} tokens; raise max_prompt_len above it")
    return prompt


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def epoch_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int, bucket: bool) -> list[np.ndarray]:
    """The batches of one epoch as arrays of example indices; the same for every host and every rerun.

    With bucketing, indices are sorted by length inside windows of BUCKET_WINDOW batches (padding
    waste drops) and the batch order is then shuffled again (training sees no length curriculum).
    The last incomplete batch is dropped so that every batch has the static global size.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket:
        window = BUCKET_WINDOW * global_batch
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, range(window, len(order), window))])
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@dataclasses.dataclass
class Batcher:
    """Global batches by position over a tokenised dataset; each host materialises only its rows.

    position p is batch p % batches_per_epoch of epoch p // batches_per_epoch.
    """

    items: Sequence[Tokenized]
    global_batch: int
    seed: int
    pad_id: int
    pad_multiple: int = 64  # sequence lengths are rounded up to this (few static shapes)
    bucket: bool = True  # group similar lengths into the same batch
    host_index: int = 0
    host_count: int = 1

    def __post_init__(self):
        if len(self.items) < self.global_batch:
            raise ValueError(f"{len(self.items)} examples cannot fill one global batch of {self.global_batch}")
        if self.global_batch % self.host_count:
            raise ValueError(f"global batch {self.global_batch} does not divide over {self.host_count} hosts")
        self._lengths = np.asarray([len(it.prompt) + (0 if it.response is None else len(it.response))
                                    for it in self.items])
        self._epochs: dict[int, list[np.ndarray]] = {}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.global_batch

    def indices(self, position: int) -> np.ndarray:
        """Example indices of global batch `position` (all hosts' rows)."""
        epoch, i = divmod(position, self.batches_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self._lengths, self.global_batch, self.seed, epoch, self.bucket)}
        return self._epochs[epoch][i]

    def _local(self, position: int) -> list[Tokenized]:
        rows = self.indices(position)
        per_host = self.global_batch // self.host_count
        return [self.items[j] for j in rows[self.host_index * per_host : (self.host_index + 1) * per_host]]

    def prompts(self, position: int, length: int | None = None) -> dict[str, np.ndarray]:
        """This host's prompts of batch `position`, right-padded: prompts [b, Tp] int32, prompt_lens [b] int32.

        length fixes Tp (one static shape for generation); by default it is the bucketed longest prompt.
        """
        items = self._local(position)
        tp = length if length is not None else round_up(max(len(it.prompt) for it in items), self.pad_multiple)
        return pad_prompts([it.prompt for it in items], tp, self.pad_id)

    def sequences(self, position: int, length: int | None = None) -> dict[str, np.ndarray]:
        """This host's prompt+fixed-response sequences of batch `position` (see `pack_examples`)."""
        items = self._local(position)
        if any(it.response is None for it in items):
            raise ValueError("the 'fixed' generator needs responses in the data; this task/source has none")
        return pack_examples([it.prompt for it in items], [it.response for it in items], self.pad_id,
                             length=length, pad_multiple=self.pad_multiple)


def pad_prompts(prompts: Sequence[np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """prompts [B, length] right-padded with pad_id, prompt_lens [B]."""
    longest = max(len(p) for p in prompts)
    if longest > length:
        raise ValueError(f"a prompt of {longest} tokens does not fit the prompt length {length}")
    out, lens_b = _right_pad(prompts, pad_id, length)
    return {"prompts": out, "prompt_lens": lens_b}


def pack_sequences(prompts_bt, prompt_lens_b, responses_br, response_lens_b, pad_id: int,
                   length: int | None = None):
    """(sequences_bs int32, response_mask_bs bool): each row's prompt, then its response, then pad_id.

    prompts_bt [B, T] and responses_br [B, R] are right-padded, described by prompt_lens_b and
    response_lens_b [B]; S = `length`, by default T + R, and every row's prompt + response must fit in it.
    The result is left-aligned (position 0 is the first prompt token), as the causal full forward
    `model(tokens_bt)` and the distillation loss expect. One implementation for both callers: NumPy
    arrays in give NumPy arrays out (the fixed responses, on the host), jax arrays in give jax arrays out
    (generated responses, traced inside the decode loops).
    """
    traced = any(isinstance(x, jax.Array) for x in (prompts_bt, prompt_lens_b, responses_br, response_lens_b))
    xp = jnp if traced else np
    prompts_bt, responses_br = xp.asarray(prompts_bt), xp.asarray(responses_br)
    prompt_lens_b, response_lens_b = xp.asarray(prompt_lens_b), xp.asarray(response_lens_b)
    t, r = prompts_bt.shape[1], responses_br.shape[1]
    s_1s = xp.arange(t + r if length is None else length)[None, :]
    in_prompt_bs = s_1s < prompt_lens_b[:, None]
    response_index_bs = s_1s - prompt_lens_b[:, None]
    response_mask_bs = (response_index_bs >= 0) & (response_index_bs < response_lens_b[:, None])
    from_prompt_bs = xp.take_along_axis(prompts_bt, xp.clip(s_1s, 0, t - 1).repeat(prompts_bt.shape[0], 0), axis=1)
    from_response_bs = xp.take_along_axis(responses_br, xp.clip(response_index_bs, 0, r - 1), axis=1)
    sequences_bs = xp.where(in_prompt_bs, from_prompt_bs, xp.where(response_mask_bs, from_response_bs, pad_id))
    return sequences_bs.astype(xp.int32), response_mask_bs


def pack_examples(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], pad_id: int,
                  length: int | None = None, pad_multiple: int = 64) -> dict[str, np.ndarray]:
    """`pack_sequences` of variable-length examples, padded to `length` (default: the longest rounded up).

    tokens [B, T] int32; response_mask [B, T] float32, 1 where the token is part of the response.
    """
    total = max(len(p) + len(r) for p, r in zip(prompts, responses))
    t = length if length is not None else round_up(total, pad_multiple)
    if total > t:
        raise ValueError(f"a sequence of {total} tokens does not fit the length {t}")
    # At least one column each, so that pack_sequences can gather from an empty response batch.
    prompts_bt, prompt_lens_b = _right_pad(prompts, pad_id, max(1, max(len(p) for p in prompts)))
    responses_br, response_lens_b = _right_pad(responses, pad_id, max(1, max(len(r) for r in responses)))
    tokens, response_mask = pack_sequences(prompts_bt, prompt_lens_b, responses_br, response_lens_b, pad_id, length=t)
    return {"tokens": tokens, "response_mask": response_mask.astype(np.float32)}


def _right_pad(rows: Sequence[np.ndarray], pad_id: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] int32 right-padded with pad_id (every row fits), and the lengths [B] int32."""
    lens_b = np.asarray([len(r) for r in rows], np.int32)
    out = np.full((len(rows), width), pad_id, np.int32)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out, lens_b
