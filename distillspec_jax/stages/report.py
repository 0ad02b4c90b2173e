"""Stage `report`: results.json (the run's identity, both evaluations, training, the τ checks) and the
printed table.

Owns nothing in the config but what it records. Reads the evaluation and distill stages' files; writes
`results.json` (and uploads it to W&B when tracking is on). Plots are drawn from results.json by
`analysis.plots`, which `main.py` calls after the run; the library draws nothing.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from ml_collections import ConfigDict

from distillspec_jax import tracking
from distillspec_jax import workdir as wd
from distillspec_jax.selection import SELECTIONS
from distillspec_jax.stages import distill, evaluation

OUTPUT = "results.json"
RESULTS_SCHEMA = 1


def tau_checks(before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Whether distillation raised τ: per temperature and γ, and over every γ >= 2 (the `:tiny` criterion)."""
    tau_before = {(r["temperature"], r["gamma"]): r["block_efficiency"] for r in before}
    improved = {}
    for r in after:
        key = (r["temperature"], r["gamma"])
        if key in tau_before:
            improved[key] = r["block_efficiency"] > tau_before[key]
    by_temperature: dict[str, dict[str, bool]] = {}
    for (temperature, gamma), up in sorted(improved.items()):
        by_temperature.setdefault(f"{temperature:g}", {})[str(gamma)] = up
    return {"tau_after_exceeds_before": by_temperature,
            "every_gamma_ge_2": bool(improved) and all(up for (_, g), up in improved.items() if g >= 2)}


def _selection(c: ConfigDict) -> dict[str, Any]:
    """The token selection and, when it is not `all`, its hyperparameters (AdaSPEC: adaspec_fraction)."""
    name = c.distill.selection
    return {"selection": name, **{key: c.distill[key] for key in SELECTIONS[name].hyperparams}}


def results(c: ConfigDict, workdir: str) -> dict[str, Any]:
    """results.json: the run's identity, both evaluations (one row per temperature and γ), training, checks, for
    an MoE target the expert-union table, and with eval.lenience the lossy frontier before and after."""
    before = wd.read_json(wd.path(workdir, evaluation.OUTPUTS["eval_before"])) or []
    after = wd.read_json(wd.path(workdir, evaluation.OUTPUTS["eval_after"])) or []
    # With eval.lenience: the lossy frontier of each draft (evaluate.lenience_frontier rows).
    frontier = {when: wd.read_json(wd.path(workdir, evaluation.FRONTIERS[f"eval_{when}"])) or []
                for when in ("before", "after")}
    return {
        "schema": RESULTS_SCHEMA,
        "run": {"name": os.path.basename(os.path.normpath(str(workdir))), "divergence": c.distill.divergence,
                "jsd_beta": c.distill.jsd_beta, **_selection(c),
                "generator": c.generator.kind, "mix_lambda": c.generator.mix_lambda, "seed": c.seed,
                "target": c.target.model, "draft": c.draft.model, "task": c.data.task, "steps": c.distill.steps},
        "before": before,
        "after": after,
        "training": wd.read_json(wd.path(workdir, distill.OUTPUT)) or {},
        "checks": tau_checks(before, after),
        **({"expert_union": union} if (union := wd.read_json(wd.path(workdir, evaluation.EXPERT_UNION))) else {}),
        **({"frontier": frontier} if any(frontier.values()) else {}),
    }


def format_table(res: dict[str, Any]) -> str:
    """γ against τ before/after, α before/after, α̂ after, measured and predicted speedup after; per temperature."""
    before = {(r["temperature"], r["gamma"]): r for r in res["before"]}
    after = {(r["temperature"], r["gamma"]): r for r in res["after"]}
    keys = sorted(set(before) | set(after))
    fmt = lambda row, k, spec=".2f": "-" if row is None or k not in row else format(row[k], spec)  # noqa: E731
    lines = []
    for temperature in sorted({k[0] for k in keys}):
        lines += [f"temperature {temperature:g}",
                  " γ | τ before | τ after | α before | α after | τ̂ after | speedup measured | predicted",
                  "---|----------|---------|----------|---------|----------|------------------|----------"]
        for key in [k for k in keys if k[0] == temperature]:
            b, a = before.get(key), after.get(key)
            lines.append(f"{key[1]:2d} | {fmt(b, 'block_efficiency'):>8} | {fmt(a, 'block_efficiency'):>7} | "
                         f"{fmt(b, 'acceptance_rate', '.3f'):>8} | {fmt(a, 'acceptance_rate', '.3f'):>7} | "
                         f"{fmt(a, 'expected_block_efficiency'):>8} | {fmt(a, 'measured_speedup'):>16} | "
                         f"{fmt(a, 'predicted_speedup'):>8}")
        lines.append("")
    return "\n".join(lines)


def report(c: ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes results.json, uploads it when tracking is on, prints the table (process 0); returns it."""
    res = results(c, workdir)
    wd.write_json(wd.path(workdir, OUTPUT), res)
    if c.tracking.wandb:
        tracking.upload_files(str(wd.path(workdir)), [OUTPUT, "metrics.jsonl", wd.CONFIG_FILE],
                              project=c.tracking.project, run_name=c.tracking.run_name or res["run"]["name"],
                              config=c.to_dict(), entity=c.tracking.entity, tags=tuple(c.tracking.tags))
    if jax.process_index() == 0:
        print(format_table(res), flush=True)
    return res


def run(state) -> None:
    state.results = report(state.config, state.workdir)
