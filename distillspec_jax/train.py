"""Distillation: the jitted train step (teacher forward, draft loss and gradients, AdamW update) and the
loop around it (Orbax checkpoints, resume, SIGTERM, non-finite guard, metrics). Design §3, §6, §7.

The jit boundary is pure. The draft is split once with `nnx.split`: its graphdef is static and closed
over, its parameters travel as a plain nested dict (`nnx.to_pure_dict` layout) together with the
optax state; both are donated and returned. The target (and AdaSPEC's reference draft) are frozen:
their parameters are arguments of the step and are never differentiated. Their numerics are the
caller's choice when loading them (bfloat16 compute for the target by default in the configs; a
float32 target makes the step exact for tests).

A batch is a dict of [B, T] arrays: `tokens` (int32, prompt + response, right padded) and
`loss_mask` (1 where position t's next-token distribution, the one generating token t + 1, is trained;
see `divergences.next_token_loss_mask`). Extra keys are ignored by the step.

The batches come from a `data.source.BatchSource` (the protocol is documented there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distillspec_jax import checks
from distillspec_jax import divergences as dv
from distillspec_jax import sharding as shd
from distillspec_jax import tracking
from distillspec_jax.checkpoint import Checkpointer
from distillspec_jax.data.source import BATCH_KEYS, Batch, BatchSource, DataContext
from distillspec_jax.errors import UserError
from distillspec_jax.models import qwen3
from distillspec_jax.progress import Progress

Params = dict[str, Any]  # nested dict of arrays, nnx.to_pure_dict layout


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The step and the loop. Validated on creation, before anything compiles."""

    divergence: str = "fkl"  # registered divergence: fkl | rkl | jsd | tvd | ce (see divergences.DIVERGENCES)
    jsd_beta: float = 0.5  # β of JSD[β], in [0, 1]; 0.5 is the symmetric JSD
    temperature: float = 1.0  # temperature of p and q in the loss (> 0): the decode temperature
    adaspec_fraction: float | None = None  # AdaSPEC fraction k of counted tokens trained on, in (0, 1]; None = off
    loss_chunk: int = 128  # sequence positions per loss chunk (memory: a few [B, C, V] buffers); 0 = unchunked
    learning_rate: float = 1e-4  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 100  # optimizer steps of linear warmup from 0
    total_steps: int = 1000  # optimizer steps of the run; the cosine decay reaches its floor here
    end_lr_fraction: float = 0.1  # cosine decay floor, as a fraction of learning_rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (not norm weights)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    grad_clip_norm: float = 1.0  # clip gradients to this global norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step; each global batch is split into this many
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end and on SIGTERM)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_every: int = 10  # steps between metrics lines
    remat: bool = False  # recompute each draft layer in the backward pass (activation memory of the step)
    seed: int = 0  # seed of the run's RNG (data generation); on resume the checkpointed RNG is used

    def __post_init__(self):
        self.loss_spec()  # divergence name, β, temperature, AdaSPEC fraction, chunk
        positive = ("total_steps", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("weight_decay and grad_clip_norm must be >= 0")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got b1={self.b1} b2={self.b2}")

    def loss_spec(self) -> dv.LossSpec:
        return dv.LossSpec(divergence=self.divergence, jsd_beta=self.jsd_beta, temperature=self.temperature,
                           adaspec_fraction=self.adaspec_fraction, chunk=self.loss_chunk)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to end_lr_fraction · learning_rate.
    A run that is all warmup (warmup_steps == total_steps, e.g. a short AdaSPEC reference) only warms up."""
    if cfg.warmup_steps == cfg.total_steps:  # optax's cosine part refuses a decay of 0 steps
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.learning_rate * cfg.end_lr_fraction)


def is_matrix(shape: tuple[int, ...], path: tuple) -> bool:
    """Whether a parameter is a matrix (an embedding or a projection) rather than a norm's scale vector;
    parameters under `layers` carry the stacked layer dimension in front."""
    stacked = any(getattr(k, "key", k) == qwen3.LAYERS_AXIS for k in path)
    return len(shape) - stacked >= 2


def _decay_mask(params: Params) -> Params:
    # Decay matrices (embeddings, projections); norm weights are scales around 1 and are not decayed.
    return jax.tree_util.tree_map_with_path(lambda path, x: is_matrix(x.shape, path), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup + cosine schedule."""
    clip = optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity()
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        mask=_decay_mask)
    return optax.chain(clip, adamw)


