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

Every JSON file is written to a temporary name and renamed, so a reader (or a resumed run) sees the
old file or the new one, never half of one. Only process 0 writes shared files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
from etils import epath

from distillspec_jax import files

CONFIG_FILE = "config.json"
# Fields that change how a run is executed or reported, not what it computes: a rerun may change them.
# The mesh is one: checkpoints restore onto any mesh, so a preempted run may resume on another slice.
RERUNNABLE_FIELDS = ("stages", "overwrite", "distributed", "tracking", "plots", "compilation_cache", "mesh",
                     "distill.checkpoint_every", "distill.keep_checkpoints", "distill.log_every",
                     "eval.timing_repeats", "tiny.cache_dir")
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


def check_config(workdir: str | os.PathLike, config: dict, overwrite: bool) -> bool:
    """Guards resume: a workdir continues only the run whose config it holds.

    Returns True when the workdir's earlier outputs must be discarded (overwrite with a changed config).
    Raises before any work when the config changed and overwrite is off, naming the changed fields.
    """
    stored = read_json(path(workdir, CONFIG_FILE))
    if stored is None:
        return False
    changed = config_differences(stored, redact(config))
    if not changed:
        return False
    if not overwrite:
        shown = ", ".join(f"{k}" for k in changed[:10]) + (" ..." if len(changed) > 10 else "")
        raise ValueError(
            f"{path(workdir)} holds a run with a different config (changed: {shown}). Resuming it would mix two "
            "experiments. Use a new --workdir, or pass --config.overwrite=True to discard that run's outputs."
        )
    return True


def discard_outputs(workdir: str | os.PathLike, keep: tuple[str, ...] = ("models",)) -> None:
    """Removes a previous run's outputs (process 0), keeping the model cache."""
    if jax.process_index() != 0:
        return
    root = path(workdir)
    if not root.exists():
        return
    for child in root.iterdir():
        if child.name in keep:
            continue
        if child.is_dir():
            child.rmtree()
        else:
            child.unlink()
