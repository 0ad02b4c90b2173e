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
    assert tables.count("| fkl |") == 4 and "Temperature 1, γ = 3" in tables
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
