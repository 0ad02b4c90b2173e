"""Metrics: one JSON object per line in `workdir/metrics.jsonl`, and Weights & Biases when enabled.

Only process 0 writes. Lines are appended and flushed one by one, so a crash loses at most the line
being written. Object stores cannot append, so on a gs:// workdir the file is rewritten whole at each
log line (it stays small: one line per `log_every` steps). On resume, lines of steps after the restored checkpoint are dropped first: those
steps are about to be recomputed, and the file then holds each step once, from the run that the
checkpoints continue. A torn last line (a crash mid-write) is dropped then too, with a warning.

W&B runs offline (files under `workdir/wandb`, `wandb sync` later) when no API key is available
(neither WANDB_API_KEY nor a `wandb login` entry in ~/.netrc), and says so once per process. A resumed
run continues the same W&B run (its id is kept in the workdir). The key is never logged, and
secret-looking config fields are redacted before the config reaches W&B.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import pathlib
import secrets
import urllib.parse
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath

from distillspec_jax import files

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_ID_BYTES = 6  # a run id of 12 lowercase hex characters (W&B ids allow [a-z0-9])
WANDB_DEFAULT_HOST = "https://api.wandb.ai"

_offline_notice_given = False  # the offline-mode notice is logged once per process, not once per logger


def _json_value(value: Any) -> Any:
    """Plain JSON numbers for scalars (NumPy and JAX included); non-finite floats become strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (local or gs://); a torn last line (crash mid-write) is skipped."""
    path = epath.Path(path)
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
    """Repairs metrics.jsonl for a run resuming after `step`: keeps only records with record['step'] <=
    step, and drops a torn line (a crash mid-write leaves a fragment, or a record without its newline,
    which the next append would otherwise join). Rewrites the file atomically when anything is dropped;
    returns how many parsed records were dropped."""
    path = epath.Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    unreadable = sum(1 for line in text.splitlines() if line.strip()) - len(records)
    unterminated = bool(text) and not text.endswith("\n")  # the next append would join this line
    if unreadable:
        logging.warning("%s: dropped %d torn line(s) on resume (a crash while a line was written)", path, unreadable)
    if len(kept) < len(records) or unreadable or unterminated:
        files.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


class MetricsLogger:
    """Appends metrics of a run that starts (or resumes) after `resume_step`."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, use_wandb: bool = False,
                 wandb_project: str = "distillspec-jax", run_name: str | None = None,
                 config: dict[str, Any] | None = None, wandb_entity: str | None = None,
                 wandb_tags: Sequence[str] | str = ()):
        """`run_name` None or '' names the W&B run after the workdir; `wandb_entity` None or '' means the
        key's default entity; `wandb_tags` is a sequence or a comma-separated string."""
        self.remote = files.is_remote(workdir)
        self.workdir = epath.Path(workdir) if self.remote else pathlib.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.active = jax.process_index() == 0
        self._file = None
        self._records: list[dict[str, Any]] = []  # gs:// only: the file's content, rewritten at each line
        self._wandb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_after(self.path, resume_step)
        if dropped:
            logging.info("metrics: dropped %d lines after step %d (recomputed after resume)", dropped, resume_step)
        if self.remote:
            self._records = read_metrics(self.path)
        else:
            self._file = open(self.path, "a")
        if use_wandb:
            self._wandb = _start_wandb(self.workdir, wandb_project, run_name, config or {},
                                       entity=wandb_entity, tags=wandb_tags)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        if self.remote:
            self._records.append(record)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self._records))
        else:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def close(self, exit_code: int | None = None) -> None:
        """Closes the file and finishes the W&B run (marked failed when `exit_code` is non-zero)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(exit_code=None if exc_type is None else 1)


def wandb_local_dir(workdir) -> pathlib.Path:
    """Where W&B keeps its files: the workdir itself when local; for a gs:// workdir (wandb writes only
    local files) a folder named after it under the local cache root."""
    if not files.is_remote(workdir):
        return pathlib.Path(workdir)
    from distillspec_jax.tokenizer import cache_root

    return cache_root() / "wandb" / str(workdir).removeprefix("gs://").strip("/").replace("/", "__")


def _have_wandb_key() -> bool:
    """Whether W&B credentials are available without asking: WANDB_API_KEY, an identity token file, or
    a `wandb login` entry in the netrc file for the W&B host. Only their presence is checked."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_HOST).hostname
    netrc_path = os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")
    try:
        entry = netrc.netrc(netrc_path).authenticators(host) if os.path.exists(netrc_path) else None
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def _start_wandb(workdir, project: str, run_name: str | None, config: dict[str, Any], *,
                 entity: str | None = None, tags: Sequence[str] | str = ()):
    """`workdir` is a pathlib.Path or, for gs://, an epath.Path; the run id lives there either way."""
    import wandb

    from distillspec_jax.workdir import redact

    global _offline_notice_given
    # Offline unless a key is available; an explicit WANDB_MODE from the environment wins.
    explicit_mode = os.environ.get("WANDB_MODE")
    mode = explicit_mode or ("online" if _have_wandb_key() else "offline")
    if mode in ("offline", "dryrun") and not _offline_notice_given:
        _offline_notice_given = True
        why = "WANDB_MODE=" + explicit_mode if explicit_mode else "no W&B API key (WANDB_API_KEY or `wandb login`)"
        runs = wandb_local_dir(workdir) / "wandb"
        logging.warning("W&B runs in offline mode (%s): runs are kept under %s; upload them later with "
                        "`wandb sync %s`", why, runs, runs / "offline-run-*")
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(WANDB_ID_BYTES)
    id_file.write_text(run_id + "\n")
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",")]
    tags = [str(t) for t in tags if str(t)]
    if hasattr(config, "to_dict"):  # an ml_collections ConfigDict: plain nested dicts, so redact sees them
        config = config.to_dict()
    name = run_name or (workdir.name if files.is_remote(workdir) else workdir.resolve().name)
    local_dir = wandb_local_dir(workdir)
    local_dir.mkdir(parents=True, exist_ok=True)
    logging.info("W&B run %s (%s) in project %s", run_id, name, project)
    return wandb.init(project=project, entity=entity or None, name=name, tags=tags or None, id=run_id,
                      resume="allow", dir=str(local_dir), config=redact(dict(config)), mode=mode)


def upload_files(workdir: str | os.PathLike, names: Sequence[str], *, project: str, run_name: str | None = None,
                 config: dict[str, Any] | None = None, entity: str | None = None,
                 tags: Sequence[str] | str = ()) -> list[str]:
    """Attaches workdir files (results.json, metrics.jsonl, config.json) to the workdir's W&B run (same id),
    so that a notebook can fetch a run's results from W&B alone. Process 0 only; returns the names saved."""
    if jax.process_index() != 0:
        return []
    remote = files.is_remote(workdir)
    workdir = epath.Path(workdir) if remote else pathlib.Path(workdir)
    run = _start_wandb(workdir, project, run_name, config or {}, entity=entity, tags=tags)
    # wandb uploads local files: a gs:// workdir's files are copied beside its local W&B folder first.
    local = wandb_local_dir(workdir) / "files" if remote else workdir
    saved = []
    try:
        for name in names:
            if (workdir / name).is_file():
                if remote:
                    local.mkdir(parents=True, exist_ok=True)
                    (local / name).write_bytes((workdir / name).read_bytes())
                run.save(str(local / name), base_path=str(local), policy="now")
                saved.append(name)
    finally:
        run.finish()
    return saved
