"""The systematic small-scale study (issue 8): a grid of divergences x data generators x seeds on the `:study`
preset, the undistilled and supervised baselines, a transfer check, and the aggregation into tables.

    python -m analysis.study --out=/tmp/study                 # the full grid (resumes a half-finished one)
    python -m analysis.study --out=/tmp/study --aggregate     # only re-aggregate what is there
    python -m analysis.study --scale=0.6b-8b --topology=v5p-8 --plan   # the grid at a real preset: cells and
                                                                      # estimated chip-hours, nothing run

Layout of --out:
    models/                      the tiny models, built once and shared by every cell
    base-s{seed}/                per seed: data, target responses and the undistilled draft's evaluation
    cells/{div}-{gen}-s{seed}/   one experiment workdir per cell (its data and eval_before copied from base)
    transfer/{cell}/             the cell's draft, before and after, on held-out prose (stdlib docstrings)
    summary.json, tables.md, study_tau.png

Every cell is an ordinary `experiment.run` workdir, so a cell interrupted half way resumes from its
checkpoint, and finished cells are skipped. All cells run in this one process: the decode loops compile
once for all of them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from distillspec_jax import files
from distillspec_jax.data.generators import DISTILLSPEC_GENERATORS

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "adaspec")  # the grid's loss cells: a configs/<name>.py each
# The grid's data cells: DistillSpec's four generators (the stored-teacher and serving regimes are the domain
# study's, analysis/domain_study.py).
GENERATORS = DISTILLSPEC_GENERATORS
SEEDS = (0, 1, 2)
SUPERVISED = "ce-fixed"  # the supervised baseline: cross-entropy on the dataset's responses
BOOTSTRAP_SAMPLES = 2000  # resamples of the seeds for the 95% intervals
CONFIDENCE = 0.95
TRANSFER_CELL = ("jsd", "draft")  # the cell whose drafts are evaluated on the held-out domain
TRANSFER_EXAMPLES = 200  # docstrings loaded for the transfer domain (the evaluation uses eval.num_prompts)
TRANSFER_PROMPT_LEN = 96  # tokens of docstring the drafts continue


def cell_name(divergence: str, generator: str, seed: int) -> str:
    return f"{divergence}-{generator}-s{seed}"


def cell_config(preset: str, divergence: str, generator: str, seed: int, out: str, steps: int | None):
    """The experiment config of one cell. 'ce' is the supervised baseline (cross-entropy, fixed data)."""
    module = importlib.import_module(f"configs.{'fkl' if divergence == 'ce' else divergence}")
    c = module.get_config(preset)
    if divergence == "ce":
        c.distill.divergence = "ce"
    c.seed = seed
    c.generator.kind = generator
    c.generator.mix_lambda = 0.5
    c.generator.mix_other = "target"
    c.tiny.cache_dir = os.path.join(out, "models")
    c.plots = False  # one study plot instead of one set per cell
    if steps is not None:
        c.distill.steps = steps
        c.distill.warmup_steps = min(c.distill.warmup_steps, steps)
    return c


def _seed_base(preset: str, seed: int, out: str, steps: int | None, c=None, name: str = "") -> str:
    """Per seed: the data (with target-generated responses) and the undistilled draft's evaluation; `c` and
    `name` give another base config and folder (default: the grid's, base-s{seed})."""
    from distillspec_jax import experiment

    workdir = os.path.join(out, name or f"base-s{seed}")
    c = c or cell_config(preset, "jsd", "target", seed, out, steps)
    c.stages = "prepare,data,eval_before"
    if not os.path.exists(os.path.join(workdir, "eval_before.json")):
        experiment.run(c, workdir)
    return workdir


def _copy_shared(base: str, workdir: str, data: bool = True) -> None:
    """Gives a cell its seed's data (unless `data` is False: the cell builds its own) and baseline evaluation,
    so the cell skips those stages."""
    os.makedirs(workdir, exist_ok=True)
    if data and not os.path.exists(os.path.join(workdir, "data")):
        shutil.copytree(os.path.join(base, "data"), os.path.join(workdir, "data"))
    if not os.path.exists(os.path.join(workdir, "eval_before.json")):
        shutil.copy2(os.path.join(base, "eval_before.json"), os.path.join(workdir, "eval_before.json"))


def run_grid(out: str, preset: str, divergences: Sequence[str], generators: Sequence[str], seeds: Sequence[int],
             supervised: bool, steps: int | None, transfer: bool) -> None:
    from distillspec_jax import experiment

    cells = [(d, g) for d in divergences for g in generators] + ([("ce", "fixed")] if supervised else [])
    total, done_before = len(cells) * len(seeds), time.perf_counter()
    finished = 0
    for seed in seeds:
        base = _seed_base(preset, seed, out, steps)
        for divergence, generator in cells:
            name = cell_name(divergence, generator, seed)
            workdir = os.path.join(out, "cells", name)
            finished += 1
            if os.path.exists(os.path.join(workdir, "results.json")):
                print(f"[study] {finished}/{total} {name}: done earlier, skipped", flush=True)
                continue
            _copy_shared(base, workdir)
            start = time.perf_counter()
            experiment.run(cell_config(preset, divergence, generator, seed, out, steps), workdir)
            elapsed = time.perf_counter() - done_before
            print(f"[study] {finished}/{total} {name}: {time.perf_counter() - start:.0f}s "
                  f"(elapsed {elapsed / 60:.1f} min)", flush=True)
        if transfer and TRANSFER_CELL[0] in divergences and TRANSFER_CELL[1] in generators:
            run_transfer(out, preset, seed, steps)


def run_transfer(out: str, preset: str, seed: int, steps: int | None) -> None:
    """The transfer cell's undistilled and distilled drafts on stdlib docstrings (prose the draft never saw
    in distillation, which used HumanEval prompts)."""
    from distillspec_jax import stages
    from distillspec_jax import sharding as shd
    from distillspec_jax import workdir as wd

    name = cell_name(*TRANSFER_CELL, seed)
    workdir = os.path.join(out, "transfer", name)
    target_file = os.path.join(workdir, "transfer.json")
    if os.path.exists(target_file):
        return
    c = cell_config(preset, *TRANSFER_CELL, seed, out, steps)
    c.data.update(source="stdlib_docstrings", task="corpus", chat=False, num_train_examples=TRANSFER_EXAMPLES,
                  max_prompt_len=TRANSFER_PROMPT_LEN, pad_multiple=TRANSFER_PROMPT_LEN)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    models = stages.prepare.prepare(c, workdir, mesh)
    stages.data.build_data(c, workdir, models, mesh)
    distilled = stages.distill.distilled_draft(c, os.path.join(out, "cells", name), mesh)
    result = {"cell": name, "domain": "stdlib_docstrings",
              "before": stages.evaluation.speculative_sweep(c, workdir, models, models.draft, mesh, "transfer: before"),
              "after": stages.evaluation.speculative_sweep(c, workdir, models, distilled, mesh, "transfer: after")}
    wd.write_json(wd.path(target_file), result)


# ----------------------------------------------------------------------------------------------
# Plan: the grid at a real preset on a TPU slice, and its estimated cost
# ----------------------------------------------------------------------------------------------

GSM8K_TRAIN_EXAMPLES = 7473  # openai/gsm8k 'main' train split: the real presets' data when taking all of it
ASSUMED_ALPHA = 0.6  # acceptance rate assumed for the speculative runs' length (measured only after a run)


def plan(scale: str, topology: str, divergences: Sequence[str], generators: Sequence[str], seeds: Sequence[int],
         supervised: bool, steps: int | None, transfer: bool, train_examples: int = GSM8K_TRAIN_EXAMPLES
         ) -> dict[str, Any]:
    """What run_grid would run with preset `scale` on TPU slice `topology`: per seed the shared base (target
    responses and the undistilled draft's evaluation), per cell the distillation and its evaluation, and the
    transfer evaluations; each with its roofline seconds (distillspec_jax.aot.run_seconds: lower bounds at
    100% of peak, estimates) and chip-hours. A config whose weights do not fit the slice's default mesh is
    planned on the mesh the pre-flight's cheap estimate names."""
    def seconds(c) -> dict[str, Any]:
        return planned_seconds(c, topology, train_examples)

    cells = [(d, g) for d in divergences for g in generators] + ([("ce", "fixed")] if supervised else [])
    rows = []
    for seed in seeds:
        base = seconds(cell_config(scale, "jsd", "target", seed, "", steps))
        rows.append({"name": f"base-s{seed}", "seconds": base["data_s"] + base["eval_s"], "mesh": base["mesh"]})
        for divergence, generator in cells:
            t = seconds(cell_config(scale, divergence, generator, seed, "", steps))
            rows.append({"name": cell_name(divergence, generator, seed), "mesh": t["mesh"],
                         "seconds": t["reference_s"] + t["distill_s"] + t["eval_s"],
                         "distill_step_s": t["distill_step_s"]})
        if transfer and TRANSFER_CELL[0] in divergences and TRANSFER_CELL[1] in generators:
            t = seconds(cell_config(scale, *TRANSFER_CELL, seed, "", steps))
            rows.append({"name": f"transfer/{cell_name(*TRANSFER_CELL, seed)}", "seconds": 2 * t["eval_s"],
                         "mesh": t["mesh"]})
    return plan_summary(scale, topology, rows, train_examples)


def planned_seconds(c, topology: str, train_examples: int) -> dict[str, Any]:
    """aot.run_seconds of one cell's config on TPU slice `topology` (estimates), with the mesh it is planned on:
    the config's own, or, when its weights do not fit, the one the pre-flight's cheap estimate names."""
    from distillspec_jax import aot, tpu_topology

    slice_ = tpu_topology.topology(topology)
    kind, chips = slice_.device_kind, slice_.chips
    if not aot.estimate_fit(c, kind, chips).fits:
        mesh = aot.fitting_mesh(c, kind, chips)
        if mesh is None:
            raise ValueError(f"{c.target.model} with {c.draft.model} does not fit {topology} on any mesh "
                             "(cheap estimate)")
        c.mesh.update(mesh)
    return {**aot.run_seconds(c, kind, chips, train_examples=train_examples, alpha=ASSUMED_ALPHA),
            "mesh": dict(zip(("data", "fsdp", "tensor"), aot.shd.mesh_sizes(c.mesh.data, c.mesh.fsdp, c.mesh.tensor,
                                                                              chips)))}


def plan_summary(scale: str, topology: str, rows: list[dict[str, Any]], train_examples: int) -> dict[str, Any]:
    """A plan's rows ({'name', 'seconds', 'mesh'}) with chip-hours and totals, as format_plan prints them."""
    from distillspec_jax import tpu_topology

    slice_ = tpu_topology.topology(topology)
    for row in rows:
        row["chip_hours"] = row["seconds"] * slice_.chips / 3600
    return {"scale": scale, "topology": topology, "chips": slice_.chips, "device_kind": slice_.device_kind,
            "assumed_alpha": ASSUMED_ALPHA, "train_examples": train_examples, "cells": rows,
            "total_hours": sum(r["seconds"] for r in rows) / 3600,
            "total_chip_hours": sum(r["chip_hours"] for r in rows),
            "label": "estimates: analytic roofline at 100% of vendor peaks (lower bounds), not measurements"}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"study plan: preset {p['scale']} on {p['topology']} ({p['chips']} x {p['device_kind']}); "
             f"{p['label']}; speculative runs sized with an assumed α = {p['assumed_alpha']}, "
             f"{p['train_examples']} training prompts", "",
             "| cell | mesh (data, fsdp, tensor) | hours | chip-hours |", "|---|---|---|---|"]
    for r in p["cells"]:
        mesh = r["mesh"]
        lines.append(f"| {r['name']} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | {r['seconds'] / 3600:.2f} | "
                     f"{r['chip_hours']:.1f} |")
    lines += ["", f"{len(p['cells'])} runs: {p['total_hours']:.1f} hours, {p['total_chip_hours']:.0f} chip-hours "
              "(estimate; lower bound)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval over the given per-seed values."""
    x = np.asarray(values, float)
    if len(x) == 1:
        return float(x[0]), float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(BOOTSTRAP_SAMPLES, len(x)), replace=True).mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _rows(results: dict, when: str) -> dict[tuple[float, int], dict]:
    return {(r["temperature"], r["gamma"]): r for r in results[when]}


