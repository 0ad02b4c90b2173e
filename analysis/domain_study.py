"""The domain-draft study (issue 17): the four findings of Hong et al. 2025 (arXiv 2503.07807), tested on the
`:study` pair with the machinery of analysis/study.py (its cells, bootstrap intervals and seed pairing).

    python -m analysis.domain_study --out=/tmp/domain              # every cell, 3 seeds (rerun to resume)
    python -m analysis.domain_study --out=/tmp/domain --aggregate  # only re-aggregate: domain_summary.json, domain_tables.md
    python -m analysis.domain_study --plan --scale=0.6b-8b --topology=v5p-8  # the cells at a real pair: estimated
                                                                              # chip-hours (the pre-flight's roofline)

Cells, each an ordinary `experiment.run` workdir with the `:study` preset, FKL at loss temperature 1 unless named:

    humaneval/online      generator target: the target's responses, generated once; the teacher's full
                          distribution recomputed at every step (DistillSpec's white-box distillation)
    humaneval/offline     generator target_logits: the same responses with the teacher's top-k stored once
                          (k = generator.logits_k); no teacher in memory while training
    humaneval/serving     generator serving: the training prompts served as a request stream, the draft updated
                          from the verify calls' top-k every serving.requests_per_update requests
    humaneval/blackbox    cross-entropy on the same target-generated text as online (sequence-level KD)
    humaneval/synthetic   offline, on as many prompts written by the target itself (Magpie-style)
    humaneval/offline-nN  offline on the first N training prompts (data scaling)
    docstrings/offline, docstrings/offline-nN   the same on a second domain, standard-library docstrings
    cross                 humaneval/offline's draft evaluated on docstrings, and docstrings/offline's on humaneval

Every cell takes the same optimizer steps of the same batch (serving: as many requests served as sequences
trained on), so cells differ in what the draft learns from, not in how long. Evaluation prompts are held out of
each domain by the seed and shared by every cell of that domain and seed.

Layout of --out: models/ (the tiny pair, built once), base-{domain}-s{seed}/ (data, target responses, the
undistilled draft's evaluation), cells/{domain}-{cell}-s{seed}/, cross/{domain}-offline-on-{other}-s{seed}.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis import study
from distillspec_jax import files

SEEDS = (0, 1, 2)
DOMAINS = ("humaneval", "docstrings")
# Each domain's data settings over the preset's (the :study preset already reads HumanEval; a real pair reads
# GSM8K by default, and its chat template stays on for HumanEval).
DOMAIN_DATA = {"humaneval": dict(source="humaneval", name="", split="train", eval_split="", task="humaneval"),
               "docstrings": dict(source="stdlib_docstrings", name="", split="train", eval_split="", task="corpus",
                                  chat=False, max_prompt_len=96, pad_multiple=96)}
FULL_TRAIN = 148  # training prompts of a domain: HumanEval's 164 less the 16 held out (the docstrings: the same)
SCALING = (37, 74)  # smaller training sets for data scaling (the full set is the offline cell)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One trained draft of the study."""

    domain: str  # humaneval | docstrings
    label: str  # online | offline | serving | blackbox | synthetic | offline-n{N}
    divergence: str = "fkl"
    generator: str = "target_logits"
    train_examples: int = FULL_TRAIN
    synthetic: bool = False

    @property
    def name(self) -> str:
        return f"{self.domain}-{self.label}"

    @property
    def shares_base_data(self) -> bool:
        """True when the seed's base data (prompts and target responses) is exactly this cell's, so it is
        copied; otherwise the cell's data stage builds its own (stored logits, synthetic prompts, fewer rows)."""
        return self.generator in ("target", "serving") and self.train_examples == FULL_TRAIN and not self.synthetic


def cells() -> list[Cell]:
    grid = [Cell("humaneval", "online", generator="target"), Cell("humaneval", "offline"),
            Cell("humaneval", "serving", generator="serving"),
            Cell("humaneval", "blackbox", divergence="ce", generator="target"),
            Cell("humaneval", "synthetic", synthetic=True)]
    for domain in DOMAINS:
        if domain != "humaneval":
            grid.append(Cell(domain, "offline"))
        grid += [Cell(domain, f"offline-n{n}", train_examples=n) for n in SCALING]
    return grid


