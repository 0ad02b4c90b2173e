"""What the stages of one run share: the config, the workdir, the mesh, and what earlier stages made."""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict

from distillspec_jax.stages.prepare import Models


@dataclasses.dataclass
class RunState:
    config: ConfigDict
    workdir: str
    mesh: Any  # jax.sharding.Mesh
    examples: tuple[list[dict], list[dict]] | None = None  # (training, evaluation) rows, checked before any model
    models: Models | None = None  # set by `prepare`
    results: dict[str, Any] | None = None  # set by `report`