def load_cells(out: str) -> dict[str, dict]:
    cells = {}
    root = os.path.join(out, "cells")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                cells[name] = json.load(f)
    return cells


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks with ties given their mean rank (the undistilled rows of one seed are identical)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return _pearson(_ranks(x), _ranks(y))


def _evaluations(cells: dict[str, dict], temperature: float) -> list[tuple[str, dict[int, dict]]]:
    """The distinct evaluations at one temperature, as (label, {γ: row}): each cell's distilled draft, and
    each seed's undistilled draft once (every cell of a seed carries a copy of the same 'before' rows)."""
    out, seen = [], set()
    for name, res in cells.items():
        seed = res["run"]["seed"]
        if seed not in seen:
            seen.add(seed)
            out.append((f"undistilled-s{seed}", {g: r for (t, g), r in _rows(res, "before").items() if t == temperature}))
        out.append((name, {g: r for (t, g), r in _rows(res, "after").items() if t == temperature}))
    return out


def correlations(cells: dict[str, dict], temperature: float, gamma: int) -> dict[str, Any]:
    """Does 1 − TVD track acceptance (claim (d))? α̂ = E[Σ min(p, q)] = 1 − TVD(p, q) on target samples.

    Over the distinct drafts (every distilled cell, and each seed's undistilled draft once):
    - tau_hat_vs_tau: the closed form τ̂ against measured τ, over every draft and γ.
    - alpha_hat_vs_tau, alpha_hat_vs_tau_rank: α̂ against τ at one γ, Pearson and Spearman (γ fixed,
      because τ grows with γ while α̂ does not, so pooling γ would dilute the relation).
    - delta_alpha_hat_vs_delta_tau: per cell, the change of α̂ through distillation against the change of τ.
    """
    evaluations = _evaluations(cells, temperature)
    every = [r for _, by_gamma in evaluations for r in by_gamma.values()]
    at = [by_gamma[gamma] for _, by_gamma in evaluations]
    alpha = [r["alpha_hat"] for r in at]
    tau = [r["block_efficiency"] for r in at]
    pairs = [(_rows(res, "before")[(temperature, gamma)], _rows(res, "after")[(temperature, gamma)])
             for res in cells.values()]
    return {
        "gamma": gamma,
        "tau_hat_vs_tau": _pearson([r["expected_block_efficiency"] for r in every],
                                   [r["block_efficiency"] for r in every]),
        "tau_hat_points": len(every),
        "alpha_hat_vs_tau": _pearson(alpha, tau),
        "alpha_hat_vs_tau_rank": _spearman(alpha, tau),
        "drafts": len(at),
        "delta_alpha_hat_vs_delta_tau": _pearson([a["alpha_hat"] - b["alpha_hat"] for b, a in pairs],
                                                 [a["block_efficiency"] - b["block_efficiency"] for b, a in pairs]),
        "cells": len(pairs)}


