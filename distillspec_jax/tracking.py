"""Metrics: one JSON object per line in `workdir/metrics.jsonl`, and Weights & Biases when enabled.

Only process 0 writes. Lines are appended and flushed one by one, so a crash loses at most the line
being written. On resume, lines of steps after the restored checkpoint are dropped first: those
steps are about to be recomputed, and the file then holds each step once, from the run that the
checkpoints continue.

W&B runs offline (files under the workdir, `wandb sync` later) when no WANDB_API_KEY is set, and a
resumed run continues the same W&B run (its id is kept in the workdir). The key is never logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import secrets
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_ID_BYTES = 6  # a run id of 12 lowercase hex characters (W&B ids allow [a-z0-9])


def _json_value(value: Any) -> Any:
    """Plain JSON numbers for scalars (NumPy and JAX included); non-finite floats become strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("%s: skipping an unreadable line (torn write?): %.80s", path, line)
    return records


def truncate_after(path: str | os.PathLike, step: int) -> int:
    """Rewrites metrics.jsonl keeping only records with record['step'] <= step (atomically); returns
    how many records were dropped."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return len(records) - len(kept)


class MetricsLogger:
    """Appends metrics of a run that starts (or resumes) after `resume_step`."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, use_wandb: bool = False,
                 wandb_project: str = "distillspec-jax", run_name: str | None = None,
                 config: dict[str, Any] | None = None):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.active = jax.process_index() == 0
        self._file = None
        self._wandb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_after(self.path, resume_step)
        if dropped:
            logging.info("metrics: dropped %d lines after step %d (recomputed after resume)", dropped, resume_step)
        self._file = open(self.path, "a")
        if use_wandb:
            self._wandb = _start_wandb(self.workdir, wandb_project, run_name, config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(workdir: pathlib.Path, project: str, run_name: str | None, config: dict[str, Any]):
    import wandb

    # Offline unless a key is available; an explicit WANDB_MODE from the environment wins.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(WANDB_ID_BYTES)
    id_file.write_text(run_id + "\n")
    logging.info("W&B run %s in %s mode", run_id, mode)
    return wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(workdir),
                      config=config, mode=mode)
