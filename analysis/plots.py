"""PNG plots and a markdown comparison of DistillSpec runs, read from their workdirs (local or gs://).

    python -m analysis.plots WORKDIR [WORKDIR ...] --out DIR

writes into DIR (design §5 defines every quantity):

    tau_vs_gamma.png             τ (block efficiency) against γ, before (dashed) and after (solid) distillation
    per_position_acceptance.png  a_i against the draft position i, at the largest γ
    training_curves.png          loss, divergence and 1 − TVD against the training step (metrics.jsonl)
    analytic_vs_measured.png     α̂ against the measured α, and τ̂ = (1 − α̂^(γ+1)) / (1 − α̂) against τ
    speedup.png                  predicted τ / (γc + 1) (and with the measured verification cost) against measured
    comparison.md                one row per run: mean τ over γ and τ at the largest γ, per temperature

and, when a run has a lossy frontier (config.eval.lenience; results.json "frontier"):

    lossy_frontier_loglik.png    the target's log-likelihood per token of the lossy outputs against τ, predicted
                                 and measured speedup: one curve per draft (before dashed, after solid) and
                                 lenience form, from ε = 1 (lossless) down, at the largest γ
    lossy_frontier_tvd.png       the same with TVD(P_ε, p), the closed-form law's distance to the target's

Every panel with several temperatures has one column per temperature. A run without an `after` evaluation,
metrics or timings is drawn with what it has, and comparison.md says what is missing.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot: importing this module does not
change the caller's backend (a notebook keeps its inline one), needs no display, and keeps no global figures.
Every PNG is FIGSIZE_IN at DPI, i.e. exactly PIXEL_SIZE pixels (no tight bounding box).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

RESULTS_FILE, METRICS_FILE, CONFIG_FILE = "results.json", "metrics.jsonl", "config.json"
COMPARISON_FILE = "comparison.md"
RESULTS_SCHEMA = 1  # distillspec_jax/stages/report.py:RESULTS_SCHEMA (not imported: analysis needs no JAX)
FIGSIZE_IN = (12.0, 4.8)  # width, height in inches
DPI = 100
PIXEL_SIZE = (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))  # width, height of every PNG

STAGES = ("before", "after")  # the undistilled draft, then the distilled one
LINESTYLE = {"before": "--", "after": "-"}
FILLED = {"before": False, "after": True}  # scatter markers: hollow before, filled after
TEMPERATURE_MARKERS = "osD^vP*X"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")
GUIDE = dict(color="0.55", linestyle=":", linewidth=1.2)  # y = x, τ = γ + 1, speedup = 1
DASH = "–"  # an empty cell of comparison.md


# ----------------------------------------------------------------------------------------------
# Reading workdirs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One workdir's results.json (and metrics.jsonl, when there is one)."""

    workdir: str
    info: dict[str, Any]  # results.json["run"]: name, divergence, jsd_beta, selection (and its k), generator, ...
    before: list[dict[str, Any]]  # one row per (temperature, γ): the undistilled draft
    after: list[dict[str, Any]]  # the same sweep with the distilled draft; [] when not evaluated (yet)
    training: dict[str, Any]  # steps, data_position, last_metrics; {} when distillation did not finish
    metrics: list[dict[str, Any]]  # metrics.jsonl by step (the last line of each step); [] when absent
    frontier: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # stage -> lossy rows
    label: str = ""  # run · divergence · generator, unique among the runs loaded together

    def rows(self, stage: str) -> list[dict[str, Any]]:
        return self.before if stage == "before" else self.after

    @property
    def name(self) -> str:
        return str(self.info.get("name") or os.path.basename(self.workdir.rstrip("/")))

    @property
    def divergence(self) -> str:
        return divergence_label(self.info)

    @property
    def generator(self) -> str:
        return generator_label(self.info)


def divergence_label(info: dict[str, Any]) -> str:
    """'JSD[β=0.5]', 'FKL', 'FKL + AdaSPEC[k=0.4]', ... as the paper names them."""
    name = str(info.get("divergence") or "?")
    label = f"JSD[β={info['jsd_beta']:g}]" if name == "jsd" and info.get("jsd_beta") is not None else name.upper()
    if info.get("adaspec_fraction"):
        label += f" + AdaSPEC[k={info['adaspec_fraction']:g}]"
    return label