def paired_difference(table: list[dict], a: tuple[str, str], b: tuple[str, str], temperature: float,
                      gamma: int) -> dict[str, Any] | None:
    """τ(a) − τ(b) for two (divergence, generator) cells, paired by seed (both start from the seed's same
    draft, data and target), with its bootstrap interval over seeds; None when either is missing."""
    def per_seed(key):
        match = [e for e in table if (e["divergence"], e["generator"]) == key and e["temperature"] == temperature
                 and e["gamma"] == gamma]
        return dict(zip(match[0]["seed_ids"], match[0]["tau_after_per_seed"])) if match else None

    ta, tb = per_seed(a), per_seed(b)
    if ta is None or tb is None or not set(ta) & set(tb):
        return None
    seeds = sorted(set(ta) & set(tb))
    return {"a": list(a), "b": list(b), "temperature": temperature, "gamma": gamma, "seeds": len(seeds),
            "difference": bootstrap_ci([ta[s] - tb[s] for s in seeds]),
            "a_wins_every_seed": all(ta[s] > tb[s] for s in seeds)}


def comparisons(table: list[dict], gamma: int) -> dict[str, list[dict]]:
    """The paired contrasts behind claims (b) and AdaSPEC's: on-policy (draft) against target-generated
    data per divergence, and AdaSPEC against plain FKL (its own reference objective) per data source."""
    temperatures = sorted({e["temperature"] for e in table})
    divergences = sorted({e["divergence"] for e in table} - {"ce"})
    generators = sorted({e["generator"] for e in table})
    draft_vs_target = [paired_difference(table, (d, "draft"), (d, "target"), t, gamma)
                       for t in temperatures for d in divergences]
    adaspec_vs_fkl = [paired_difference(table, ("adaspec", g), ("fkl", g), t, gamma)
                      for t in temperatures for g in generators]
    return {"draft_vs_target": [c for c in draft_vs_target if c],
            "adaspec_vs_fkl": [c for c in adaspec_vs_fkl if c]}