def _domain(c, domain: str):
    c.data.update(DOMAIN_DATA[domain])
    c.data.num_train_examples = FULL_TRAIN
    return c


def base_config(preset: str, domain: str, seed: int, out: str, steps: int | None):
    return _domain(study.cell_config(preset, "fkl", "target", seed, out, steps), domain)


def cell_config(preset: str, cell: Cell, seed: int, out: str, steps: int | None):
    c = _domain(study.cell_config(preset, cell.divergence, cell.generator, seed, out, steps), cell.domain)
    c.data.num_train_examples = cell.train_examples
    if cell.synthetic:
        c.synthetic.num_prompts = cell.train_examples
    if cell.generator == "serving":  # as many requests served as the other cells train on sequences
        c.serving.requests_per_update = c.serving.steps_per_update * c.distill.batch_size
    return c


def _base_name(domain: str, seed: int) -> str:
    return f"base-{domain}-s{seed}"


def run_grid(out: str, preset: str, seeds: Sequence[int], steps: int | None) -> None:
    from distillspec_jax import experiment

    grid = cells()
    total, finished, start = len(grid) * len(seeds), 0, time.perf_counter()
    for seed in seeds:
        bases = {d: study._seed_base(preset, seed, out, steps, base_config(preset, d, seed, out, steps),
                                     _base_name(d, seed)) for d in DOMAINS}
        for cell in grid:
            finished += 1
            workdir = os.path.join(out, "cells", f"{cell.name}-s{seed}")
            if os.path.exists(os.path.join(workdir, "results.json")):
                print(f"[domain] {finished}/{total} {cell.name}-s{seed}: done earlier, skipped", flush=True)
                continue
            study._copy_shared(bases[cell.domain], workdir, data=cell.shares_base_data)
            began = time.perf_counter()
            experiment.run(cell_config(preset, cell, seed, out, steps), workdir)
            print(f"[domain] {finished}/{total} {cell.name}-s{seed}: {time.perf_counter() - began:.0f}s "
                  f"(elapsed {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        for domain in DOMAINS:
            for other in DOMAINS:
                if other != domain:
                    run_cross(out, preset, domain, other, seed, steps, bases[other])


def run_cross(out: str, preset: str, trained_on: str, evaluated_on: str, seed: int, steps: int | None,
              base: str) -> None:
    """The offline draft of `trained_on` decoded on `evaluated_on`'s held-out prompts (that domain's base)."""
    from distillspec_jax import sharding as shd
    from distillspec_jax import stages

    path = os.path.join(out, "cross", f"{trained_on}-offline-on-{evaluated_on}-s{seed}.json")
    if os.path.exists(path):
        return
    c = base_config(preset, evaluated_on, seed, out, steps)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    models = stages.prepare.prepare(c, base, mesh)
    draft = stages.distill.distilled_draft(c, os.path.join(out, "cells", f"{trained_on}-offline-s{seed}"), mesh)
    rows = stages.evaluation.speculative_sweep(c, base, models, draft, mesh,
                                               f"cross: {trained_on} draft on {evaluated_on}")
    files.write_json(path, {"trained_on": trained_on, "evaluated_on": evaluated_on, "seed": seed, "after": rows})


def plan(scale: str, topology: str, seeds: Sequence[int], steps: int | None) -> dict[str, Any]:
    """What run_grid would run with preset `scale` on TPU slice `topology`, each run with its roofline seconds
    (`study.planned_seconds`: aot.run_seconds, lower bounds at 100% of peak, estimates) and chip-hours: per seed
    and domain the base (target responses, the undistilled draft's evaluation), per cell its own data stage
    where it has one (stored logits, synthetic prompts, fewer rows; the synthetic queries' own generation is
    not counted), distillation (with serving, the served requests) and evaluation, and the cross evaluations."""
    rows = []
    for seed in seeds:
        for domain in DOMAINS:
            t = study.planned_seconds(base_config(scale, domain, seed, "", steps), topology, FULL_TRAIN)
            rows.append({"name": _base_name(domain, seed), "seconds": t["data_s"] + t["eval_s"], "mesh": t["mesh"]})
        for cell in cells():
            t = study.planned_seconds(cell_config(scale, cell, seed, "", steps), topology, cell.train_examples)
            data_s = 0.0 if cell.shares_base_data else t["data_s"]
            rows.append({"name": f"{cell.name}-s{seed}", "seconds": data_s + t["distill_s"] + t["eval_s"],
                         "mesh": t["mesh"], "distill_step_s": t["distill_step_s"]})
            if cell.label == "offline":  # decoded on the other domain too
                rows.append({"name": f"cross/{cell.name}-s{seed}", "seconds": t["eval_s"], "mesh": t["mesh"]})
    return study.plan_summary(scale, topology, rows, FULL_TRAIN)


# ----------------------------------------------------------------------------------------------
# Aggregation: per-seed τ at one (temperature, γ), paired contrasts with bootstrap intervals
# ----------------------------------------------------------------------------------------------


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _tau(rows: list[dict], temperature: float, gamma: int) -> float:
    return next(r["block_efficiency"] for r in rows if r["temperature"] == temperature and r["gamma"] == gamma)


def load(out: str, seeds: Sequence[int]) -> dict[str, dict[int, dict[tuple[float, int], float]]]:
    """{evaluation: {seed: {(temperature, γ): τ}}}: each cell's draft after distillation (by cell name), each
    domain's undistilled draft ('{domain}-undistilled'), and the cross-domain drafts ('{a}-offline-on-{b}')."""
    found: dict[str, dict[int, dict]] = {}

    def add(name: str, seed: int, rows: list[dict]) -> None:
        found.setdefault(name, {})[seed] = {(r["temperature"], r["gamma"]): r["block_efficiency"] for r in rows}

    for seed in seeds:
        for domain in DOMAINS:
            before = _read(os.path.join(out, _base_name(domain, seed), "eval_before.json"))
            if before:
                add(f"{domain}-undistilled", seed, before)
        for cell in cells():
            res = _read(os.path.join(out, "cells", f"{cell.name}-s{seed}", "results.json"))
            if res:
                add(cell.name, seed, res["after"])
        for a in DOMAINS:
            for b in DOMAINS:
                cross = _read(os.path.join(out, "cross", f"{a}-offline-on-{b}-s{seed}.json"))
                if cross:
                    add(f"{a}-offline-on-{b}", seed, cross["after"])
    return found


def _per_seed(found, name: str, key) -> dict[int, float]:
    return {s: v[key] for s, v in found.get(name, {}).items() if key in v}


def contrast(found, a: str, b: str, key, base: str | None = None) -> dict[str, Any] | None:
    """a against b, paired by seed: the relative difference τ(a)/τ(b) − 1, the difference of τ, and (with
    `base`, the undistilled draft) the share of b's gain that a reaches, (τ(a) − τ0)/(τ(b) − τ0); each the
    mean over seeds with its bootstrap 95% interval. None while a or b has no finished seed in common."""
    ta, tb = _per_seed(found, a, key), _per_seed(found, b, key)
    seeds = sorted(set(ta) & set(tb))
    if not seeds:
        return None
    result = {"a": a, "b": b, "temperature": key[0], "gamma": key[1], "seeds": len(seeds),
              "tau_a": study.bootstrap_ci([ta[s] for s in seeds]), "tau_b": study.bootstrap_ci([tb[s] for s in seeds]),
              "difference": study.bootstrap_ci([ta[s] - tb[s] for s in seeds]),
              "relative": study.bootstrap_ci([ta[s] / tb[s] - 1.0 for s in seeds]),
              "a_wins_every_seed": all(ta[s] > tb[s] for s in seeds)}
    if base is not None:
        t0 = _per_seed(found, base, key)
        if all(s in t0 and tb[s] != t0[s] for s in seeds):  # b's gain is the denominator
            result["gain_share"] = study.bootstrap_ci([(ta[s] - t0[s]) / (tb[s] - t0[s]) for s in seeds])
    return result


def scaling(found, domain: str, key) -> dict[str, Any] | None:
    """τ against the number of training prompts in one domain: the mean τ per size and the least-squares slope
    of τ on log2 N per seed (τ gained per doubling of the data), with its bootstrap interval."""
    sizes = (*SCALING, FULL_TRAIN)
    names = {n: f"{domain}-offline" if n == FULL_TRAIN else f"{domain}-offline-n{n}" for n in sizes}
    per = {n: _per_seed(found, names[n], key) for n in sizes}
    seeds = sorted(set.intersection(*(set(p) for p in per.values())))
    if not seeds:
        return None
    x = np.log2(np.asarray(sizes, float))
    slopes = [float(np.polyfit(x, [per[n][s] for n in sizes], 1)[0]) for s in seeds]
    return {"domain": domain, "temperature": key[0], "gamma": key[1], "seeds": len(seeds), "sizes": list(sizes),
            "tau": [study.bootstrap_ci([per[n][s] for s in seeds]) for n in sizes],
            "slope_per_doubling": study.bootstrap_ci(slopes),
            "monotone_every_seed": all(all(per[a][s] < per[b][s] for a, b in zip(sizes, sizes[1:])) for s in seeds)}


def serving_log(out: str, seeds: Sequence[int]) -> dict[str, Any] | None:
    """The serving cell's log (data/serving.py) over seeds: τ of each update's requests against requests served,
    and the cost per request of serving and of the updates (training seconds / requests per update)."""
    from distillspec_jax.data import serving

    logs = []
    for seed in seeds:
        path = os.path.join(out, "cells", f"humaneval-serving-s{seed}", serving.LOG_FILE)
        if os.path.exists(path):
            with open(path) as f:
                logs.append([json.loads(line) for line in f if line.strip()])
    if not logs:
        return None
    updates = min(len(log) for log in logs)
    per_update = logs[0][1]["requests_served"] - logs[0][0]["requests_served"] if updates > 1 else None
    train_s = [r["train_s_previous_update"] for log in logs for r in log[1:updates]]
    return {"seeds": len(logs), "requests_served": [r["requests_served"] for r in logs[0][:updates]],
            "tau": [study.bootstrap_ci([log[u]["block_efficiency"] for log in logs]) for u in range(updates)],
            "serve_s_per_request": float(np.mean([r["serve_s"] for log in logs for r in log[:updates]])) /
            logs[0][0]["requests_served"],
            "update_s_per_request": float(np.mean(train_s)) / per_update if train_s and per_update else None}


CLAIMS = {  # claim -> the contrasts (a, b, base) that test it
    "offline_vs_online": [("humaneval-offline", "humaneval-serving", None),
                          ("humaneval-online", "humaneval-serving", None),
                          ("humaneval-offline", "humaneval-online", None)],
    "white_vs_black": [("humaneval-online", "humaneval-blackbox", None),
                       ("humaneval-offline", "humaneval-blackbox", None)],
    "synthetic_vs_real": [("humaneval-synthetic", "humaneval-offline", "humaneval-undistilled")],
    "domain_shift": [("humaneval-offline", "docstrings-offline-on-humaneval", "humaneval-undistilled"),
                     ("docstrings-offline", "humaneval-offline-on-docstrings", "docstrings-undistilled")],
}


def aggregate(out: str, seeds: Sequence[int] = SEEDS) -> dict[str, Any]:
    found = load(out, seeds)
    if not any(name.endswith(("-offline", "-online")) for name in found):
        raise FileNotFoundError(f"no finished cells under {out}/cells; run the study first")
    keys = sorted({k for per in found.values() for v in per.values() for k in v})
    gamma = max(g for _, g in keys)
    temperatures = sorted({t for t, _ in keys})
    summary: dict[str, Any] = {"gamma": gamma, "evaluations": {
        name: {f"{t:g}": study.bootstrap_ci(list(_per_seed(found, name, (t, gamma)).values()))
               for t in temperatures if _per_seed(found, name, (t, gamma))} for name in sorted(found)}}
    for claim, pairs in CLAIMS.items():
        summary[claim] = [c for t in temperatures for a, b, base in pairs
                          if (c := contrast(found, a, b, (t, gamma), base))]
    summary["data_scaling"] = [s for t in temperatures for d in DOMAINS if (s := scaling(found, d, (t, gamma)))]
    summary["serving"] = serving_log(out, seeds)
    files.write_json(os.path.join(out, "domain_summary.json"), summary)
    return summary


def _ci(t, spec: str = ".2f") -> str:
    return f"{t[0]:{spec}} [{t[1]:{spec}}, {t[2]:{spec}}]"


def format_tables(summary: dict[str, Any]) -> str:
    gamma = summary["gamma"]
    lines = [f"### τ at γ = {gamma} (mean over seeds [95% bootstrap CI])", "", "| draft | temperature | τ |",
             "|---|---|---|"]
    for name, by_t in summary["evaluations"].items():
        lines += [f"| {name} | {t} | {_ci(v)} |" for t, v in by_t.items()]
    titles = {"offline_vs_online": "Offline against online", "white_vs_black": "White-box against black-box",
              "synthetic_vs_real": "Synthetic against real prompts", "domain_shift": "Domain shift (in-domain "
              "draft a against the other domain's draft b, on a's evaluation prompts)"}
    for claim, title in titles.items():
        lines += ["", f"### {title} (γ = {gamma}, paired by seed)", "",
                  "| a | b | temperature | τ(a)/τ(b) − 1 [95% CI] | τ(a) − τ(b) | a better at every seed | "
                  "a's share of b's gain |", "|---|---|---|---|---|---|---|"]
        for c in summary[claim]:
            share = _ci(c["gain_share"], ".0%") if "gain_share" in c else ""
            lines.append(f"| {c['a']} | {c['b']} | {c['temperature']:g} | {_ci(c['relative'], '+.1%')} | "
                         f"{_ci(c['difference'], '+.3f')} | {'yes' if c['a_wins_every_seed'] else 'no'} | {share} |")
    lines += ["", f"### Data scaling: τ against training prompts N (γ = {gamma})", "",
              "| domain | temperature | τ at N = " + ", ".join(map(str, (*SCALING, FULL_TRAIN))) +
              " | τ per doubling of N [95% CI] | rising at every seed |", "|---|---|---|---|---|"]
    for s in summary["data_scaling"]:
        taus = " / ".join(f"{t[0]:.3f}" for t in s["tau"])
        lines.append(f"| {s['domain']} | {s['temperature']:g} | {taus} | {_ci(s['slope_per_doubling'], '+.3f')} | "
                     f"{'yes' if s['monotone_every_seed'] else 'no'} |")
    if summary.get("serving"):
        v = summary["serving"]
        lines += ["", "### Learning while serving: τ of each update's requests (the draft as it was when they arrived)",
                  "", "| requests served | τ [95% CI] |", "|---|---|"]
        lines += [f"| {n} | {_ci(t)} |" for n, t in zip(v["requests_served"], v["tau"])]
        update = v["update_s_per_request"]
        lines += ["", f"Serving: {v['serve_s_per_request'] * 1e3:.1f} ms per request; the updates add "
                  + (f"{update * 1e3:.1f} ms per request" if update is not None else "nothing measured yet")
                  + f" (means over {v['seeds']} seeds, on the machine that ran the study)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = study.study_arguments(__doc__.split("\n")[0], SEEDS)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.plan:
        print(study.format_plan(plan(args.scale, args.topology, seeds, args.steps)))
        return 0
    if not args.out:
        parser.error("--out is required (except with --plan)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not args.aggregate:
        run_grid(out, args.preset, seeds, args.steps)
    tables = format_tables(aggregate(out, seeds))
    files.write_text(os.path.join(out, "domain_tables.md"), tables)
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