def generator_label(info: dict[str, Any]) -> str:
    kind = str(info.get("generator") or "?")
    return f"mix[λ={info['mix_lambda']:g}]" if kind == "mix" and info.get("mix_lambda") is not None else kind


def _path(location: str | os.PathLike) -> epath.Path:
    return epath.Path(str(location))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl sorted by step; a resumed run may log a step twice, and the later line wins. A torn last line
    (a run killed mid-write) is skipped."""
    file = _path(workdir) / METRICS_FILE
    if not file.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            by_step[int(entry["step"])] = entry
    return [by_step[s] for s in sorted(by_step)]


def load_run(workdir: str | os.PathLike) -> Run:
    """Reads one workdir; raises FileNotFoundError when it has no results.json (the report stage never ran)."""
    workdir = str(workdir)
    file = _path(workdir) / RESULTS_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{workdir} has no {RESULTS_FILE}: it is not a finished DistillSpec workdir. The report stage writes it "
            f"(python main.py --config=... --workdir={workdir} --config.stages=report, once eval_before has run)")
    res = json.loads(file.read_text())
    if not isinstance(res, dict) or res.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{file}: schema {res.get('schema') if isinstance(res, dict) else None!r}, this reader "
                         f"knows schema {RESULTS_SCHEMA}; update analysis/plots.py or rerun the report stage")
    return Run(workdir=workdir, info=dict(res.get("run") or {}), before=list(res.get("before") or []),
               after=list(res.get("after") or []), training=dict(res.get("training") or {}),
               metrics=read_metrics(workdir), frontier=dict(res.get("frontier") or {}))


def load_runs(workdirs: Sequence[str | os.PathLike]) -> list[Run]:
    """Loads every workdir and gives each run a unique label (two workdirs may share a basename)."""
    if not workdirs:
        raise ValueError("no workdirs given")
    runs = [load_run(w) for w in workdirs]
    labels = [f"{r.name} · {r.divergence} · {r.generator}" for r in runs]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return [dataclasses.replace(r, label=lab) for r, lab in zip(runs, labels)]


# ----------------------------------------------------------------------------------------------
# Helpers shared by the figures
# ----------------------------------------------------------------------------------------------


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def temperatures(runs: Sequence[Run]) -> list[float]:
    return sorted({float(r["temperature"]) for run in runs for s in STAGES for r in run.rows(s)})


def _at(rows: Sequence[dict[str, Any]], temperature: float) -> list[dict[str, Any]]:
    """The rows at one temperature, by γ."""
    return sorted((r for r in rows if float(r["temperature"]) == temperature), key=lambda r: r["gamma"])


def _new_figure(ncols: int, title: str) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, explicitly: no backend lookup, no pyplot state
    fig.suptitle(title)
    return fig, list(fig.subplots(1, max(ncols, 1), squeeze=False)[0])


def _note(ax, text: str, *, center: bool = False) -> None:
    """Grey text inside a panel: what is missing from it."""
    if center:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35", wrap=True)
    else:
        ax.text(0.02, 0.98, text, transform=ax.transAxes, ha="left", va="top", fontsize="x-small", color="0.35")


def _run_handles(runs: Sequence[Run], **style) -> list[Line2D]:
    return [Line2D([], [], color=_color(i), label=run.label, **style) for i, run in enumerate(runs)]


def _legend(fig: Figure, handles: list[Line2D]) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize="small",
                   frameon=False)


def _stage_handles() -> list[Line2D]:
    return [Line2D([], [], color="black", linestyle=LINESTYLE[s], label=f"{s} distillation") for s in STAGES]


def _missing(runs: Sequence[Run], has: Callable[[Run], bool]) -> list[str]:
    return [run.name for run in runs if not has(run)]


def _equal_limits(ax, values: Sequence[float], floor: float | None = None, ceil: float | None = None) -> None:
    """The same range on both axes (so y = x is the panel's diagonal), padded, within [floor, ceil] when given."""
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.02)
    lo, hi = lo - pad, hi + pad
    if floor is not None:
        lo = max(lo, floor - pad)
    if ceil is not None:
        hi = min(hi, ceil + pad)
    ax.plot([lo, hi], [lo, hi], **GUIDE)
    ax.set(xlim=(lo, hi), ylim=(lo, hi))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def tau_vs_gamma(runs: Sequence[Run]) -> Figure:
    """τ against γ, one panel per temperature, one colour per run; dashed before, solid after distillation."""
    temps = temperatures(runs)
    fig, axes = _new_figure(len(temps), "Block efficiency τ against γ")
    if not temps:
        _note(axes[0], "no evaluation rows in any results.json", center=True)
    for ax, t in zip(axes, temps):
        gammas = set()
        for i, run in enumerate(runs):
            for stage in STAGES:
                rows = _at(run.rows(stage), t)
                gammas |= {r["gamma"] for r in rows}
                if rows:
                    ax.plot([r["gamma"] for r in rows], [r["block_efficiency"] for r in rows], color=_color(i),
                            linestyle=LINESTYLE[stage], marker="o", markersize=4)
        if gammas:
            g = sorted(gammas)
            ax.plot(g, [x + 1 for x in g], **GUIDE)  # the ceiling: every draft token accepted
        missing = _missing(runs, lambda r, t=t: bool(_at(r.after, t)))
        if missing:
            _note(ax, "no 'after' for: " + ", ".join(missing))
        ax.set(title=f"temperature {t:g}", xlabel="γ (draft tokens per block)", ylabel="τ (tokens per target call)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, _run_handles(runs) + _stage_handles() + [Line2D([], [], **GUIDE, label="τ = γ + 1")])
    return fig


def per_position_acceptance(runs: Sequence[Run]) -> Figure:
    """a_i (blocks in which draft token i was accepted / blocks) at each run's largest γ, per temperature."""
    temps = temperatures(runs)
    fig, axes = _new_figure(len(temps), "Acceptance per draft position at the largest γ")
    if not temps:
        _note(axes[0], "no evaluation rows in any results.json", center=True)
    for ax, t in zip(axes, temps):
        used = set()
        for i, run in enumerate(runs):
            for stage in STAGES:
                rows = [r for r in _at(run.rows(stage), t) if r.get("per_position_acceptance")]
                if rows:
                    a = rows[-1]["per_position_acceptance"]  # the largest γ
                    used.add(len(a))
                    ax.plot(range(1, len(a) + 1), a, color=_color(i), linestyle=LINESTYLE[stage], marker="o",
                            markersize=4)
        which = f"γ = {used.pop()}" if len(used) == 1 else "largest γ of each run"
        ax.set(title=f"temperature {t:g}, {which}", xlabel="draft position i", ylabel="a_i (accepted / blocks)",
               ylim=(-0.03, 1.03))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, _run_handles(runs) + _stage_handles())
    return fig


