"""The training loop around the jitted step: Orbax checkpoints, resume, SIGTERM, the non-finite guard and
metrics (design §6, §7); and `pretrain`, the same step and loop for next-token pre-training of one model.

The batches come from a `data.source.BatchSource` (the protocol is documented there).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from distillspec_jax import tracking
from distillspec_jax.checkpoint import Checkpointer
from distillspec_jax.data.source import BatchSource, DataContext
from distillspec_jax.errors import UserError
from distillspec_jax.models import qwen3
from distillspec_jax.progress import Progress
from distillspec_jax.train.config import TrainConfig
from distillspec_jax.train.distiller import Distiller
from distillspec_jax.train.state import TrainState


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
    """SIGTERM (preemption) stops the loop after a step, with a checkpoint; a step is never interrupted half way.

    One process: a Python handler sets a flag that the loop reads between steps (installed only from the main
    thread). Several processes: all must stop after the same step, and the coordination service that
    jax.distributed started already listens for SIGTERM on every process and agrees on that step (its
    preemption sync point: the largest step any process has reached, plus one) without any device transfer, so
    the loop does not wait on the devices each step. No Python handler is installed then: it would replace the
    service's. Without the service (jax_enable_preemption_service off) the processes gather their flags every
    step instead, which waits for each step to finish."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._sync_manager = None

    def _handle(self, signum, frame):
        del frame
        logging.warning("signal %d received: saving a checkpoint after the current step, then stopping", signum)
        self.requested = True

    def __enter__(self) -> _StopSignal:
        if jax.process_count() > 1:
            from jax._src import distributed

            self._sync_manager = distributed.global_state.preemption_sync_manager
            if self._sync_manager is not None:
                return self
            logging.warning("jax.distributed runs without its preemption service: the processes agree on a stop "
                            "request by a collective after every step")
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, step: int) -> bool:
        """Whether to stop now, after `step` steps; every process must call this before every step, with the same
        step numbers, and all processes get the same answer at the same step."""
        if jax.process_count() == 1:
            return self.requested
        if self._sync_manager is not None:
            if self._sync_manager.reached_sync_point(step):
                logging.warning("a preemption notice reached the job: every process stops after step %d", step)
                return True
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([self.requested]))))


class _Pending(NamedTuple):
    """A step whose metrics are still on the device."""

    step: int  # the step number (1-based) these metrics belong to
    position: int  # the data position of its batch
    positions: int  # token positions its batch computes on
    metrics: dict[str, jax.Array]


def _pull(pending: list[_Pending]) -> list[dict[str, float]]:
    """Every pending step's metrics on the host, in one transfer (the loop's only wait on the device)."""
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get([p.metrics for p in pending])]


def run(distiller: Distiller, batches: BatchSource, workdir: str | os.PathLike, *,
        use_wandb: bool = False, wandb_project: str = "distillspec-jax", run_name: str | None = None,
        stage: str = "train", wandb_config: dict[str, Any] | None = None,
        tracking_options: dict[str, Any] | None = None) -> LoopResult:
    """Trains `distiller`'s draft until its cfg.steps, resuming from `workdir/checkpoints` when a checkpoint is there.

    Progress lines (rate, ETA, loss, acceptance) are printed under the label `stage`. W&B logs
    `wandb_config` (default: cfg) as the run config; tracking_options go to `tracking.MetricsLogger`.

    Checkpoints every cfg.checkpoint_every steps, at the end, and on SIGTERM (then returns with
    preempted=True). A NaN or infinite loss or gradient norm raises NonFiniteLossError naming the
    step, at the first pull of the metrics after it (every log_every steps and before every checkpoint); no
    state from that step on is saved, so the last checkpoint stays the last good one.
    """
    cfg = distiller.cfg
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
    progress = Progress(stage, cfg.steps, start=step)
    preempted = False
    try:
        with _StopSignal() as stop:
            stream = batches(position, context)
            # Metrics stay on the device and are pulled every log_every steps and before every checkpoint, so the
            # host never waits for a step to finish before dispatching the next. The non-finite guard reads each
            # step's device-side `finite` at every pull, which comes before any save: a bad state is never saved.
            pending: list[_Pending] = []
            tokens_since_log, positions_since_log, time_since_log = 0.0, 0, time.perf_counter()

            def pull() -> None:
                nonlocal last_metrics, tokens_since_log, positions_since_log
                for entry, host in zip(pending, _pull(pending)):
                    if not host.pop("finite"):
                        raise NonFiniteLossError(_non_finite_message(entry.step, host, entry.position, checkpointer))
                    host["learning_rate"] = float(distiller.schedule(entry.step - 1))  # the rate this update used
                    tokens_since_log += host["tokens"]  # what the loss counts (response tokens, no padding)
                    positions_since_log += entry.positions  # what the step computes on
                    last_metrics = host
                if pending:
                    progress.update(0, note=f"loss {last_metrics['loss']:.4f}, "
                                            f"acceptance {last_metrics['acceptance']:.3f}")
                pending.clear()

            while step < cfg.steps:
                if stop.agreed(step):
                    pull()
                    checkpointer.save(step, state, position, rng, last_metrics)
                    preempted = True
                    logging.warning("stopped at step %d on request; checkpoint saved", step)
                    break
                try:
                    local = next(stream)
                except StopIteration:
                    raise RuntimeError(f"the data source ended at position {position}, before step "
                                       f"{step + 1} of {cfg.steps}") from None
                batch = distiller.global_batch(local)
                state, metrics = distiller.step(state, batch)
                current["params"] = state.params
                step += 1
                pending.append(_Pending(step, position, int(np.prod(batch["tokens"].shape)), metrics))
                position += 1
                progress.update()
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                save_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
                if log_now or save_now:
                    pull()
                if log_now:
                    elapsed = time.perf_counter() - time_since_log
                    logger.log(step, {**last_metrics, "data_position": position,
                                      "tokens_per_s": tokens_since_log / max(elapsed, 1e-9),
                                      "positions_per_s": positions_since_log / max(elapsed, 1e-9)})
                    tokens_since_log, positions_since_log, time_since_log = 0.0, 0, time.perf_counter()
                if save_now:
                    checkpointer.save(step, state, position, rng, last_metrics)
            progress.done()
    finally:
        checkpointer.wait()  # a save in flight completes; nothing of a failed step is written
        checkpointer.close()
        logger.close()
    return LoopResult(state, step, position, preempted, last_metrics)


def pretrain(cfg: TrainConfig, model: qwen3.Qwen3, batches: BatchSource, workdir: str | os.PathLike, mesh, *,
             stage: str = "pretrain") -> tuple[qwen3.Qwen3, LoopResult]:
    """Next-token pre-training of one model by the distillation step and loop themselves (no target): the
    `:tiny` models are built this way. cfg's divergence must use no target (`ce`, the cross-entropy on the
    batch's own next tokens). Resumable and checkpointed like `run`. Returns the trained model and the loop's
    result (check `preempted`: a stopped run's model is only part trained)."""
    if cfg.uses_target:
        raise ValueError(f"pre-training trains on the batch's own tokens; divergence {cfg.divergence!r} needs "
                         "a target (use divergence='ce')")
    distiller = Distiller(cfg, model, None, mesh)
    result = run(distiller, batches, workdir, stage=stage)
    return distiller.draft_model(result.state.params), result
