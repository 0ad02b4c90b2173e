"""The study driver on a 2 x 2 grid at test size: every cell runs, the aggregation and tables come out, and a
second invocation resumes (skips finished cells) instead of recomputing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from analysis import study
from tests.conftest import REPO

GRID = ["--preset=test", "--divergences=fkl,tvd", "--generators=fixed,draft", "--seeds=0", "--no_supervised",
        "--no_transfer"]


def _study(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "analysis.study", f"--out={out}", *GRID, *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_study_grid_runs_aggregates_and_resumes(tmp_path):
    out = tmp_path / "study"
    _study(out)
    cells = sorted(os.listdir(out / "cells"))
    assert cells == ["fkl-draft-s0", "fkl-fixed-s0", "tvd-draft-s0", "tvd-fixed-s0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 4
    # One entry per cell, temperature and γ of the :test preset (γ in {1, 3}, T in {0, 1}).
    assert len(summary["table"]) == 4 * 2 * 2
    for entry in summary["table"]:
        mean, low, high = entry["tau_after"]
        assert low <= mean <= high and 1.0 <= mean <= entry["gamma"] + 1
    tables = (out / "tables.md").read_text()
    assert sum(line.startswith("| fkl |") for line in tables.splitlines()) == 4 and "Temperature 1, γ = 3" in tables
    assert "### Best divergence" in tables and "### Does 1 − TVD track acceptance?" in tables
    assert sorted(summary["correlations"]) == ["0.0", "1.0"]
    assert all(c["cells"] == 4 and c["drafts"] == 4 + 1 for c in summary["correlations"].values())
    assert (out / "study_tau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _study(out)
    assert again.count("done earlier, skipped") == 4


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0, 2.0, 4.0]
    mean, low, high = study.bootstrap_ci(values)
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= low < mean < high <= max(values)
    assert study.bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    assert study.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def _row(temperature, gamma, tau, alpha):
    return {"temperature": temperature, "gamma": gamma, "block_efficiency": tau, "alpha_hat": alpha,
            "expected_block_efficiency": (1 - alpha ** (gamma + 1)) / (1 - alpha)}


def _cell(seed, before_alpha, after_alpha, gammas=(1, 3)):
    # τ set to its closed form, so every correlation with α̂ or τ̂ is exactly known.
    def rows(alpha):
        return [_row(1.0, g, (1 - alpha ** (g + 1)) / (1 - alpha), alpha) for g in gammas]
    return {"run": {"seed": seed}, "before": rows(before_alpha), "after": rows(after_alpha)}


def test_correlations_count_each_seeds_undistilled_draft_once():
    cells = {"fkl-draft-s0": _cell(0, 0.3, 0.5), "tvd-draft-s0": _cell(0, 0.3, 0.6),
             "fkl-draft-s1": _cell(1, 0.35, 0.7)}
    c = study.correlations(cells, 1.0, 3)
    assert c["drafts"] == 2 + 3 and c["cells"] == 3 and c["tau_hat_points"] == 5 * 2
    assert c["tau_hat_vs_tau"] == pytest.approx(1.0)
    assert c["alpha_hat_vs_tau_rank"] == pytest.approx(1.0)  # τ is increasing in α at fixed γ
    assert 0.95 < c["alpha_hat_vs_tau"] < 1.0  # increasing but not linear
    assert c["delta_alpha_hat_vs_delta_tau"] > 0.9


def test_ranks_share_ties():
    np.testing.assert_allclose(study._ranks([2.0, 1.0, 1.0, 3.0]), [2.0, 0.5, 0.5, 3.0])


def test_paired_difference_pairs_by_seed():
    table = [{"divergence": d, "generator": "draft", "temperature": 1.0, "gamma": 3, "seed_ids": [2, 0, 1],
              "tau_after_per_seed": taus} for d, taus in (("fkl", [2.2, 2.0, 2.1]), ("jsd", [2.3, 1.9, 2.0]))]
    c = study.paired_difference(table, ("fkl", "draft"), ("jsd", "draft"), 1.0, 3)
    assert c["seeds"] == 3 and c["difference"][0] == pytest.approx((0.1 + 0.1 - 0.1) / 3)
    assert not c["a_wins_every_seed"]
    assert study.paired_difference(table, ("fkl", "draft"), ("tvd", "draft"), 1.0, 3) is None


def test_contrast_tables_skip_pairs_without_a_common_seed():
    # A half-finished grid: FKL has seed 0 only, JSD seed 1 only, TVD both; the best-vs-runner-up row needs a
    # seed in common, so only TVD (the best) against JSD may appear.
    def entry(divergence, seeds, taus):
        return {"divergence": divergence, "generator": "draft", "temperature": 1.0, "gamma": 3,
                "seed_ids": seeds, "tau_after_per_seed": taus, "tau_after": [float(np.mean(taus)), 0.0, 0.0]}
    table = [entry("jsd", [1], [2.5]), entry("fkl", [0], [2.2])]
    lines = study._contrast_tables(table, 3)
    assert not any(line.startswith("| 1 | draft |") for line in lines)
    table.append(entry("tvd", [0, 1], [2.6, 2.8]))
    assert any(line.startswith("| 1 | draft | tvd | jsd |") for line in study._contrast_tables(table, 3))


def test_plan_lists_every_run_with_its_estimated_chip_hours():
    p = study.plan("0.6b-8b", "v5p-8", study.DIVERGENCES, study.GENERATORS, study.SEEDS, supervised=True,
                   steps=None, transfer=True)
    names = [r["name"] for r in p["cells"]]
    per_seed = 1 + len(study.DIVERGENCES) * len(study.GENERATORS) + 1 + 1  # base, grid, ce-fixed, transfer
    assert len(names) == len(study.SEEDS) * per_seed and len(set(names)) == len(names)
    assert p["chips"] == 4 and p["device_kind"] == "TPU v5"
    cells = {r["name"]: r for r in p["cells"]}
    # On-policy data costs a draft generation per step; AdaSPEC adds its reference run.
    assert cells["jsd-draft-s0"]["seconds"] > cells["jsd-fixed-s0"]["seconds"] > 0
    assert cells["adaspec-fixed-s0"]["seconds"] > cells["fkl-fixed-s0"]["seconds"]
    assert all(abs(r["chip_hours"] - r["seconds"] * 4 / 3600) < 1e-9 for r in p["cells"])
    assert abs(p["total_chip_hours"] - sum(r["chip_hours"] for r in p["cells"])) < 1e-6
    # On 16 GiB v5e chips the 8B teacher cannot be replicated: the plan uses the estimate's fsdp mesh.
    v5e = study.plan("0.6b-8b", "v5e-16", ["jsd"], ["fixed"], [0], supervised=False, steps=None, transfer=False)
    assert all(r["mesh"]["fsdp"] > 1 for r in v5e["cells"])
    assert "chip-hours" in study.format_plan(p) and "estimate" in study.format_plan(p)