# (metrics.jsonl key, panel title); 'acceptance' is 1 − TVD(p, q) on the training batch (design §5)
TRAINING_PANELS = (("loss", "loss"), ("divergence", "divergence"), ("acceptance", "1 − TVD (per-token acceptance)"))


def _training_value(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    if value is None and key == "acceptance" and entry.get("tvd") is not None:
        value = 1.0 - entry["tvd"]
    return None if value is None or not math.isfinite(value) else float(value)


def training_curves(runs: Sequence[Run]) -> Figure:
    """loss, divergence and 1 − TVD against the optimizer step, one line per run (metrics.jsonl)."""
    fig, axes = _new_figure(len(TRAINING_PANELS), "Distillation: training curves")
    missing = _missing(runs, lambda r: bool(r.metrics))
    for ax, (key, title) in zip(axes, TRAINING_PANELS):
        for i, run in enumerate(runs):
            points = [(m["step"], v) for m in run.metrics if (v := _training_value(m, key)) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=_color(i), marker="o" if len(points) <= 30 else None, markersize=3)
        if len(missing) == len(runs):
            _note(ax, f"no {METRICS_FILE} in any workdir", center=True)
        elif missing:
            _note(ax, f"no {METRICS_FILE} for: " + ", ".join(missing))
        ax.set(title=title, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, _run_handles(runs))
    return fig


def _scatter_panel(ax, runs: Sequence[Run], x_key: str, y_key: str, temps: list[float]) -> list[float]:
    """Scatter of y_key against x_key over every row that has both: colour = run, marker = temperature,
    filled = after, hollow = before; each point labelled with its γ. Returns every coordinate drawn."""
    values: list[float] = []
    for i, run in enumerate(runs):
        for stage in STAGES:
            for r in run.rows(stage):
                if r.get(x_key) is None or r.get(y_key) is None:
                    continue
                x, y = float(r[x_key]), float(r[y_key])
                marker = TEMPERATURE_MARKERS[temps.index(float(r["temperature"])) % len(TEMPERATURE_MARKERS)]
                ax.scatter([x], [y], s=36, marker=marker, edgecolors=_color(i), linewidths=1.3,
                           facecolors=_color(i) if FILLED[stage] else "none", zorder=3)
                ax.annotate(f"γ{r['gamma']}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6,
                            color="0.3")
                values += [x, y]
    return values


def _scatter_handles(runs: Sequence[Run], temps: list[float]) -> list[Line2D]:
    marker = dict(linestyle="none", marker="o")
    return (_run_handles(runs, **marker)
            + [Line2D([], [], color="black", markerfacecolor="black" if FILLED[s] else "none",
                      label=f"{s} ({'filled' if FILLED[s] else 'hollow'})", **marker)
               for s in STAGES]
            + [Line2D([], [], color="black", linestyle="none", markerfacecolor="none",
                      marker=TEMPERATURE_MARKERS[j % len(TEMPERATURE_MARKERS)], label=f"T = {t:g}")
               for j, t in enumerate(temps)]
            + [Line2D([], [], **GUIDE, label="y = x")])


def analytic_vs_measured(runs: Sequence[Run]) -> Figure:
    """The one-forward-pass estimates against the decoding loop: α̂ vs α, and τ̂ vs τ."""
    temps = temperatures(runs)
    fig, (ax_alpha, ax_tau) = _new_figure(2, "Analytic estimates against measured speculative decoding")
    alpha = _scatter_panel(ax_alpha, runs, "alpha_hat", "acceptance_rate", temps)
    tau = _scatter_panel(ax_tau, runs, "expected_block_efficiency", "block_efficiency", temps)
    for ax, values, floor, ceil in ((ax_alpha, alpha, 0.0, 1.0), (ax_tau, tau, 1.0, None)):
        if values:
            _equal_limits(ax, values, floor, ceil)
        else:
            _note(ax, "no analytic estimates (config.eval.analytic is off)", center=True)
        missing = _missing(runs, lambda r: any(row.get("alpha_hat") is not None for s in STAGES for row in r.rows(s)))
        if values and missing:
            _note(ax, "no α̂ for: " + ", ".join(missing))
        ax.grid(alpha=0.3)
    ax_alpha.set(title="acceptance rate", xlabel="α̂ = mean of 1 − TVD(p, q)",
                 ylabel="α measured (accepted / proposed)")
    ax_tau.set(title="block efficiency", xlabel="τ̂ = (1 − α̂^(γ+1)) / (1 − α̂)", ylabel="τ measured")
    _legend(fig, _scatter_handles(runs, temps))
    return fig


# (row key, panel title) of the predictions plotted against the measured speedup
SPEEDUP_PANELS = (("predicted_speedup", "predicted τ / (γc + 1)"),
                  ("predicted_speedup_with_verify_cost", "predicted τ / (γc + v), v = measured verify cost"))
# With an MoE target, a third panel (v from the bytes of the experts the verify call's tokens route to), and
# titles short enough for three panels.
MOE_SPEEDUP_PANELS = (("predicted_speedup", "predicted τ / (γc + 1)"),
                      ("predicted_speedup_with_verify_cost", "τ / (γc + v), v measured"),
                      ("predicted_speedup_moe", "τ / (γc + v_moe), expert union"))


def speedup(runs: Sequence[Run]) -> Figure:
    """Predicted against measured wall-clock speedup (target-only time / speculative time); with an MoE target
    also the expert-union prediction."""
    temps = temperatures(runs)
    moe = any(MOE_SPEEDUP_PANELS[-1][0] in r for run in runs for r in run.before + run.after)
    panels = MOE_SPEEDUP_PANELS if moe else SPEEDUP_PANELS
    fig, axes = _new_figure(len(panels), "Speedup of speculative decoding over the target alone")
    for ax, (key, title) in zip(axes, panels):
        values = _scatter_panel(ax, runs, key, "measured_speedup", temps)
        if values:
            _equal_limits(ax, values + [1.0], floor=0.0)
            ax.axhline(1.0, **{**GUIDE, "linestyle": "-", "linewidth": 0.6})
            ax.axvline(1.0, **{**GUIDE, "linestyle": "-", "linewidth": 0.6})
        else:
            _note(ax, "no timings (config.eval.timing_repeats = 0)", center=True)
        ax.set(title=title, xlabel="predicted speedup", ylabel="measured speedup")
        ax.grid(alpha=0.3)
    _legend(fig, _scatter_handles(runs, temps))
    return fig


# (row key, axis label) of the frontier's x axes, and its two quality measures
FRONTIER_X = (("block_efficiency", "τ (tokens per target call)"), ("predicted_speedup", "predicted τ / (γc + 1)"),
              ("measured_speedup", "measured speedup"))
FRONTIER_QUALITY = {"log_likelihood": "target log-likelihood per token (temperature 1)",
                    "law_tvd": "TVD(P_ε, p) per position (closed form)"}


def _frontier_curves(run: Run, stage: str) -> dict[tuple[float, str], list[dict[str, Any]]]:
    """{(temperature, form): rows at the run's largest frontier γ, from ε = 1 (its lossless row first) down}."""
    rows = run.frontier.get(stage) or []
    if not rows:
        return {}
    gamma = max(r["gamma"] for r in rows)
    curves = {}
    for t in sorted({float(r["temperature"]) for r in rows}):
        at = [r for r in rows if r["gamma"] == gamma and float(r["temperature"]) == t]
        lossless = [r for r in at if r["lenience"] == "lossless"]
        for form in sorted({r["lenience"] for r in at} - {"lossless"}):
            mine = sorted((r for r in at if r["lenience"] == form), key=lambda r: -r["epsilon"])
            curves[(t, form)] = lossless + [r for r in mine if r["epsilon"] < 1.0]
    return curves


def lossy_frontier(runs: Sequence[Run], quality: str = "log_likelihood") -> Figure:
    """Quality against τ, predicted and measured speedup, per draft and lenience form (see the module)."""
    forms = sorted({f for run in runs for s in STAGES for (_, f) in _frontier_curves(run, s)})
    gammas = sorted({max(r["gamma"] for r in run.frontier[s]) for run in runs for s in STAGES if run.frontier.get(s)})
    fig, axes = _new_figure(len(FRONTIER_X), "Lossy speculative decoding: quality against speed"
                            + (f" (γ = {gammas[0]})" if len(gammas) == 1 else " (largest γ of each run)"))
    for ax, (x_key, x_label) in zip(axes, FRONTIER_X):
        drawn = False
        for k, run in enumerate(runs):
            for stage in STAGES:
                for (t, form), rows in _frontier_curves(run, stage).items():
                    points = [(r[x_key], r[quality]) for r in rows if r.get(x_key) is not None]
                    if points:
                        drawn = True
                        ax.plot(*zip(*points), color=_color(forms.index(form)), linestyle=LINESTYLE[stage],
                                marker=TEMPERATURE_MARKERS[k % len(TEMPERATURE_MARKERS)], markersize=4,
                                fillstyle="full" if FILLED[stage] else "none")
        if not drawn:
            _note(ax, "no timings (config.eval.timing_repeats = 0)" if x_key != "block_efficiency"
                  else "no lossy frontier in any results.json (config.eval.lenience is off)", center=True)
        if x_key.endswith("speedup") and drawn:
            ax.axvline(1.0, **GUIDE)
        ax.set(title=x_label, xlabel=x_label, ylabel=FRONTIER_QUALITY[quality])
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=_color(i), label=f) for i, f in enumerate(forms)] + _stage_handles()
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", linestyle="", marker=TEMPERATURE_MARKERS[k % len(TEMPERATURE_MARKERS)],
                           label=run.label) for k, run in enumerate(runs)]
    _legend(fig, handles)
    return fig


