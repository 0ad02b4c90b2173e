"""Training checkpoints: Orbax over `<workdir>/checkpoints`, one folder per step holding the parameters and
the optimizer state (sharded arrays) and the step's metadata (data position, RNG key, last metrics), with a
fallback past checkpoints that no longer restore. The state is any (params, opt_state) named tuple: restore
returns the abstract state's own type (train.TrainState).
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from distillspec_jax import hostmem
from distillspec_jax import sharding as shd
from distillspec_jax import tracking
from distillspec_jax import workdir as wd
from distillspec_jax.errors import Preempted, UserError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_PREFIX = "corrupt-"  # checkpoints/corrupt-<step>: a checkpoint that did not restore, kept aside
# Bytes of the state copied to the host at once while saving (Orbax's default is 96 GB: a copy of the whole
# state). Measured on CPU for the 0.6B draft's 7.15 GB state: peak resident +4.5 GB at 96, +0.9 GB at 1,
# both saving in 8 s.
SAVE_CONCURRENT_GB = 2




class CheckpointError(UserError):
    """No checkpoint of the workdir can be restored."""


class Restored(NamedTuple):
    step: int
    state: Any  # a (params, opt_state) named tuple: train's state
    data_position: int
    rng: jax.Array
    metrics: dict[str, float]  # the metrics of the checkpoint's last step ({} for older checkpoints)


class Checkpointer:
    """Orbax CheckpointManager over `workdir/checkpoints`: parameters and optimizer state (sharded
    arrays, written by their owners), plus step, data position, the RNG key and the last step's metrics
    (JSON). Orbax writes each step into a temporary folder and renames it when complete, so a crash never
    leaves a half-written checkpoint that resume would pick. A checkpoint damaged afterwards (a
    truncated file, a deleted folder) is caught by `restore_newest`, which tries it and falls back.
    Every process must create it and call save and restore together (they synchronise)."""

    def __init__(self, workdir: str | os.PathLike, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        directory = wd.path(workdir, CHECKPOINT_DIR)  # local (made absolute) or gs://
        self.directory = directory
        handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_position: int, rng: jax.Array,
             metrics: dict[str, float] | None = None) -> None:
        if step in self.manager.all_steps():
            return
        ocp = self._ocp
        meta = {"step": step, "data_position": data_position,
                "rng": [int(x) for x in np.asarray(jax.random.key_data(rng)).reshape(-1)],
                "rng_impl": str(jax.random.key_impl(rng)), "metrics": dict(metrics or {})}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract: Any, step: int | None = None) -> tuple[int, Any, int, jax.Array]:
        """(step, state, data position, rng) of `step` (default: the latest)."""
        return self._restore(abstract, self.latest_step() if step is None else step)[:4]

    def _restore(self, abstract: Any, step: int) -> Restored:
        ocp = self._ocp
        target = {"params": abstract.params, "opt_state": abstract.opt_state}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        meta = restored.meta
        key_data = np.asarray(meta["rng"], np.uint32).reshape(jax.random.key_data(jax.random.key(0)).shape)
        rng = jax.random.wrap_key_data(key_data, impl=meta["rng_impl"])
        state = type(abstract)(restored.state["params"], restored.state["opt_state"])
        return Restored(int(meta["step"]), state, int(meta["data_position"]), rng, dict(meta.get("metrics") or {}))

    def restore_newest(self, abstract: Any) -> Restored | None:
        """The newest checkpoint that restores (None when there is none at all).

        Each checkpoint is tried, newest first. One that fails (a truncated data file, a missing
        meta/metadata or state/) is reported, moved aside to `checkpoints/corrupt-<step>` (kept for a
        post-mortem; Orbax ignores it) and the next older one is tried. Every host must restore the same
        step, so a checkpoint counts as good only when it restores on all of them. When none restores,
        CheckpointError names the folder and the choices.
        """
        if not self.manager.all_steps():
            return None
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored, error = self._restore(abstract, step), None
            except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise many types for bad files
                if _transient(err):
                    raise  # the storage, not the checkpoint: moving it aside would lose a good one
                difference = self._layout_difference(abstract, step)
                if difference is not None:  # readable, but written by another layout: not damage
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} was written with another parameter layout "
                        f"({difference}), e.g. by a version from before the layers were stacked; it cannot "
                        "resume this run. fix: finish it with the version that wrote it, or pass "
                        "--config.overwrite=True to retrain from step 0") from err
                restored, error = None, err
            if shd.all_processes_agree(error is None):
                if tried:
                    print(f"[checkpoint] resuming from step {step}, the newest checkpoint that restores", flush=True)
                return restored
            reason = "on another host" if error is None else f"{type(error).__name__}: {_first_line(error)}"
            aside = self._move_aside(step)
            message = f"checkpoint step {step} in {self.directory} is unreadable ({reason}); moved it to {aside}"
            logging.error("%s", message)
            print(f"[checkpoint] {message}", flush=True)
            tried.append(step)
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores (steps {', '.join(map(str, tried))} are unreadable and were "
            f"moved to corrupt-<step> there); fix: restore that folder from a backup, or delete "
            f"{self.directory} (and the {tracking.METRICS_FILE} lines after step 0 go with it) to train from step 0, "
            "or pass --config.overwrite=True to rerun the whole experiment")

    def _layout_difference(self, abstract: Any, step: int) -> str | None:
        """How the parameter names stored at `step` differ from the run's (None when they match or the
        checkpoint's metadata cannot be read, i.e. it is damaged rather than of another layout)."""
        try:
            stored = self.manager.item_metadata(step)["state"]["params"]
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the fallback handles it
            return None
        names = lambda tree: {jax.tree_util.keystr(path) for path, _ in  # noqa: E731
                              jax.tree_util.tree_flatten_with_path(tree)[0]}
        stored_names, expected = names(stored), names(abstract.params)
        if not stored_names or stored_names == expected:
            return None
        missing, unexpected = sorted(expected - stored_names), sorted(stored_names - expected)
        return (f"{len(missing)} expected parameters missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:1]}")

    def _move_aside(self, step: int) -> str:
        """Renames step `step`'s folder to corrupt-<step> (process 0) and forgets it."""
        target = self.directory / f"{CORRUPT_PREFIX}{step}"
        if jax.process_index() == 0:
            n = 1
            while target.exists():
                n += 1
                target = self.directory / f"{CORRUPT_PREFIX}{step}.{n}"
            (self.directory / str(step)).rename(target)
        shd.barrier(f"distillspec:corrupt-{step}")
        self.manager.reload()
        return str(target)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        hostmem.release_freed()  # the host copies of the saved state

    def close(self) -> None:
        self.manager.close()


_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
                    "UNAUTHENTICATED", "CANCELLED", "ABORTED")


def _transient(error: BaseException) -> bool:
    if isinstance(error, (Preempted, MemoryError, ConnectionError, TimeoutError, PermissionError)):
        return True
    return any(code in str(error) for code in _TRANSIENT_CODES)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    # TensorStore appends its whole spec (a hundred lines) after this phrase: the line before it says it all.
    return (lines[0] if lines else "").split(" See full TensorStore details")[0][:200]
