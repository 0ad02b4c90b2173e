"""analysis/domain_study.py's aggregation on a constructed study folder: contrasts are paired by seed, the gain
share is taken over the domain's undistilled draft, the data-scaling slope is τ per doubling of N, the serving
log becomes τ against requests served, and a half-finished folder aggregates what it has."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis import domain_study as ds

SEEDS = (0, 1, 2)
TEMPERATURES = (0.0, 1.0)
GAMMAS = (1, 7)


def _rows(tau: float) -> list[dict]:
    return [{"temperature": t, "gamma": g, "block_efficiency": tau + t + 0.01 * g} for t in TEMPERATURES for g in GAMMAS]


def _tau_of(name: str, seed: int) -> float:
    """Each evaluation's τ at temperature 0, γ = 0 (rows add t + 0.01 γ): distinct per cell and seed."""
    base = {"humaneval-undistilled": 1.0, "docstrings-undistilled": 1.1, "humaneval-online": 2.0,
            "humaneval-offline": 1.8, "humaneval-serving": 1.5, "humaneval-blackbox": 1.6,
            "humaneval-synthetic": 1.7, "humaneval-offline-n37": 1.6, "humaneval-offline-n74": 1.7,
            "docstrings-offline": 2.2, "docstrings-offline-n37": 2.0, "docstrings-offline-n74": 2.1,
            "humaneval-offline-on-docstrings": 1.3, "docstrings-offline-on-humaneval": 1.9}[name]
    return base + 0.05 * seed


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def study_dir(tmp_path):
    for seed in SEEDS:
        for domain in ds.DOMAINS:
            _write(tmp_path / f"base-{domain}-s{seed}" / "eval_before.json", _rows(_tau_of(f"{domain}-undistilled", seed)))
        for cell in ds.cells():
            _write(tmp_path / "cells" / f"{cell.name}-s{seed}" / "results.json",
                   {"after": _rows(_tau_of(cell.name, seed)), "before": []})
        for a, b in (("humaneval", "docstrings"), ("docstrings", "humaneval")):
            _write(tmp_path / "cross" / f"{a}-offline-on-{b}-s{seed}.json",
                   {"after": _rows(_tau_of(f"{a}-offline-on-{b}", seed))})
        log = [{"update": u, "requests_served": 64 * (u + 1), "block_efficiency": 1.5 + 0.1 * u + 0.01 * seed,
                "serve_s": 6.4, "train_s_previous_update": None if u == 0 else 3.2} for u in range(3)]
        (tmp_path / "cells" / f"humaneval-serving-s{seed}" / "serving.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in log))
    return tmp_path


def _mean_of(name, t=1.0, g=7):
    return float(np.mean([_tau_of(name, s) + t + 0.01 * g for s in SEEDS]))


def test_contrasts_are_paired_by_seed_with_the_gain_share(study_dir):
    summary = ds.aggregate(str(study_dir), SEEDS)
    assert summary["gamma"] == 7
    offline_vs_serving = next(c for c in summary["offline_vs_online"] if c["a"] == "humaneval-offline"
                              and c["b"] == "humaneval-serving" and c["temperature"] == 1.0)
    relative = np.mean([(_tau_of("humaneval-offline", s) + 1.07) / (_tau_of("humaneval-serving", s) + 1.07) - 1
                        for s in SEEDS])
    assert math.isclose(offline_vs_serving["relative"][0], relative, rel_tol=1e-9)
    assert math.isclose(offline_vs_serving["difference"][0], 0.3, rel_tol=1e-9)
    assert offline_vs_serving["a_wins_every_seed"] and offline_vs_serving["seeds"] == 3
    synthetic = next(c for c in summary["synthetic_vs_real"] if c["temperature"] == 0.0)
    # (τ_syn − τ_0) / (τ_real − τ_0) = (1.7 − 1.0) / (1.8 − 1.0) at every seed
    assert math.isclose(synthetic["gain_share"][0], 0.7 / 0.8, rel_tol=1e-9)
    assert math.isclose(summary["evaluations"]["humaneval-online"]["1"][0], _mean_of("humaneval-online"))
    shift = next(c for c in summary["domain_shift"] if c["a"] == "docstrings-offline" and c["temperature"] == 1.0)
    assert shift["b"] == "humaneval-offline-on-docstrings" and math.isclose(shift["difference"][0], 0.9)


def test_data_scaling_slope_is_tau_per_doubling(study_dir):
    summary = ds.aggregate(str(study_dir), SEEDS)
    humaneval = next(s for s in summary["data_scaling"] if s["domain"] == "humaneval" and s["temperature"] == 0.0)
    sizes = np.log2([37, 74, 148])
    expected = np.polyfit(sizes, [1.6, 1.7, 1.8], 1)[0]  # the seed offset cancels in the slope
    assert math.isclose(humaneval["slope_per_doubling"][0], expected, rel_tol=1e-9)
    assert humaneval["monotone_every_seed"] and humaneval["sizes"] == [37, 74, 148]


def test_serving_log_gives_tau_against_requests_and_the_cost_per_request(study_dir):
    serving = ds.aggregate(str(study_dir), SEEDS)["serving"]
    assert serving["requests_served"] == [64, 128, 192]
    assert [round(t[0], 6) for t in serving["tau"]] == [1.51, 1.61, 1.71]
    assert math.isclose(serving["serve_s_per_request"], 6.4 / 64) and math.isclose(serving["update_s_per_request"],
                                                                                   3.2 / 64)
    assert "Learning while serving" in ds.format_tables(ds.aggregate(str(study_dir), SEEDS))


def test_a_half_finished_study_aggregates_what_it_has(study_dir):
    import shutil

    shutil.rmtree(study_dir / "cells" / "humaneval-serving-s2")
    shutil.rmtree(study_dir / "cells" / "docstrings-offline-n37-s1")
    summary = ds.aggregate(str(study_dir), SEEDS)
    pair = next(c for c in summary["offline_vs_online"] if c["b"] == "humaneval-serving")
    assert pair["seeds"] == 2
    docstrings = next(s for s in summary["data_scaling"] if s["domain"] == "docstrings")
    assert docstrings["seeds"] == 2
    shutil.rmtree(study_dir / "cells")
    with pytest.raises(FileNotFoundError, match="no finished cells"):
        ds.aggregate(str(study_dir), SEEDS)


def test_plan_at_a_real_pair_prices_each_regime():
    """--plan: every run of the grid at 0.6B -> 8B on v5p-8, from the pre-flight's roofline. A stored or served
    teacher takes no target forward in the step; serving pays for the requests it decodes."""
    p = ds.plan("0.6b-8b", "v5p-8", (0,), steps=None)
    names = [r["name"] for r in p["cells"]]
    assert names[:2] == ["base-humaneval-s0", "base-docstrings-s0"] and len(names) == 2 + len(ds.cells()) + 2
    by = {r["name"]: r for r in p["cells"]}
    online, offline, serving = (by[f"humaneval-{x}-s0"] for x in ("online", "offline", "serving"))
    assert offline["distill_step_s"] < online["distill_step_s"] and serving["distill_step_s"] == offline["distill_step_s"]
    assert serving["seconds"] > offline["seconds"] and p["total_chip_hours"] > 0
    assert "estimates" in p["label"]