# The frontier's PNGs, written only when some run has a frontier.
FRONTIER_FIGURES: dict[str, Callable[[Sequence[Run]], Figure]] = {
    "lossy_frontier_loglik.png": lambda runs: lossy_frontier(runs, "log_likelihood"),
    "lossy_frontier_tvd.png": lambda runs: lossy_frontier(runs, "law_tvd"),
}


# The PNGs write_all makes, by file name (the notebook shows them in this order).
FIGURES: dict[str, Callable[[Sequence[Run]], Figure]] = {
    "tau_vs_gamma.png": tau_vs_gamma,
    "per_position_acceptance.png": per_position_acceptance,
    "training_curves.png": training_curves,
    "analytic_vs_measured.png": analytic_vs_measured,
    "speedup.png": speedup,
}


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes of exactly PIXEL_SIZE (its figsize and DPI are fixed; no tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# comparison.md
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _mean_tau(rows: Sequence[dict[str, Any]]) -> float | None:
    return sum(r["block_efficiency"] for r in rows) / len(rows) if rows else None


def _tau_at(rows: Sequence[dict[str, Any]], gamma: int | None) -> float | None:
    return next((r["block_efficiency"] for r in rows if r["gamma"] == gamma), None)


def _before_after(run: Run, t: float, summary: Callable[[list[dict[str, Any]]], float | None]) -> str:
    return f"{_fmt(summary(_at(run.before, t)))} → {_fmt(summary(_at(run.after, t)))}"


def _best_speedup(run: Run) -> str:
    """The best measured speedup after distillation (before, when there is no timed 'after'), with its γ and T."""
    for stage in ("after", "before"):
        timed = [r for r in run.rows(stage) if r.get("measured_speedup") is not None]
        if timed:
            best = max(timed, key=lambda r: r["measured_speedup"])
            where = f"γ={best['gamma']}, T={best['temperature']:g}" + ("" if stage == "after" else ", before")
            return f"{best['measured_speedup']:.2f} ({where})"
    return DASH


def run_notes(run: Run) -> list[str]:
    """What a run lacks, in words (shown under the table)."""
    notes = []
    if not run.before:
        notes.append("no 'before' evaluation")
    if not run.after:
        notes.append("no 'after' evaluation (distillation or eval_after did not finish): only 'before' is shown")
    if not run.metrics:
        notes.append(f"no {METRICS_FILE}: no training curves")
    rows = run.before + run.after
    if rows and not any(r.get("measured_speedup") is not None for r in rows):
        notes.append("no timings (eval.timing_repeats = 0): no measured or predicted speedup")
    if rows and not any(r.get("alpha_hat") is not None for r in rows):
        notes.append("no analytic α̂ / τ̂ (eval.analytic is off)")
    return notes


def comparison_markdown(runs: Sequence[Run]) -> str:
    """One table row per run: divergence, generator, steps, and per temperature the mean τ over γ and τ at the
    largest γ (before → after), then the best measured speedup. Notes and the workdirs follow."""
    temps = temperatures(runs)
    header = ["run", "divergence", "generator", "steps done"]
    for t in temps:
        header += [f"T={t:g}: mean τ over γ (before → after)", f"T={t:g}: τ at largest γ (before → after)"]
    header.append("best measured speedup")
    lines = ["# DistillSpec runs", "",
             "τ is the block efficiency (tokens emitted per target call); `–` marks a missing value.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        steps = run.training.get("steps")  # steps done; the configured number when distillation did not finish
        steps = str(steps) if steps is not None else f"{DASH} (of {run.info.get('steps', '?')})"
        cells = [run.name, run.divergence, run.generator, steps]
        for t in temps:
            gmax = max((r["gamma"] for s in STAGES for r in _at(run.rows(s), t)), default=None)
            cells += [_before_after(run, t, _mean_tau),
                      _before_after(run, t, lambda rows, g=gmax: _tau_at(rows, g))
                      + ("" if gmax is None else f" (γ={gmax})")]
        cells.append(_best_speedup(run))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- **{run.name}**: {note}" for run in runs for note in run_notes(run)]
    if notes:
        lines += ["", "## Missing data", "", *notes]
    lines += ["", "## Workdirs", "", *[f"- **{run.label}**: `{run.workdir}`" for run in runs],
              "", "## Figures", "", *[f"![{name[:-4]}]({name})" for name in FIGURES]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Writing everything, and the CLI
# ----------------------------------------------------------------------------------------------


def write_all(workdirs: list[str], out_dir: str) -> list[str]:
    """Writes every PNG of FIGURES (and FRONTIER_FIGURES when a run has a lossy frontier) and comparison.md for
    the runs in `workdirs` into `out_dir` (local or gs://); returns the written paths. Raises FileNotFoundError for a workdir without results.json."""
    runs = load_runs(workdirs)
    out = _path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {**FIGURES, **(FRONTIER_FIGURES if any(run.frontier for run in runs) else {})}
    for name, make in figures.items():
        (out / name).write_bytes(render_png(make(runs)))
        written.append(str(out / name))
    (out / COMPARISON_FILE).write_text(comparison_markdown(runs))
    written.append(str(out / COMPARISON_FILE))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                        help="run workdirs (local or gs://), each with results.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and comparison.md go")
    args = parser.parse_args(argv)
    try:
        written = write_all(args.workdirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