def _opt_state_shardings(abstract_opt_state, params_shardings: Params, mesh: Mesh):
    """Shardings of an optax state: every subtree shaped like the parameters (Adam's moments) is
    sharded like them; everything else (step counts) is replicated."""
    params_def = jax.tree.structure(params_shardings)

    def params_like(node) -> bool:
        return isinstance(node, dict) and jax.tree.structure(node) == params_def

    return jax.tree.map(lambda node: params_shardings if params_like(node) else shd.replicated(mesh),
                        abstract_opt_state, is_leaf=params_like)


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class TrainState(NamedTuple):
    """What the step replaces: the draft's parameters and the optimizer state (both donated)."""

    params: Params
    opt_state: optax.OptState


class Distiller:
    """The jitted train step and evaluation for one draft/target (/reference) triple on one mesh.

    Shapes and settings are checked here and in `check_batch`, before anything compiles: vocabularies,
    divergence and its hyperparameters, the reference's presence for AdaSPEC, batch divisibility, token ids.

    The draft passed in is consumed: its parameters become the training state, whose buffers each step
    donates (so no second copy of the draft lives on the devices). Reload the draft to use it afterwards.
    """

    def __init__(self, cfg: TrainConfig, draft: qwen3.Qwen3, target: qwen3.Qwen3 | None, mesh: Mesh,
                 reference: qwen3.Qwen3 | None = None):
        self.cfg = cfg
        self.spec = cfg.loss_spec()
        self.mesh = mesh
        if self.spec.uses_target and target is None:
            raise ValueError(f"divergence {cfg.divergence!r} needs a target model")
        if self.spec.adaspec and reference is None:
            raise ValueError("adaspec_fraction is set: AdaSPEC needs the reference draft (same init, distilled with FKL)")
        if target is not None:
            checks.check_same_vocabulary(draft.cfg, target.cfg, "target", "distillation")
        if reference is not None:
            checks.check_same_vocabulary(draft.cfg, reference.cfg, "reference draft", "AdaSPEC's loss gap")
        self.draft_cfg = draft.cfg
        self.real_vocab_size = draft.cfg.real_vocab_size
        # RoPE would run past the positions the models were trained for without any error: refuse it.
        self.max_positions = min(m.cfg.max_position_embeddings for m in (draft, target, reference) if m is not None)
        self.draft_graphdef, draft_state = nnx.split(draft)
        self._initial_params: Params | None = nnx.to_pure_dict(draft_state)
        self.params_shardings: Params = nnx.to_pure_dict(shd.state_shardings(draft_state, mesh))
        self.target_graphdef, self.target_params = self._frozen(target) if self.spec.uses_target else (None, {})
        self.reference_graphdef, self.reference_params = self._frozen(reference) if self.spec.adaspec else (None, {})
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        self._abstract_params = jax.eval_shape(lambda: self._initial_params)
        self.opt_shardings = _opt_state_shardings(jax.eval_shape(self.tx.init, self._abstract_params),
                                                  self.params_shardings, mesh)
        self.state_shardings = TrainState(self.params_shardings, self.opt_shardings)
        batch_shardings = {key: shd.batch_sharding(mesh, 2) for key in BATCH_KEYS}
        frozen_shardings = (self._shardings_of(self.target_params), self._shardings_of(self.reference_params))
        replicated = shd.replicated(mesh)
        self._step = jax.jit(self._step_fn,
                             in_shardings=(self.state_shardings, *frozen_shardings, batch_shardings),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self._gradients = jax.jit(self._gradients_fn,
                                  in_shardings=(self.params_shardings, *frozen_shardings, batch_shardings),
                                  out_shardings=(self.params_shardings, replicated))
        self._eval = jax.jit(self._eval_fn, in_shardings=(self.params_shardings, *frozen_shardings, batch_shardings),
                             out_shardings=replicated)
        self._init_opt = jax.jit(self.tx.init, in_shardings=(self.params_shardings,), out_shardings=self.opt_shardings)

    # -- models --------------------------------------------------------------------------------

    def _frozen(self, model: qwen3.Qwen3) -> tuple[nnx.GraphDef, Params]:
        graphdef, state = nnx.split(model)
        shardings = nnx.to_pure_dict(shd.state_shardings(state, self.mesh))
        return graphdef, shd.place(nnx.to_pure_dict(state), shardings)

    def _shardings_of(self, params: Params) -> Any:
        return jax.tree.map(lambda x: x.sharding, params)

    def draft_model(self, params: Params) -> qwen3.Qwen3:
        """The draft as an NNX model holding `params` (e.g. for on-policy generation)."""
        return nnx.merge(self.draft_graphdef, params)

    # -- state ---------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """The draft's initial parameters on their shardings and a fresh optimizer state."""
        if self._initial_params is None:
            raise RuntimeError("init_state can be called once; the initial parameters were released")
        params = shd.place(self._initial_params, self.params_shardings)
        self._initial_params = None  # do not keep a second copy of the draft alive during training
        return TrainState(params, self._init_opt(params))

    def release_initial_params(self) -> None:
        """Drops the reference to the draft's initial parameters (a resumed run never needs them)."""
        self._initial_params = None

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint straight onto the mesh."""
        return TrainState(_with_shardings(self._abstract_params, self.params_shardings),
                          _with_shardings(jax.eval_shape(self.tx.init, self._abstract_params), self.opt_shardings))

    # -- batches -------------------------------------------------------------------------------

    def check_batch(self, batch: Batch) -> None:
        """Shapes of a global batch; raises before compiling when it cannot be split as configured."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; a batch holds {list(BATCH_KEYS)} of shape [B, T]")
        shape = tuple(batch["tokens"].shape)
        if len(shape) != 2 or tuple(batch["loss_mask"].shape) != shape:
            raise ValueError(f"tokens and loss_mask must both be [B, T]; got {shape} and {tuple(batch['loss_mask'].shape)}")
        if shape[1] > self.max_positions:
            raise ValueError(f"batches of {shape[1]} positions exceed the models' max_position_embeddings="
                             f"{self.max_positions}; shorten the sequences (in main.py: data.max_prompt_len, "
                             "data.max_response_len or generator.max_new_tokens)")
        checks.check_token_ids(self.draft_cfg, batch["tokens"], "the batch's tokens")
        accum = self.cfg.grad_accum_steps
        if shape[0] % accum:
            raise ValueError(f"global batch {shape[0]} does not split into grad_accum_steps={accum} micro-batches")
        shd.check_batch_divides(shape[0] // accum, self.mesh,
                                "global batch" if accum == 1 else f"micro-batch (global batch / {accum})")

    def global_batch(self, local: Batch) -> Batch:
        """This host's rows -> global arrays sharded over ('data', 'fsdp')."""
        arrays = {"tokens": np.asarray(local["tokens"], np.int32),
                  "loss_mask": np.asarray(local["loss_mask"], np.float32)}
        batch = shd.global_batch_dict(arrays, self.mesh)
        self.check_batch(batch)
        return batch

    # -- the step ------------------------------------------------------------------------------

    def _token_values(self, params: Params, target_params: Params, reference_params: Params,
                      tokens_bt: jax.Array) -> dv.TokenValues:
        draft = nnx.merge(self.draft_graphdef, params)
        target_head = target_h_btd = reference_head = reference_h_btd = None
        if self.spec.uses_target:
            target = nnx.merge(self.target_graphdef, target_params)
            target_head, target_h_btd = target.logits, jax.lax.stop_gradient(target.hidden_states(tokens_bt))
        if self.spec.adaspec:
            reference = nnx.merge(self.reference_graphdef, reference_params)
            reference_head, reference_h_btd = reference.logits, jax.lax.stop_gradient(reference.hidden_states(tokens_bt))
        draft_h_btd = draft.hidden_states(tokens_bt, remat=self.cfg.remat)
        return dv.token_values(self.spec, self.real_vocab_size, draft.logits, draft_h_btd,
                               target_head, target_h_btd, dv.next_token_shift(tokens_bt),
                               reference_head, reference_h_btd)

    def _loss_sum(self, params, target_params, reference_params, tokens_bt, loss_mask_bt, weights_bt):
        """Σ w·D over one (micro-)batch, and the metric sums. weights None: from this pass (AdaSPEC
        selection included); otherwise given, already selected over the whole global batch."""
        values = self._token_values(params, target_params, reference_params, tokens_bt)
        if weights_bt is None:
            weights_bt = dv.loss_weights(self.spec, loss_mask_bt, values.adaspec_delta)
        sums = dv.metric_sums(values, loss_mask_bt, weights_bt)
        return jnp.sum(weights_bt * values.divergence), sums

    def _micro(self, x_bt: jax.Array) -> jax.Array:
        """[B, T] -> [A, B/A, T]. Micro-batch a takes rows a, a + A, a + 2A, ...: every batch shard holds
        the same number of rows of each micro-batch, so splitting moves no data between devices."""
        a = self.cfg.grad_accum_steps
        x_abt = jnp.swapaxes(x_bt.reshape(x_bt.shape[0] // a, a, *x_bt.shape[1:]), 0, 1)
        spec = PartitionSpec(None, shd.BATCH_AXES, *([None] * (x_bt.ndim - 1)))
        return jax.lax.with_sharding_constraint(x_abt, NamedSharding(self.mesh, spec))

    def _unmicro(self, x_abt: jax.Array) -> jax.Array:
        return jnp.swapaxes(x_abt, 0, 1).reshape(-1, *x_abt.shape[2:])

    def _grads_and_sums(self, params, target_params, reference_params, batch):
        grad_fn = jax.grad(self._loss_sum, has_aux=True)
        tokens_bt, mask_bt = batch["tokens"], batch["loss_mask"]
        if self.cfg.grad_accum_steps == 1:
            return grad_fn(params, target_params, reference_params, tokens_bt, mask_bt, None)
        tokens_abt, mask_abt = self._micro(tokens_bt), self._micro(mask_bt)
        delta_bt = None
        if self.spec.adaspec:
            # AdaSPEC ranks tokens over the whole global batch, so every micro-batch's ΔL is needed
            # before any gradient: one extra forward pass, the price of matching the big batch exactly.
            delta_abt = jax.lax.map(lambda t: self._token_values(params, target_params, reference_params,
                                                                 t).adaspec_delta, tokens_abt)
            delta_bt = self._unmicro(delta_abt)
        weights_abt = self._micro(dv.loss_weights(self.spec, mask_bt, delta_bt))

        def accumulate(carry, xs):
            grads, sums = grad_fn(params, target_params, reference_params, *xs)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             jax.eval_shape(grad_fn, params, target_params, reference_params,
                                            tokens_abt[0], mask_abt[0], weights_abt[0]))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (tokens_abt, mask_abt, weights_abt))
        return grads, sums

    def _gradients_fn(self, params, target_params, reference_params, batch):
        grads, sums = self._grads_and_sums(params, target_params, reference_params, batch)
        # The loss is Σ w·D / Σ w over the global batch; Σ w does not depend on the parameters.
        norm = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / norm).astype(p.dtype), grads, params)
        metrics = dv.finalize_metrics(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return grads, metrics

    def _step_fn(self, state: TrainState, target_params, reference_params, batch):
        grads, metrics = self._gradients_fn(state.params, target_params, reference_params, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), metrics

    def _eval_fn(self, params, target_params, reference_params, batch):
        values = self._token_values(params, target_params, reference_params, batch["tokens"])
        return dv.reduce_loss(self.spec, values, batch["loss_mask"])[1]

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch; `state` is donated (do not use it afterwards)."""
        self.check_batch(batch)
        return self._step(state, self.target_params, self.reference_params, {k: batch[k] for k in BATCH_KEYS})

    def gradients(self, params: Params, batch: Batch) -> tuple[Params, dict[str, jax.Array]]:
        """The gradient of the loss (accumulated over micro-batches as the step does) and the step's
        metrics, without an update: for checks and diagnostics."""
        self.check_batch(batch)
        return self._gradients(params, self.target_params, self.reference_params, {k: batch[k] for k in BATCH_KEYS})

    def evaluate(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Loss metrics of `params` on a global batch, without an update."""
        self.check_batch(batch)
        return self._eval(params, self.target_params, self.reference_params, {k: batch[k] for k in BATCH_KEYS})


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class LoopResult(NamedTuple):
    state: TrainState
    step: int  # optimizer steps done (the restored ones included)
    data_position: int  # batches consumed
    preempted: bool  # stopped by SIGTERM after saving a checkpoint
    last_metrics: dict[str, float]  # metrics of the last step (this call's, else the restored checkpoint's)


class NonFiniteLossError(UserError, FloatingPointError):
    """A step produced a NaN or infinite loss or gradient; the state of that step was not saved."""


def _non_finite_message(step: int, host: dict[str, float], position: int, checkpointer: Checkpointer) -> str:
    """What happened, and what a rerun does: resume from the newest checkpoint, or start again at step 0."""
    checkpointer.wait()  # a save in flight counts: it completes before the loop's caller sees this error
    latest = checkpointer.latest_step()
    if latest is None:
        where = (f"No checkpoint has been saved yet in {checkpointer.directory}: a rerun starts again from "
                 "step 0")
    else:
        where = f"The newest checkpoint is step {latest} in {checkpointer.directory}: a rerun resumes from it"
    return (f"non-finite loss at step {step}: loss={host['loss']} grad_norm={host['grad_norm']} (data position "
            f"{position}). The state of this step was not saved. {where}. Lower the learning rate, or check the "
            "data at that position.")


class _StopSignal:
    """SIGTERM (preemption) sets a flag that the loop checks between steps; the handler does no work
    itself, so a step is never interrupted half way. Installed only from the main thread."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        del frame
        logging.warning("signal %d received: saving a checkpoint after the current step, then stopping", signum)
        self.requested = True

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any process was asked to stop: all hosts must stop after the same step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([self.requested]))))


# TensorStore / gRPC status codes of failures of the storage or the machine rather than of the files.
def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(cfg: TrainConfig, distiller: Distiller, batches: BatchSource, workdir: str | os.PathLike, *,
        use_wandb: bool = False, wandb_project: str = "distillspec-jax", run_name: str | None = None,
        stage: str = "train", wandb_config: dict[str, Any] | None = None,
        tracking_options: dict[str, Any] | None = None) -> LoopResult:
    """Trains until cfg.total_steps, resuming from `workdir/checkpoints` when a checkpoint is there.

    Progress lines (rate, ETA, loss, acceptance) are printed under the label `stage`. W&B logs
    `wandb_config` (default: cfg) as the run config; tracking_options go to `tracking.MetricsLogger`.

    Checkpoints every cfg.checkpoint_every steps, at the end, and on SIGTERM (then returns with
    preempted=True). A NaN or infinite loss or gradient norm raises NonFiniteLossError naming the
    step; that state is never saved, so the last checkpoint stays the last good one.
    """
    checkpointer = Checkpointer(workdir, cfg.keep_checkpoints)
    restored = checkpointer.restore_newest(distiller.abstract_state())
    # The last step's metrics come from the checkpoint, not this process's memory: a run that resumes at
    # its final checkpoint (killed before its caller wrote a summary) trains no step, yet reports them.
    last_metrics: dict[str, float] = {}
    if restored is not None:
        step, state, position, rng, last_metrics = restored
        distiller.release_initial_params()
        logging.info("resumed from %s at step %d (data position %d)", checkpointer.directory, step, position)
    else:
        step, state, position, rng = 0, distiller.init_state(), 0, jax.random.key(cfg.seed)
    current = {"params": state.params}
    context = DataContext(rng=rng, draft=lambda: distiller.draft_model(current["params"]), mesh=distiller.mesh)
    logger = tracking.MetricsLogger(workdir, resume_step=step, use_wandb=use_wandb, wandb_project=wandb_project,
                                    run_name=run_name, config=wandb_config or dataclasses.asdict(cfg),
                                    **(tracking_options or {}))
    progress = Progress(stage, cfg.total_steps, start=step)
    preempted = False
    try:
        with _StopSignal() as stop:
            stream = batches(position, context)
            tokens_since_log, positions_since_log, time_since_log = 0.0, 0, time.perf_counter()
            while step < cfg.total_steps:
                if stop.agreed():
                    checkpointer.save(step, state, position, rng, last_metrics)
                    preempted = True
                    logging.warning("stopped at step %d on request; checkpoint saved", step)
                    break
                try:
                    local = next(stream)
                except StopIteration:
                    raise RuntimeError(f"the data source ended at position {position}, before step "
                                       f"{step + 1} of {cfg.total_steps}") from None
                batch = distiller.global_batch(local)
                position += 1
                state, metrics = distiller.step(state, batch)
                current["params"] = state.params
                host = _host_metrics(metrics)  # one small transfer per step: the guard below needs it
                if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
                    raise NonFiniteLossError(_non_finite_message(step + 1, host, position - 1, checkpointer))
                host["learning_rate"] = float(distiller.schedule(step))  # the rate this update used
                step += 1
                progress.update(note=f"loss {host['loss']:.4f}, acceptance {host['acceptance']:.3f}")
                positions_since_log += int(np.prod(batch["tokens"].shape))  # what the step computes on
                tokens_since_log += host["tokens"]  # what the loss counts (response tokens, no padding)
                last_metrics = host
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    elapsed = time.perf_counter() - time_since_log
                    logger.log(step, {**host, "data_position": position,
                                      "tokens_per_s": tokens_since_log / max(elapsed, 1e-9),
                                      "positions_per_s": positions_since_log / max(elapsed, 1e-9)})
                    tokens_since_log, positions_since_log, time_since_log = 0.0, 0, time.perf_counter()
                if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                    checkpointer.save(step, state, position, rng, host)
            progress.done()
    finally:
        checkpointer.wait()  # a save in flight completes; nothing of a failed step is written
        checkpointer.close()
        logger.close()
    return LoopResult(state, step, position, preempted, last_metrics)
