"""Tiny draft/target pairs and synthetic batch sources shared by the training tests and their
subprocess workers (multi-host, SIGTERM)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from distillspec_jax import checkpoint, train
from distillspec_jax import sharding as shd
from distillspec_jax.data import source as data_source
from distillspec_jax.models import qwen3, qwen3_moe

VOCAB = 64  # tiny vocabulary (divides a tensor axis of 2); the last 4 ids are padding rows
REAL_VOCAB = 60
PROMPT_LEN = 4  # the first tokens of every row are prompt: not counted
# Target logits of std ~3: far from uniform, so the divergences start well above 0.
TARGET_HEAD_STD = 3.0

TARGET_CFG = qwen3.Qwen3Config(vocab_size=VOCAB, num_real_tokens=REAL_VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               rope_theta=10000.0, max_position_embeddings=256)
DRAFT_CFG = TARGET_CFG.replace(num_hidden_layers=1)
# An MoE target of the same vocabulary: 8 experts (2 per token) in every layer.
MOE_TARGET_CFG = qwen3_moe.Qwen3MoeConfig.from_dense(TARGET_CFG, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=32)


def make_target(seed: int = 1, cfg: qwen3.Qwen3Config = TARGET_CFG) -> qwen3.Qwen3:
    """A random target whose next-token distributions are far from uniform (a scaled LM head)."""
    model = qwen3.init_model(cfg, seed)
    head = model.lm_head[...]
    model.lm_head[...] = head * (TARGET_HEAD_STD / (qwen3.INIT_STDDEV * np.sqrt(cfg.hidden_size)))
    return model


def make_draft(seed: int = 0, cfg: qwen3.Qwen3Config = DRAFT_CFG, layer_scale: float = 1.0) -> qwen3.Qwen3:
    """A random draft; layer_scale multiplies the attention and MLP matrices (at the default init they
    are so small that tokens influence other positions only faintly)."""
    model = qwen3.init_model(cfg, seed)
    if layer_scale != 1.0:
        for module in (model.layers.attn, model.layers.mlp):  # stacked [L, ...]: matrices have ndim >= 3
            for value in vars(module).values():
                if isinstance(value, nnx.Param) and value[...].ndim >= 3:
                    value[...] = value[...] * layer_scale
    return model


def synthetic_batch(position: int, batch: int, seq: int, seed: int | list[int] = 0) -> dict[str, np.ndarray]:
    """The global batch at a data position: random real tokens, prompt of PROMPT_LEN, ragged right padding."""
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), position])
    tokens = rng.integers(0, REAL_VOCAB, size=(batch, seq), dtype=np.int32)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    positions = np.arange(seq)[None, :]
    response = (positions >= PROMPT_LEN) & (positions < lengths[:, None])
    tokens = np.where(positions < lengths[:, None], tokens, 0).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, :-1] = response[:, 1:]  # position t trains the distribution generating token t + 1
    return {"tokens": tokens, "loss_mask": loss_mask}


@dataclasses.dataclass
class SyntheticSource:
    """A resumable batch source: the batch at position i depends on i and, inside the loop, on the run's
    checkpointed RNG (so resuming checks that the RNG is restored); each host yields its own rows."""

    batch: int
    seq: int
    seed: int = 0
    nan_at: int | None = None  # position whose loss mask is corrupted with a NaN
    fail_at: int | None = None  # position at which the source raises (a simulated crash)
    sleep_s: float = 0.0  # per batch, so that a signal can arrive mid-run

    def __call__(self, position: int, context: data_source.DataContext | None) -> Iterator[dict[str, np.ndarray]]:
        rows = shd.host_slice(self.batch)
        while True:
            if position == self.fail_at:
                raise RuntimeError(f"simulated crash at data position {position}")
            seed = self.seed
            if context is not None:  # inside the loop: the run's checkpointed RNG picks the data
                seed = np.asarray(jax.random.key_data(jax.random.fold_in(context.rng, position))).tolist()
            b = synthetic_batch(position, self.batch, self.seq, seed)
            if position == self.nan_at:
                b["loss_mask"][0, PROMPT_LEN] = np.nan
            if self.sleep_s:
                time.sleep(self.sleep_s)
            yield {k: v[rows] for k, v in b.items()}
            position += 1


def params_to_numpy(params) -> dict[str, np.ndarray]:
    """Flat {path: array} of a parameter tree (gathered across hosts)."""
    flat = jax.tree_util.tree_flatten_with_path(shd.to_host(params))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in flat}


# The configuration of the sharding comparisons (in-process and multi-host): JSD with AdaSPEC selection
# (a global sort over the batch) and a chunk that does not divide the sequence (a padded last chunk).
# Adam normalises each coordinate, so a parameter whose gradient is near its epsilon (1e-8) turns float32
# rounding differences of another reduction order into update differences of order lr · 1e-2; the
# learning rate and a draft whose attention is not negligible (larger layer weights, hence no
# near-zero gradients from faint attention paths) keep those far below the 1e-5 tolerance.
SHARDING_CFG = train.TrainConfig(divergence="jsd", selection="adaspec", adaspec_fraction=0.5, learning_rate=1e-4, warmup_steps=0,
                                 steps=3, loss_chunk=5)
SHARDING_BATCH, SHARDING_SEQ = 8, 16


def selection(adaspec_fraction: float | None) -> dict:
    """TrainConfig's token-selection fields: None trains every counted token, a number k is AdaSPEC with k."""
    return {} if adaspec_fraction is None else {"selection": "adaspec", "adaspec_fraction": adaspec_fraction}
