"""The run's workdir (local or gs://): atomic JSON files, stage markers and the config guard.

Layout (design §7):
    config.json          the run's config (rewritten by every run; compared with the stored one first)
    metrics.jsonl        training metrics, one JSON object a line
    checkpoints/         Orbax CheckpointManager of the distillation loop
    data/                tokenised train/eval data and target-generated responses
    models/              converted or built models (and, by default, the XLA compilation cache)
    reference/           AdaSPEC's reference draft and its checkpoints (AdaSPEC runs only)
    distilled/           the distilled draft: Orbax (orbax/) and HF safetensors (hf/), summary.json
    eval_before.json     the evaluation of the undistilled draft
    eval_after.json      the evaluation of the distilled draft
    results.json         both evaluations and the training summary
    plots/               PNGs and a markdown table (analysis/plots.py)
    distillspec_workdir.json   the marker that makes a folder a workdir of ours (schema version)
    distillspec.lock     the lease of the run working in it (lease.py)

Every JSON file is written to a temporary name and renamed, so a reader (or a resumed run) sees the
old file or the new one, never half of one. Only process 0 writes shared files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath

from distillspec_jax import files
from distillspec_jax.errors import UserError

CONFIG_FILE = "config.json"
MARKER_FILE = "distillspec_workdir.json"
MARKER_SCHEMA = 1  # raised when the workdir layout changes incompatibly
# Fields that change how a run is executed or reported, not what it computes: a rerun may change them.
# The mesh is one: checkpoints restore onto any mesh, so a preempted run may resume on another slice.
RERUNNABLE_FIELDS = ("stages", "overwrite", "distributed", "tracking", "plots", "compilation_cache", "mesh",
                     "distill.checkpoint_every", "distill.keep_checkpoints", "distill.log_every",
                     "eval.timing_repeats", "eval.timing_steps", "tiny.cache_dir", "resume_with_changes")
# What `resume_with_changes` cannot let through: the workdir's models, tokens and data were made with them,
# so a changed value would not apply to what is already there, only mix two experiments.
RESUME_FIXED_FIELDS = ("seed", "target", "draft", "tokenizer", "tiny", "data", "synthetic")
# Key names whose values never reach a file: the W&B key would otherwise be one override away. A name
# is secret when it is, or ends in "_" plus, one of these (hf_token, wandb_api_key), so that fields such as
# max_new_tokens or tokenizer keep their values and stay visible to the config guard.
SECRET_NAME = re.compile(r"(^|_)(api_key|token|secret|password)$", re.IGNORECASE)


def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
    """An epath under the workdir; local paths are made absolute (Orbax needs absolute paths)."""
    root = str(workdir)
    base = epath.Path(root if files.is_remote(root) else os.path.abspath(root))
    return base.joinpath(*parts) if parts else base


def write_json(target: epath.Path, obj: Any) -> None:
    """Writes `obj` as indented JSON atomically (temporary file + rename); process 0 only."""
    if jax.process_index() != 0:
        return
    files.write_json(target, obj)


def read_json(target: epath.Path) -> Any | None:
    return json.loads(target.read_text()) if target.exists() else None


def redact(obj: Any) -> Any:
    """A copy of a nested dict with the values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_NAME.search(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _relevant(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RERUNNABLE_FIELDS)}


