"""The scale table (docs/scale.md): the AOT pre-flight (distillspec_jax.aot) of every real preset on TPU
topologies, compiled on this CPU host for each topology's devices.

    JAX_PLATFORMS=cpu python -m bench.scale --out=bench/results/scale.jsonl

Per (preset, topology): the config's default mesh first; when the cheap estimate refuses it, the mesh the
estimate names; when a compiled program does not fit, the pre-flight's own mesh search. Each cell is one
`aot.preflight` result, appended to --out as one JSON line as soon as it is done (a rerun skips the cells
already there), and the whole table is printed as one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench import common
from configs import jsd
from distillspec_jax import aot

PRESETS = ("0.6b-8b", "0.6b-1.7b", "0.6b-4b", "1.7b-32b")  # the default ('') is 0.6b-8b
TOPOLOGIES = ("v5p-8", "v5e-16", "v4-8", "v6e-8", "v5e-8", "v5p-32")
# The programs whose memory is largest per phase: the distillation step (training), on-policy generation (its
# KV cache beside the optimizer state) and the speculative loop at γ = 4 when sampling (evaluation).
PROGRAMS = ("distill_step", "generate_draft_on_policy", "eval/T1/speculative_g4")


def cell(preset: str, topology: str, programs: list[str], search: int) -> dict[str, Any]:
    c = jsd.get_config(preset)
    attempts = [aot.preflight(c, topology, only=programs, search=0)]
    first = attempts[0]
    if first["largest"] is None and first["estimate_suggested_mesh"] is not None:  # the estimate refused
        c.mesh.update(first["estimate_suggested_mesh"])
        attempts.append(aot.preflight(c, topology, only=programs, search=search))
    elif not first["fits"]:  # compiled and too large: the pre-flight's own mesh search
        attempts.append(aot.preflight(c, topology, only=programs, search=search))
    return {"preset": preset, "topology": topology, "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="program names or prefixes ('' = all)")
    parser.add_argument("--search", type=int, default=2, help="meshes compiled when the chosen one does not fit")
    parser.add_argument("--out", required=True, help="JSON lines, one per cell; cells already there are skipped")
    args = parser.parse_args()
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                done[(row["preset"], row["topology"])] = row
    programs = [p for p in args.programs.split(",") if p]
    for topology in args.topologies.split(","):
        for preset in args.presets.split(","):
            if (preset, topology) in done:
                continue
            common.log(f"[scale] {preset} on {topology}")
            row = cell(preset, topology, programs, args.search)
            done[(preset, topology)] = row
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    for row in done.values():  # the analytic estimates with today's formulas (cells may come from older runs)
        for attempt in row["attempts"]:
            c = jsd.get_config(row["preset"])
            c.mesh.update(attempt["mesh"])
            attempt["roofline"] = aot.roofline(c, attempt["topology"]["device_kind"], attempt["topology"]["devices"])
    common.print_json({"benchmark": "scale", "machine": common.machine_info(), "programs": programs,
                       "cells": list(done.values())})


if __name__ == "__main__":
    main()