def aggregate(out: str) -> dict[str, Any]:
    """Mean τ with bootstrap 95% intervals over seeds, per (divergence, generator, temperature, γ), the gain
    over the undistilled draft, speedups, and the correlations between analytic and measured acceptance."""
    cells = load_cells(out)
    if not cells:
        raise FileNotFoundError(f"no finished cells under {out}/cells; run the grid first")
    groups: dict[tuple[str, str], list[dict]] = {}
    for name, res in cells.items():
        divergence, generator, _ = name.rsplit("-", 2)
        groups.setdefault((divergence, generator), []).append(res)
    table = []
    for (divergence, generator), runs in sorted(groups.items()):
        keys = sorted(_rows(runs[0], "after"))
        for key in keys:
            after = [_rows(r, "after")[key] for r in runs]
            before = [_rows(r, "before")[key] for r in runs]
            gain = [a["block_efficiency"] / b["block_efficiency"] - 1.0 for a, b in zip(after, before)]
            entry = {"divergence": divergence, "generator": generator, "temperature": key[0], "gamma": key[1],
                     "seeds": len(runs),
                     "tau_before": bootstrap_ci([b["block_efficiency"] for b in before]),
                     "tau_after": bootstrap_ci([a["block_efficiency"] for a in after]),
                     "seed_ids": [r["run"]["seed"] for r in runs],
                     "tau_after_per_seed": [a["block_efficiency"] for a in after],
                     "relative_gain": bootstrap_ci(gain),
                     "alpha_hat_after": float(np.mean([a["alpha_hat"] for a in after]))}
            for field in ("predicted_speedup", "measured_speedup"):
                if all(field in a for a in after):
                    entry[field] = float(np.mean([a[field] for a in after]))
            table.append(entry)
    largest_gamma = max(e["gamma"] for e in table)
    by_temperature = {str(t): correlations(cells, t, largest_gamma) for t in sorted({e["temperature"] for e in table})}
    transfer = []
    tdir = os.path.join(out, "transfer")
    for name in sorted(os.listdir(tdir)) if os.path.isdir(tdir) else []:
        path = os.path.join(tdir, name, "transfer.json")
        if os.path.exists(path):
            with open(path) as f:
                t = json.load(f)
            for (key, b), a in zip(_rows(t, "before").items(), _rows(t, "after").values()):
                transfer.append({"cell": name, "temperature": key[0], "gamma": key[1],
                                 "tau_before": b["block_efficiency"], "tau_after": a["block_efficiency"]})
    summary = {"cells": len(cells), "table": table, "correlations": by_temperature,
               "comparisons": comparisons(table, largest_gamma), "transfer": transfer}
    files.write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _ci(t: tuple[float, float, float], spec: str = ".2f") -> str:
    return f"{t[0]:{spec}} [{t[1]:{spec}}, {t[2]:{spec}}]"