def config_differences(stored: dict, current: dict) -> list[str]:
    """Fields (dotted names) whose values differ between two configs, ignoring RERUNNABLE_FIELDS."""
    a, b = _relevant(_flatten(json.loads(json.dumps(stored)))), _relevant(_flatten(json.loads(json.dumps(current))))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _matches(name: str, fields: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def check_config(workdir: str | os.PathLike, config: dict, overwrite: bool,
                 resume_with_changes: Sequence[str] = ()) -> bool:
    """Guards resume: a workdir continues only the run whose config it holds.

    Returns True when the workdir's earlier outputs must be discarded (overwrite with a changed config).
    Raises before any work when the config changed and overwrite is off, naming the changed fields.
    Fields named in `resume_with_changes` (dotted names or groups, e.g. distill.learning_rate) may
    differ: the run resumes with the new values (RESUME_FIXED_FIELDS never may).
    """
    stored = read_json(path(workdir, CONFIG_FILE))
    if stored is None:
        return False
    changed = config_differences(stored, redact(config))
    let_through = [k for k in changed if _matches(k, resume_with_changes)]
    if let_through:
        print(f"[run] resuming {path(workdir)} with changed fields (resume_with_changes): {', '.join(let_through)}",
              flush=True)
    changed = [k for k in changed if k not in let_through]
    if not changed:
        return False
    if not overwrite:
        shown = ", ".join(f"{k}" for k in changed[:10]) + (" ..." if len(changed) > 10 else "")
        resumable = [k for k in changed if not _matches(k, RESUME_FIXED_FIELDS)]
        keep_going = (f", or continue this run with the new values: --config.resume_with_changes={','.join(resumable)}"
                      if resumable == changed else "")
        raise ConfigGuardError(
            f"{path(workdir)} holds a run with a different config (changed: {shown}). Resuming it would mix two "
            "experiments. Use a new --workdir, or pass --config.overwrite=True to discard that run's outputs"
            f"{keep_going}."
        )
    return True


class ConfigGuardError(UserError, ValueError):
    """The workdir holds a run with another config."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be used: the message names the path, the reason and the fix."""


def check_writable(workdir: str | os.PathLike) -> None:
    """Creates a local workdir and checks a file can be written in it, turning each OS failure into one
    line with its fix: a file in the way, no permission, a read-only or virtual filesystem, a full disk.
    gs:// workdirs are left to the first write (credentials and bucket errors are clear already)."""
    if files.is_remote(workdir):
        return
    root = os.path.abspath(os.path.expanduser(str(workdir)))
    fix = "pass another --workdir (a folder on a writable disk; it is created when missing)"
    if os.path.exists(root) and not os.path.isdir(root):
        raise WorkdirError(f"--workdir {root} is a file, not a folder; fix: {fix}, e.g. --workdir={root}_run")
    existing = root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"cannot create --workdir {root}: {existing} is a file, not a folder; fix: {fix}")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise WorkdirError(_os_error_message(err, root, existing, err.filename or root, fix)) from err
    probe = os.path.join(root, f".distillspec-write-test-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"ok\n")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise WorkdirError(_os_error_message(err, root, root, root, fix)) from err


def _os_error_message(err: OSError, root: str, existing: str, where: str, fix: str) -> str:
    if err.errno == errno.EROFS:
        return f"--workdir {root} is on a read-only filesystem ({where}); fix: {fix}"
    if err.errno in (errno.EACCES, errno.EPERM):
        whose = "it" if os.path.isdir(root) else existing
        return (f"--workdir {root} is not writable: permission denied for {where} (check the permissions of "
                f"{whose}); fix: {fix}, or make it writable (chmod/chown)")
    if err.errno == errno.ENOENT:  # the folder above exists, yet nothing can be created: /proc, /sys, ...
        return (f"cannot create files or folders under {existing}: it is a virtual or special filesystem "
                f"(such as /proc or /sys), not a disk; fix: {fix}")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"--workdir {root}: no space left on its disk ({where}); fix: free space, or {fix}"
    return f"--workdir {root} cannot be written ({err.strerror or err}: {where}); fix: {fix}"


# ----------------------------------------------------------------------------------------------
# Whose folder: the marker, and what a run may delete
# ----------------------------------------------------------------------------------------------


def _base_name(name: str) -> str:
    """The file a temporary file of files.write_text (`.<name>.tmp`) stands for."""
    return name[1:-len(".tmp")] if name.startswith(".") and name.endswith(".tmp") else name


def _owned(name: str, owned: Sequence[str]) -> bool:
    """A top-level name a run writes: one of `owned`, or the temporary file of one."""
    return _base_name(name) in owned


def _looks_like_our_config(root: epath.Path) -> bool:
    try:
        stored = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and {"distill", "generator", "stages"} <= set(stored)


def check_ours(workdir: str | os.PathLike, owned: Sequence[str], overwrite: bool) -> None:
    """Refuses a folder that is not a workdir of ours, before anything is written or deleted.

    Ours: empty or missing; or holding the marker (of a schema this code reads); or, for workdirs made
    before the marker, a config.json of a run. Without overwrite, a folder holding only names a run
    writes (e.g. data/ and eval_before.json copied from another run, as the study does) is adopted
    too; overwrite deletes, so it needs the marker or the config.
    """
    root = path(workdir)
    if not root.exists():
        return
    marker = root / MARKER_FILE
    if marker.exists():
        try:
            schema = json.loads(marker.read_text()).get("schema")
        except (OSError, ValueError, AttributeError):
            schema = None
        if not isinstance(schema, int) or schema > MARKER_SCHEMA:
            raise WorkdirError(f"{marker} has schema {schema!r}, but this code reads workdirs of schema <= "
                               f"{MARKER_SCHEMA}; fix: use a newer checkout for this workdir, or another --workdir")
        return
    names = sorted(p.name for p in root.iterdir())
    if not names or _looks_like_our_config(root):
        return
    foreign = [n for n in names if not _owned(n, owned)]
    if not foreign and not overwrite:
        logging.warning("%s has no %s; adopting it as a workdir (it holds only names a run writes: %s)",
                        root, MARKER_FILE, ", ".join(names))
        return
    shown = ", ".join((foreign or names)[:8]) + (" ..." if len(foreign or names) > 8 else "")
    what = f"holds files this program did not write ({shown})" if foreign else f"holds {shown}"
    raise WorkdirError(f"--workdir {root} is not a DistillSpec workdir (no {MARKER_FILE}) and {what}; "
                       f"{'overwrite=True deletes nothing there. ' if overwrite else ''}fix: pass a new or empty "
                       "folder as --workdir")


def write_marker(workdir: str | os.PathLike) -> None:
    """Marks the folder as a workdir of ours (process 0; kept as it is once written)."""
    marker = path(workdir, MARKER_FILE)
    if jax.process_index() == 0 and not marker.exists():
        files.write_json(marker, {"schema": MARKER_SCHEMA, "program": "distillspec_jax",
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def discard_outputs(workdir: str | os.PathLike, owned: Sequence[str],
                    keep: tuple[str, ...] = ("models", MARKER_FILE)) -> None:
    """Removes a previous run's outputs (process 0): only the names in `owned`, never anything else,
    and not those in `keep` (the model cache, the marker, the caller's lock)."""
    if jax.process_index() != 0:
        return
    root = path(workdir)
    if not root.exists():
        return
    for child in root.iterdir():
        if _base_name(child.name) in keep or not _owned(child.name, owned):
            continue
        if child.is_dir():
            child.rmtree()
        else:
            child.unlink()