SHARDING_DRAFT_SCALE = 10.0


def run_steps(cfg: train.TrainConfig, mesh, steps: int, batch: int, seq: int, draft_layer_scale: float = 1.0,
              draft_seed: int = 0, target_seed: int = 1, reference_seed: int = 2) -> tuple[list[float], dict[str, np.ndarray]]:
    """`steps` train steps on synthetic data; (losses, final parameters as NumPy)."""
    reference = make_draft(reference_seed) if cfg.uses_reference else None
    draft = make_draft(draft_seed, layer_scale=draft_layer_scale)
    distiller = train.Distiller(cfg, draft, make_target(target_seed), mesh, reference)
    state = distiller.init_state()
    # The data the loop would feed (its RNG starts from the config's seed), without the loop.
    context = data_source.DataContext(rng=jax.random.key(cfg.seed), draft=lambda: None, mesh=mesh)
    source = SyntheticSource(batch, seq)(0, context)
    losses = []
    for _ in range(steps):
        state, metrics = distiller.step(state, distiller.global_batch(next(source)))
        losses.append(float(metrics["loss"]))
    assert distiller._step._cache_size() == 1, "the step compiled more than once"
    return losses, params_to_numpy(state.params)


def main_multihost(out: str, workdir: str, mesh_shape: tuple[int, int, int]) -> None:
    """Body of a multi-host worker (jax.distributed already started): the sharding comparison's steps,
    through the full loop (multi-process checkpoints and stop agreement included)."""
    from distillspec_jax import tracking

    cfg = dataclasses.replace(SHARDING_CFG, log_every=1, checkpoint_every=2)
    reference = make_draft(2) if cfg.uses_reference else None
    distiller = train.Distiller(cfg, make_draft(0, layer_scale=SHARDING_DRAFT_SCALE), make_target(1),
                                shd.make_mesh(*mesh_shape), reference)
    result = train.run(distiller, SyntheticSource(SHARDING_BATCH, SHARDING_SEQ), workdir)
    params = params_to_numpy(result.state.params)
    checkpoints = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints).manager.all_steps()  # collective: all hosts
    if jax.process_index() == 0:
        losses = [r["loss"] for r in tracking.read_metrics(pathlib.Path(workdir) / tracking.METRICS_FILE)]
        pathlib.Path(out).write_text(json.dumps({"losses": losses, "process_count": jax.process_count(),
                                                 "devices": jax.device_count(), "checkpoints": list(checkpoints)}))
        np.savez(pathlib.Path(out).with_suffix(".npz"), **params)


def main_multihost_sigterm(out: str, workdir: str, mesh_shape: tuple[int, int, int]) -> None:
    """Body of a multi-host worker that a SIGTERM to one of the processes stops: slow batches, and metrics and
    checkpoints only every 1000 steps (so no step waits on the devices, and the only checkpoint is the stop's).
    Each process writes its data position after every batch to `out`.<process>.position and, at the end,
    {"step", "preempted", "checkpoint"} to `out`.<process>.json."""
    cfg = dataclasses.replace(SHARDING_CFG, steps=1000, log_every=1000, checkpoint_every=1000)
    reference = make_draft(2) if cfg.uses_reference else None
    distiller = train.Distiller(cfg, make_draft(0), make_target(1), shd.make_mesh(*mesh_shape), reference)
    stem = f"{out}.{jax.process_index()}"
    source = SyntheticSource(SHARDING_BATCH, SHARDING_SEQ, sleep_s=0.2)

    def reported(position: int, context: data_source.DataContext | None) -> Iterator[dict[str, np.ndarray]]:
        for batch in source(position, context):
            pathlib.Path(f"{stem}.position").write_text(str(position))
            yield batch
            position += 1

    result = train.run(distiller, reported, workdir)
    latest = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints).latest_step()  # collective: all hosts
    pathlib.Path(f"{stem}.json").write_text(json.dumps({"step": result.step, "preempted": result.preempted,
                                                       "checkpoint": latest}))