def _paired_row(c: dict, *labels: str) -> str:
    wins = "yes" if c["a_wins_every_seed"] else "no"
    return f"| {c['temperature']:g} | " + " | ".join(labels) + f" | {_ci(c['difference'], '+.3f')} | {wins} |"


def _contrast_tables(table: list[dict], gamma: int) -> list[str]:
    """Claims (b), (c) and AdaSPEC's as paired differences of τ at one γ (the same seed's draft, data and
    target on both sides), each with its bootstrap interval over seeds."""
    lines = [f"### Best divergence per data source, against the runner-up (γ = {gamma})", "",
             "| temperature | data | best | runner-up | τ best − τ runner-up [95% CI] | better at every seed |",
             "|---|---|---|---|---|---|"]
    for temperature in sorted({e["temperature"] for e in table}):
        for generator in sorted({e["generator"] for e in table}):
            rows = sorted((e for e in table if e["temperature"] == temperature and e["generator"] == generator
                           and e["gamma"] == gamma and e["divergence"] != "ce"), key=lambda e: -e["tau_after"][0])
            if len(rows) >= 2:
                best, second = rows[0]["divergence"], rows[1]["divergence"]
                c = paired_difference(table, (best, generator), (second, generator), temperature, gamma)
                if c:  # None while a half-finished grid has no seed in common for the two
                    lines.append(_paired_row(c, generator, best, second))
    contrasts = comparisons(table, gamma)
    lines += ["", f"### On-policy (draft-generated) against target-generated data (γ = {gamma})", "",
              "| temperature | divergence | τ draft − τ target [95% CI] | draft better at every seed |", "|---|---|---|---|"]
    lines += [_paired_row(c, c["a"][0]) for c in contrasts["draft_vs_target"]]
    lines += ["", f"### AdaSPEC against plain FKL, its reference objective (γ = {gamma})", "",
              "| temperature | data | τ AdaSPEC − τ FKL [95% CI] | AdaSPEC better at every seed |", "|---|---|---|---|"]
    lines += [_paired_row(c, c["a"][1]) for c in contrasts["adaspec_vs_fkl"]]
    return lines + [""]


