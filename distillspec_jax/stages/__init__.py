"""The stages of one experiment, as a table (design §7). Each stage is one module here, owning its config
section and the workdir files it writes:

    prepare      convert the HF checkpoints to Orbax once (or build the `:tiny` models), load them on the mesh
    data         load and tokenise the prompts; sample target responses when the generator needs them
    eval_before  γ sweep of the undistilled draft at every evaluation temperature
    distill      train the draft (resumable); save it as Orbax and as HF safetensors
    eval_after   the same sweep with the distilled draft
    report       results.json and a printed table

`experiment.run` runs the configured ones in this order. A stage with an output file is done when the file
exists (each is written atomically, last), so a rerun skips it; `prepare` and `report` always run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from distillspec_jax.data import serving
from distillspec_jax.stages import data, distill, evaluation, prepare, report
from distillspec_jax.stages.state import RunState


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunState], None]
    output: str | None  # the workdir file that marks the stage done; None: it runs whenever it is listed
    needs_models: bool  # whether `prepare` must run first


STAGES = (
    Stage("prepare", prepare.run, None, needs_models=True),
    Stage("data", data.run, data.OUTPUT, needs_models=True),
    Stage("eval_before", evaluation.run_before, evaluation.OUTPUTS["eval_before"], needs_models=True),
    Stage("distill", distill.run, distill.OUTPUT, needs_models=True),
    Stage("eval_after", evaluation.run_after, evaluation.OUTPUTS["eval_after"], needs_models=True),
    Stage("report", report.run, None, needs_models=False),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
OUTPUTS = {s.name: s.output for s in STAGES if s.output is not None}
# The workdir's top-level names the stages write (overwrite=True deletes these and nothing else).
WRITTEN = (prepare.MODELS_DIR, data.DATA_DIR, distill.DISTILLED_DIR, distill.REFERENCE_DIR, report.OUTPUT,
           evaluation.OUTPUTS["eval_before"], evaluation.OUTPUTS["eval_after"], evaluation.EXPERT_UNION,
           *evaluation.FRONTIERS.values(), serving.LOG_FILE)

__all__ = ["STAGES", "NAMES", "BY_NAME", "OUTPUTS", "WRITTEN", "RunState", "Stage"]
