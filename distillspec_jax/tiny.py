"""The embedded offline default (`:tiny`): a tokenizer, a target and a weaker draft built from the
standard library's own source, with no network and in minutes on a laptop CPU.

1. A byte-level BPE with Qwen3's pre-tokenisation is trained on the library's .py files.
2. A Qwen3-architecture target is pre-trained with cross-entropy on that corpus.
3. A smaller Qwen3-architecture draft is pre-trained the same way for fewer steps: a generic draft
   that is worse at predicting the target than it could be, which is what DistillSpec then fixes.

Everything is deterministic for a given config, seed and Python standard library, and is cached in
a folder keyed by those, so reruns and other runs of the same study skip the build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
from collections.abc import Iterator

import numpy as np

from distillspec_jax import sharding as shd
from distillspec_jax import train
from distillspec_jax.data import source as data_source
from distillspec_jax.data import sources
from distillspec_jax.errors import Preempted
from distillspec_jax.models import convert, qwen3, qwen3_moe
from distillspec_jax.tokenizer import train_small_tokenizer

TOKENIZER_DIR = "tokenizer"
TARGET_DIR = "target"
DRAFT_DIR = "draft"
DONE_FILE = "built.json"
TINY_HEAD_DIM_TARGET = 64  # the target's head width
TINY_WARMUP_FRACTION = 0.1  # of pre-training steps spent in linear warmup
TINY_MAX_POSITIONS = 4096  # RoPE positions the tiny models are declared for (prompts + responses fit easily)


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """Where the built pieces live."""

    root: pathlib.Path
    tokenizer: pathlib.Path
    target: pathlib.Path  # Orbax folder (convert.load_orbax)
    draft: pathlib.Path


MOE_FIELDS = ("target_experts", "target_experts_per_tok", "target_expert_ffn")  # used when target_experts > 0


def cache_key(tiny_cfg: dict, seed: int) -> str:
    """Hash of everything the build depends on: its config, the seed, and the corpus (Python version). The MoE
    fields count only for an MoE target, so a dense build keeps the key it had before they existed."""
    if not tiny_cfg.get("target_experts", 0):
        tiny_cfg = {k: v for k, v in tiny_cfg.items() if k not in MOE_FIELDS}
    blob = json.dumps({"tiny": tiny_cfg, "seed": seed, "python": platform.python_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_config(tiny_cfg: dict, which: str, vocab_size: int) -> qwen3.Qwen3Config:
    """The tiny target's or draft's config; the target is Qwen3-MoE when tiny.target_experts > 0."""
    layers, hidden, heads, kv, ffn = (tiny_cfg[f"{which}_{k}"] for k in ("layers", "hidden", "heads", "kv_heads", "ffn"))
    if hidden % heads:
        raise ValueError(f"tiny.{which}_hidden={hidden} must be a multiple of tiny.{which}_heads={heads}")
    cfg = qwen3.Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, tie_word_embeddings=True,
        rope_theta=10_000.0, max_position_embeddings=TINY_MAX_POSITIONS)
    if which == "target" and tiny_cfg.get("target_experts", 0) > 0:
        return qwen3_moe.Qwen3MoeConfig.from_dense(cfg, num_experts=tiny_cfg["target_experts"],
                                        num_experts_per_tok=tiny_cfg["target_experts_per_tok"],
                                        moe_intermediate_size=tiny_cfg["target_expert_ffn"])
    return cfg


def corpus_sequences(token_stream: np.ndarray, seq_len: int, seed: int) -> np.ndarray:
    """Cuts the concatenated corpus into [N, seq_len] sequences in a fixed shuffled order."""
    n = len(token_stream) // seq_len
    seqs = token_stream[: n * seq_len].reshape(n, seq_len)
    return seqs[np.random.default_rng(seed).permutation(n)]


def _pretrain(model: qwen3.Qwen3, sequences: np.ndarray, steps: int, tiny_cfg: dict, seed: int,
              workdir: pathlib.Path, stage: str) -> qwen3.Qwen3:
    """Cross-entropy pre-training by the distillation step and loop (`train.pretrain`: resumable, checkpointed)."""
    batch = tiny_cfg["batch_size"]
    cfg = train.TrainConfig(
        divergence="ce", learning_rate=tiny_cfg["learning_rate"], warmup_steps=max(1, int(steps * TINY_WARMUP_FRACTION)),
        steps=steps, batch_size=batch, end_lr_fraction=0.1, weight_decay=0.0, grad_clip_norm=1.0, loss_chunk=0,
        checkpoint_every=steps, keep_checkpoints=1, log_every=max(1, steps // 10), seed=seed)
    mesh = shd.make_mesh(-1, 1, 1)
    local = shd.host_slice(batch)

    def batches(position: int, context: data_source.DataContext) -> Iterator[dict]:
        while True:
            rows = np.arange(position * batch, (position + 1) * batch) % len(sequences)
            tokens = sequences[rows][local]
            yield {"tokens": tokens, "loss_mask": np.ones_like(tokens, np.float32)}
            position += 1

    trained, result = train.pretrain(cfg, model, batches, workdir, mesh, stage=stage)
    if result.preempted:  # a half pre-trained model must not be cached as built; a rerun resumes it
        raise Preempted(f"stopped on request while pre-training the tiny model ({stage}); its checkpoint is saved")
    return trained


def build(tiny_cfg: dict, seed: int, cache_dir: str | os.PathLike) -> TinyModels:
    """Builds (or finds in the cache) the tokenizer, target and draft of the `:tiny` preset."""
    root = pathlib.Path(cache_dir) / f"tiny-{cache_key(tiny_cfg, seed)}"
    models = TinyModels(root, root / TOKENIZER_DIR, root / TARGET_DIR, root / DRAFT_DIR)
    if (root / DONE_FILE).is_file():
        logging.info("tiny models cached in %s", root)
        return models
    root.mkdir(parents=True, exist_ok=True)
    limit = None if tiny_cfg["corpus_files"] < 0 else tiny_cfg["corpus_files"]
    texts = [row["text"] for row in sources.stdlib_corpus(limit)]
    tokenizer = train_small_tokenizer(texts, tiny_cfg["vocab_size"])
    tokenizer.save_pretrained(models.tokenizer)
    # Files are separated by the pad/end-of-text token, as in LM pre-training corpora.
    stream = np.concatenate([np.asarray(tokenizer.encode(t) + [tokenizer.pad_token_id], np.int32) for t in texts])
    sequences = corpus_sequences(stream, tiny_cfg["seq_len"], seed)
    logging.info("tiny corpus: %d files, %d tokens, %d sequences", len(texts), len(stream), len(sequences))
    for which, out in (("target", models.target), ("draft", models.draft)):
        cfg = model_config(tiny_cfg, which, len(tokenizer))
        model = qwen3.init_model(cfg, seed=seed + (0 if which == "target" else 1))
        print(f"[prepare] pre-training the tiny {which}: {cfg.num_params() / 1e6:.2f}M parameters, "
              f"{tiny_cfg[which + '_steps']} steps", flush=True)
        model = _pretrain(model, sequences, tiny_cfg[f"{which}_steps"], tiny_cfg, seed, root / f"pretrain_{which}",
                          stage=f"prepare: {which}")
        convert.save_orbax(model, out)
        shutil.copytree(models.tokenizer, out / convert.TOKENIZER_DIR, dirs_exist_ok=True)
    (root / DONE_FILE).write_text(json.dumps({"tiny": tiny_cfg, "seed": seed, "tokens": int(len(stream))}, indent=2))
    return models
