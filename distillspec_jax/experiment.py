"""One DistillSpec experiment: what `main.py` runs. It validates the config (`validate`: every setting that
can be checked without models, before anything loads or compiles), checks the mesh and the chips' memory,
takes the workdir's lock and runs the configured stages of `distillspec_jax.stages` in order (design §7).

Each stage leaves a file in the workdir; a rerun skips stages whose file exists and resumes training
from its last checkpoint, so an interrupted run (crash, SIGTERM) continues where it stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax
from ml_collections import ConfigDict

from distillspec_jax import checkpoint, checks, lease, stages, tracking
from distillspec_jax import sharding as shd
from distillspec_jax import workdir as wd
from distillspec_jax.stages import data as data_stage
from distillspec_jax.stages import distill as distill_stage
from distillspec_jax.stages import evaluation, prepare
from distillspec_jax.stages.state import RunState

TINY = checks.TINY
# Every name a run writes at the top of its workdir: overwrite=True deletes these (but the model cache and
# the marker) and nothing else, and a folder holding other names is not taken for a workdir (workdir.py).
OWNED = (wd.MARKER_FILE, lease.LOCK_FILE, wd.CONFIG_FILE, tracking.METRICS_FILE, tracking.WANDB_ID_FILE, "wandb",
         checkpoint.CHECKPOINT_DIR, "plots", "logs", *stages.WRITTEN)


# ----------------------------------------------------------------------------------------------
# Validation (no model, no compile)
# ----------------------------------------------------------------------------------------------


def validate(c: ConfigDict) -> tuple[str, ...]:
    """Checks every setting that can be checked without models; returns the stages to run."""
    checks.check_fields(c)  # every field, in one message form
    # The objects built from the config check themselves too: a backstop for whatever the above misses.
    distill_stage.train_config(c), distill_stage.serving_spec(c), data_stage.generator_spec(c)
    data_stage.synthetic_spec(c), evaluation.eval_samplers(c)
    positions = checks.known_max_positions(c)  # hub ids: checked in prepare, once converted
    if positions is not None:
        checks.check_positions(c, *positions)
    return checks.parse_stages(c.stages)


def check_memory(c: ConfigDict, devices: Sequence[Any]) -> None:
    """Refuses a run whose weights, optimizer state and gradients do not fit its chips' memory on its mesh,
    naming a mesh that fits (aot.check_fits: shapes only, no weights, no compile). Host RAM is no chip
    memory: on CPU devices, and for the offline tiny models, there is nothing to check."""
    from distillspec_jax import aot

    if c.target.model != TINY:  # check_fits itself passes over CPUs and shapes unknown offline
        aot.check_fits(c, devices)


def check_mesh(c: ConfigDict, mesh) -> None:
    """Batch sizes against the mesh, before anything compiles."""
    accum = c.distill.grad_accum_steps
    if c.distill.batch_size % accum:
        raise ValueError(f"config.distill.batch_size={c.distill.batch_size} does not split into "
                         f"grad_accum_steps={accum} micro-batches")
    shd.check_batch_divides(c.distill.batch_size // accum, mesh, "config.distill.batch_size (per micro-batch)")
    shd.check_batch_divides(c.eval.batch_size, mesh, "config.eval.batch_size")
    shd.host_slice(c.distill.batch_size), shd.host_slice(c.eval.batch_size)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(c: ConfigDict, workdir: str, observe: Callable[[str], AbstractContextManager] | None = None
        ) -> dict[str, Any] | None:
    """Runs the configured stages in order; returns results.json's content (None when the report stage is
    not among them). Raises errors.Preempted when stopped on request (rerun to resume).

    observe(stage), when given, is a context manager entered around each stage that runs (benchmarks time
    and measure stages with it: bench/rehearsal.py).
    """
    names = validate(c)
    wd.check_writable(workdir)  # a file in the way, permissions, a read-only or virtual filesystem
    wd.check_ours(workdir, OWNED, c.overwrite)  # before anything is written or deleted
    shd.maybe_initialize_distributed(c.distributed)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    check_mesh(c, mesh)
    check_memory(c, jax.devices())  # before any download or conversion
    with lease.WorkdirLock(str(wd.path(workdir))):  # one run at a time (process 0 holds it)
        return _run_stages(c, workdir, names, mesh, observe or (lambda stage: contextlib.nullcontext()))


def _run_stages(c: ConfigDict, workdir: str, names: tuple[str, ...], mesh,
                observe: Callable[[str], AbstractContextManager]) -> dict[str, Any] | None:
    config = wd.redact(c.to_dict())
    wd.write_marker(workdir)
    # Data errors come before any model loads, and before config.json: a run refused for its data can be
    # rerun with the data fixed, without the config guard objecting to the changed data fields.
    state = RunState(c, workdir, mesh)
    if "data" in names and not wd.path(workdir, data_stage.OUTPUT).exists():
        state.examples = checks.load_examples(c)
    allowed = [f.strip() for f in c.resume_with_changes.split(",") if f.strip()]
    if wd.check_config(workdir, config, c.overwrite, allowed):
        print(f"[run] config changed and overwrite=True: discarding the earlier outputs in {workdir}", flush=True)
        wd.discard_outputs(workdir, OWNED, keep=(prepare.MODELS_DIR, wd.MARKER_FILE, lease.LOCK_FILE))
    wd.write_json(wd.path(workdir, wd.CONFIG_FILE), config)
    # Process 0 discards and writes; every host then decides which stages are done from the same files
    # (the workdir must be shared: gs:// or a shared filesystem).
    shd.barrier("distillspec:config")
    prepare.enable_compilation_cache(c, workdir)
    done = {name for name, output in stages.OUTPUTS.items() if wd.path(workdir, output).exists()}
    todo = [stages.BY_NAME[n] for n in names if n not in done]
    print(f"[run] workdir {wd.path(workdir)}; stages {','.join(names)}; already done: "
          f"{','.join(sorted(done & set(names))) or 'none'}", flush=True)
    if any(s.needs_models for s in todo) and stages.BY_NAME["prepare"] not in todo:
        todo.insert(0, stages.BY_NAME["prepare"])  # the models of the stages that need them
    for stage in todo:
        with observe(stage.name):
            stage.run(state)
    return state.results