def format_tables(summary: dict[str, Any], gamma: int | None = None) -> str:
    """Markdown: per temperature, τ after (95% CI) and the relative gain at one γ (default: the largest)."""
    table = summary["table"]
    gamma = gamma or max(e["gamma"] for e in table)
    lines = []
    for temperature in sorted({e["temperature"] for e in table}):
        rows = [e for e in table if e["temperature"] == temperature and e["gamma"] == gamma]
        base = rows[0]["tau_before"] if rows else None
        lines += [f"### Temperature {temperature:g}, γ = {gamma}", "",
                  f"Undistilled draft: τ = {_ci(base)} (seeds: {rows[0]['seeds']})" if base else "", "",
                  "| divergence | data | τ after [95% CI] | relative gain [95% CI] | α̂ after | predicted speedup | measured speedup |",
                  "|---|---|---|---|---|---|---|"]
        for e in sorted(rows, key=lambda e: -e["tau_after"][0]):
            lines.append(f"| {e['divergence']} | {e['generator']} | {_ci(e['tau_after'])} | "
                         f"{_ci(e['relative_gain'], '+.1%')} | {e['alpha_hat_after']:.3f} | "
                         f"{e.get('predicted_speedup', float('nan')):.2f} | {e.get('measured_speedup', float('nan')):.2f} |")
        lines.append("")
    lines += _contrast_tables(table, gamma)
    lines += ["### Does 1 − TVD track acceptance? (Pearson r unless marked)", "",
              "α̂ = mean Σ min(p, q) = 1 − TVD on target-sampled continuations; τ measured by the speculative loop.",
              "Drafts: every distilled cell, and each seed's undistilled draft once.", "",
              "| temperature | r(τ̂, τ), every γ | r(α̂, τ) at γ | Spearman ρ(α̂, τ) at γ | drafts | "
              "r(Δα̂, Δτ) at γ, per cell | cells |", "|---|---|---|---|---|---|---|"]
    for temperature, c in summary["correlations"].items():
        lines.append(f"| {float(temperature):g} | {c['tau_hat_vs_tau']:.3f} ({c['tau_hat_points']} points) | "
                     f"{c['alpha_hat_vs_tau']:.3f} (γ = {c['gamma']}) | {c['alpha_hat_vs_tau_rank']:.3f} | "
                     f"{c['drafts']} | {c['delta_alpha_hat_vs_delta_tau']:.3f} | {c['cells']} |")
    if summary["transfer"]:
        lines += ["", "### Transfer to held-out prose (stdlib docstrings)", "",
                  "| cell | temperature | γ | τ before | τ after |", "|---|---|---|---|---|"]
        for t in summary["transfer"]:
            if t["gamma"] == gamma:
                lines.append(f"| {t['cell']} | {t['temperature']:g} | {t['gamma']} | {t['tau_before']:.2f} | "
                             f"{t['tau_after']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: str, gamma: int | None = None) -> None:
    """Grouped bars: mean τ after distillation (95% CI) per divergence and generator, one panel per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    gamma = gamma or max(e["gamma"] for e in table)
    temperatures = sorted({e["temperature"] for e in table})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        rows = [e for e in table if e["temperature"] == temperature and e["gamma"] == gamma]
        divergences = sorted({e["divergence"] for e in rows})
        generators = sorted({e["generator"] for e in rows})
        width = 0.8 / max(len(generators), 1)
        for j, generator in enumerate(generators):
            xs, means, errs = [], [], []
            for i, divergence in enumerate(divergences):
                match = [e for e in rows if e["divergence"] == divergence and e["generator"] == generator]
                if match:
                    mean, low, high = match[0]["tau_after"]
                    xs.append(i + j * width)
                    means.append(mean)
                    errs.append((mean - low, high - mean))
            ax.bar(xs, means, width, yerr=np.asarray(errs).T if errs else None, label=generator, capsize=2)
        if rows:
            ax.axhline(rows[0]["tau_before"][0], color="k", ls="--", lw=1, label="undistilled")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(divergences))], divergences)
        ax.set_title(f"τ at γ = {gamma}, temperature {temperature:g}")
        ax.set_ylabel("block efficiency τ")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study_arguments(description: str, seeds: Sequence[int] = SEEDS) -> argparse.ArgumentParser:
    """The command line every study shares: where, which preset and seeds, how long, aggregate only, or plan."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", help="study folder (resumed when it exists); not needed with --plan")
    parser.add_argument("--preset", default="study", help="config preset of every cell: study (default) | test")
    parser.add_argument("--seeds", default=",".join(map(str, seeds)))
    parser.add_argument("--steps", type=int, default=None, help="override distill.steps of every cell")
    parser.add_argument("--aggregate", action="store_true", help="only aggregate finished cells")
    parser.add_argument("--plan", action="store_true", help="print the cells and their estimated chip-hours; run nothing")
    parser.add_argument("--scale", default="", help="with --plan: a real preset (0.6b-8b, 1.7b-32b, ...)")
    parser.add_argument("--topology", default="v5p-8", help="with --plan: the TPU slice (v5p-8, v5e-16, ...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__.split("\n")[0])
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--no_supervised", action="store_true", help="skip the cross-entropy baseline")
    parser.add_argument("--no_transfer", action="store_true", help="skip the held-out-domain evaluation")
    args = parser.parse_args(argv)
    divergences = [d for d in args.divergences.split(",") if d]
    generators = [g for g in args.generators.split(",") if g]
    bad = [d for d in divergences if d not in DIVERGENCES] + [g for g in generators if g not in GENERATORS]
    if bad:
        parser.error(f"unknown divergences/generators {bad}; choose from {DIVERGENCES} and {GENERATORS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.plan:
        print(format_plan(plan(args.scale, args.topology, divergences, generators, seeds, not args.no_supervised,
                               args.steps, not args.no_transfer)))
        return 0
    if not args.out:
        parser.error("--out is required (except with --plan)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not args.aggregate:
        run_grid(out, args.preset, divergences, generators, seeds, not args.no_supervised, args.steps,
                 not args.no_transfer)
    summary = aggregate(out)
    tables = format_tables(summary)
    files.write_text(os.path.join(out, "tables.md"), tables)
    plot(summary, os.path.join(out, "study_tau.png"))
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
