"""A W&B run's saved files as a local workdir that analysis.plots can read.

A run that saved results.json (and metrics.jsonl, config.json) with `wandb.save` can be analysed without its
workdir: `download_run("entity/project/run_id", "/content/wandb_runs")` fetches them through the public API
(`wandb.Api().run(path).file(name)`) and returns the folder. Needs network access and, for private projects,
a W&B login (`wandb.login()` in Colab).
"""

from __future__ import annotations

import os
import re
from typing import Any

from analysis import plots

REQUIRED = (plots.RESULTS_FILE,)  # without it there is nothing to plot
OPTIONAL = (plots.METRICS_FILE, plots.CONFIG_FILE)  # training curves, the run's config


def local_name(run_path: str) -> str:
    """A folder name for 'entity/project/run_id' (one folder per run, so several runs do not collide)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_path.strip("/"))


def download_run(run_path: str, dest: str | os.PathLike, *, api: Any = None) -> str:
    """Downloads the run's results.json (required), metrics.jsonl and config.json (when saved) into
    dest/<entity_project_run_id>/ and returns that folder. `api` defaults to `wandb.Api()`."""
    if run_path.count("/") != 2:
        raise ValueError(f"W&B run path {run_path!r}: expected 'entity/project/run_id' (the run page's URL path)")
    if api is None:
        import wandb  # only here: reading local or gs:// workdirs needs no W&B

        api = wandb.Api()
    run = api.run(run_path)
    out = os.path.join(os.fspath(dest), local_name(run_path))
    os.makedirs(out, exist_ok=True)
    for name in REQUIRED + OPTIONAL:
        try:
            run.file(name).download(root=out, replace=True)
        except Exception as e:  # the public API reports a missing file in several ways (IndexError, CommError, ...)
            if name in REQUIRED:
                raise FileNotFoundError(
                    f"W&B run {run_path} has no {name} among its files ({type(e).__name__}: {e}); save it from the "
                    f"run (wandb.save(os.path.join(workdir, '{name}'), base_path=workdir)) or read the workdir "
                    "directly (local or gs://)") from e
    return out
