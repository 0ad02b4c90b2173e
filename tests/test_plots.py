"""analysis/plots.py on workdirs made by the real `:test` pipeline: every PNG is written, decodes, has the promised
pixel size and shows the runs' data; comparison.md has one row per run with the right numbers; missing pieces
are reported, a workdir without results.json is a clear error; the CLI and the W&B download helper work."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest

from analysis import plots, wandb_files

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_NAMES = ("tau_vs_gamma.png", "per_position_acceptance.png", "training_curves.png", "analytic_vs_measured.png",
             "speedup.png")
FRONTIER_NAMES = ("lossy_frontier_loglik.png", "lossy_frontier_tvd.png")
# A run's colour must cover well over the pixels of its legend handle alone (50-61 px at PIXEL_SIZE; a single
# run's data adds 600-2300, and overlapping runs hide some of each other's points): its data is drawn.
MIN_DATA_PIXELS = 150


def _copy_run(src: pathlib.Path, dst: pathlib.Path, *, name: str, divergence: str, scale: float,
              after: bool = True, metrics: bool = True) -> pathlib.Path:
    """A second workdir from the pipeline's: renamed, another divergence, τ, α and the training metrics scaled;
    optionally without 'after' (distillation unfinished) or metrics.jsonl."""
    dst.mkdir(parents=True)
    res = json.loads((src / "results.json").read_text())
    res["run"].update(name=name, divergence=divergence)
    for row in res["before"] + res["after"]:
        row["block_efficiency"] = min(row["gamma"] + 1.0, 1.0 + (row["block_efficiency"] - 1.0) * scale)
        row["acceptance_rate"] = min(1.0, row["acceptance_rate"] * scale)
        row["per_position_acceptance"] = [min(1.0, a * scale) for a in row["per_position_acceptance"]]
        if "measured_speedup" in row:
            row["measured_speedup"] *= scale
    if not after:
        res["after"], res["training"] = [], {}
    (dst / "results.json").write_text(json.dumps(res))
    if metrics:  # scaled too, so its training curves do not hide the original's
        lines = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()]
        for m in lines:
            m.update(loss=m["loss"] / scale, divergence=m["divergence"] / scale,
                     acceptance=min(1.0, m["acceptance"] * scale))
        (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return dst


@pytest.fixture(scope="module")
def second_workdir(pipeline_workdir, tmp_path_factory) -> pathlib.Path:
    return _copy_run(pipeline_workdir, tmp_path_factory.mktemp("runs") / "fkl_copy", name="fkl_copy",
                     divergence="fkl", scale=1.3)


def _image(path) -> np.ndarray:
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return mimage.imread(io.BytesIO(data), format="png")


def _pixels_of(img: np.ndarray, color: str) -> int:
    rgb = np.array(mcolors.to_rgb(color))
    return int((np.abs(img[..., :3] - rgb).max(axis=-1) < 0.08).sum())


def _assert_valid_png(path) -> np.ndarray:
    img = _image(path)
    width, height = plots.PIXEL_SIZE
    assert img.shape[:2] == (height, width), f"{path}: {img.shape[1]}x{img.shape[0]} px, expected {width}x{height}"
    assert img[..., :3].var() > 0, f"{path} is blank"
    return img


def _table_rows(md: str) -> list[list[str]]:
    """The data rows of comparison.md's table (header and separator dropped), as stripped cells."""
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows]


def test_pixel_size_follows_figsize_and_dpi():
    assert plots.PIXEL_SIZE == (round(plots.FIGSIZE_IN[0] * plots.DPI), round(plots.FIGSIZE_IN[1] * plots.DPI))
    assert set(plots.FIGURES) == set(PNG_NAMES)


def test_write_all_on_pipeline_workdir_writes_every_png(pipeline_workdir, tmp_path):
    """The pipeline's run has a lossy frontier (conftest.PIPELINE_LENIENCE), so its two figures are drawn too."""
    out = tmp_path / "plots"
    written = plots.write_all([str(pipeline_workdir)], str(out))
    assert sorted(os.path.basename(p) for p in written) == sorted(PNG_NAMES + FRONTIER_NAMES + (plots.COMPARISON_FILE,))
    assert all(pathlib.Path(p).is_file() for p in written)
    for name in PNG_NAMES + FRONTIER_NAMES:
        img = _assert_valid_png(out / name)
        assert _pixels_of(img, plots.COLORS[0]) > MIN_DATA_PIXELS, f"{name} does not draw the run's data"
    rows = _table_rows((out / plots.COMPARISON_FILE).read_text())
    assert [r[0] for r in rows] == [pipeline_workdir.name]


def test_report_stage_wrote_plots_into_the_workdir(pipeline_workdir):
    """main.py calls plots.write_all([workdir], workdir/plots) after the run (the library draws nothing)."""
    for name in PNG_NAMES:
        _assert_valid_png(pipeline_workdir / "plots" / name)
    assert (pipeline_workdir / "plots" / plots.COMPARISON_FILE).is_file()


def test_write_all_two_runs_one_row_and_one_colour_each(pipeline_workdir, second_workdir, tmp_path):
    out = tmp_path / "plots"
    plots.write_all([str(pipeline_workdir), str(second_workdir)], str(out))
    for name in PNG_NAMES:
        img = _assert_valid_png(out / name)
        for i in range(2):
            assert _pixels_of(img, plots.COLORS[i]) > MIN_DATA_PIXELS, f"{name} does not draw run {i}"
    md = (out / plots.COMPARISON_FILE).read_text()
    rows = _table_rows(md)
    assert [r[:2] for r in rows] == [[pipeline_workdir.name, "JSD[β=0.5]"], ["fkl_copy", "FKL"]]
    assert "Missing data" not in md


def test_comparison_numbers_match_results_json(pipeline_workdir, second_workdir):
    """Mean τ over γ and τ at the largest γ, before → after, per temperature, in the table's column order."""
    runs = plots.load_runs([str(pipeline_workdir), str(second_workdir)])
    rows = _table_rows(plots.comparison_markdown(runs))
    for run, cells in zip(runs, rows):
        temps = sorted({r["temperature"] for r in run.before})
        expected = []
        for t in temps:
            tau = {s: {r["gamma"]: r["block_efficiency"] for r in run.rows(s) if r["temperature"] == t} for s in
                   plots.STAGES}
            gmax = max(tau["before"])
            expected += [f"{np.mean(list(tau['before'].values())):.2f} → {np.mean(list(tau['after'].values())):.2f}",
                         f"{tau['before'][gmax]:.2f} → {tau['after'][gmax]:.2f} (γ={gmax})"]
        assert cells[4:4 + 2 * len(temps)] == expected
        best = max(r["measured_speedup"] for r in run.after)
        assert cells[-1].startswith(f"{best:.2f} (")


def test_run_without_after_or_metrics_is_plotted_and_noted(pipeline_workdir, tmp_path):
    partial = _copy_run(pipeline_workdir, tmp_path / "rkl_partial", name="rkl_partial", divergence="rkl",
                        scale=0.8, after=False, metrics=False)
    out = tmp_path / "plots"
    plots.write_all([str(pipeline_workdir), str(partial)], str(out))
    for name in PNG_NAMES:
        _assert_valid_png(out / name)
    tau = _image(out / "tau_vs_gamma.png")
    assert _pixels_of(tau, plots.COLORS[1]) > MIN_DATA_PIXELS  # its 'before' lines are drawn
    md = (out / plots.COMPARISON_FILE).read_text()
    assert [r[0] for r in _table_rows(md)] == [pipeline_workdir.name, "rkl_partial"]
    assert "→ –" in _table_rows(md)[1][4]
    assert "**rkl_partial**: no 'after' evaluation" in md
    assert "**rkl_partial**: no metrics.jsonl" in md
    assert f"**{pipeline_workdir.name}**:" not in md.split("## Missing data")[1].split("## Workdirs")[0]


def test_only_before_for_every_run(pipeline_workdir, tmp_path):
    partial = _copy_run(pipeline_workdir, tmp_path / "only_before", name="only_before", divergence="tvd",
                        scale=1.0, after=False, metrics=False)
    written = plots.write_all([str(partial)], str(tmp_path / "plots"))
    for path in written[:-1]:
        _assert_valid_png(path)


def test_workdir_without_results_json_is_a_clear_error(pipeline_workdir, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not_a_run has no results\.json"):
        plots.write_all([str(pipeline_workdir), str(empty)], str(tmp_path / "plots"))
    assert not (tmp_path / "plots").exists()  # nothing half-written


def test_unknown_schema_is_an_error(pipeline_workdir, tmp_path):
    other = _copy_run(pipeline_workdir, tmp_path / "future", name="future", divergence="fkl", scale=1.0)
    res = json.loads((other / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**res, "schema": 99}))
    with pytest.raises(ValueError, match="schema 99"):
        plots.load_run(str(other))


def test_duplicate_run_names_get_unique_labels(pipeline_workdir, tmp_path):
    twin = _copy_run(pipeline_workdir, tmp_path / "twin", name=pipeline_workdir.name, divergence="jsd", scale=1.0)
    labels = [r.label for r in plots.load_runs([str(pipeline_workdir), str(twin)])]
    assert len(set(labels)) == 2


def test_metrics_keep_the_last_line_of_a_repeated_step(tmp_path):
    lines = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo')
    assert [(m["step"], m["loss"]) for m in plots.read_metrics(tmp_path)] == [(1, 5.0), (2, 4.0)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "analysis.plots", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_everything(pipeline_workdir, second_workdir, tmp_path):
    out = tmp_path / "cli_out"
    proc = _cli(str(pipeline_workdir), str(second_workdir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / n) for n in (*PNG_NAMES, *FRONTIER_NAMES, plots.COMPARISON_FILE)]
    for name in PNG_NAMES:
        _assert_valid_png(out / name)
    assert len(_table_rows((out / plots.COMPARISON_FILE).read_text())) == 2


def test_cli_without_results_json_fails_clearly(tmp_path):
    proc = _cli(str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert f"{tmp_path} has no results.json" in proc.stderr
    assert "Traceback" not in proc.stderr


class _FakeFile:
    def __init__(self, name: str, source: pathlib.Path):
        self.name, self.source = name, source

    def download(self, root: str, replace: bool = False):
        shutil.copy(self.source / self.name, os.path.join(root, self.name))


class _FakeApi:
    """wandb.Api() stand-in: the run's files are those of a local folder; a missing one raises like the API does."""

    def __init__(self, source: pathlib.Path):
        self.source, self.paths = source, []

    def run(self, path: str):
        self.paths.append(path)
        api = self

        class Run:
            def file(self, name):
                if not (api.source / name).exists():
                    raise IndexError("list index out of range")
                return _FakeFile(name, api.source)

        return Run()


def test_wandb_download_gives_a_readable_workdir(pipeline_workdir, tmp_path):
    api = _FakeApi(pipeline_workdir)
    local = wandb_files.download_run("ent/proj/abc123", tmp_path, api=api)
    assert api.paths == ["ent/proj/abc123"]
    assert sorted(os.listdir(local)) == ["config.json", "metrics.jsonl", "results.json"]
    run = plots.load_run(local)
    assert run.name == pipeline_workdir.name and run.metrics


def test_wandb_download_without_results_json_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="ent/proj/abc123 has no results.json"):
        wandb_files.download_run("ent/proj/abc123", tmp_path / "dst", api=_FakeApi(tmp_path / "src"))
    with pytest.raises(ValueError, match="entity/project/run_id"):
        wandb_files.download_run("abc123", tmp_path / "dst", api=_FakeApi(tmp_path / "src"))


def test_frontier_curves_start_lossless_and_follow_epsilon_down(pipeline_workdir, tmp_path):
    """Each (draft, form) curve is the lossless row, then the form's rows by falling ε; a run without a frontier
    gets no frontier figure."""
    run = plots.load_run(pipeline_workdir)
    for stage in plots.STAGES:
        curves = plots._frontier_curves(run, stage)
        assert set(curves) == {(1.0, "p_over_eps")}  # the pipeline's one sampled temperature and one form
        rows = curves[(1.0, "p_over_eps")]
        assert [(r["lenience"], r["epsilon"]) for r in rows] == [("lossless", 1.0), ("p_over_eps", 0.5)]
        assert rows[1]["block_efficiency"] >= rows[0]["block_efficiency"] and rows[1]["law_tvd"] > 0
    bare = _copy_run(pipeline_workdir, tmp_path / "bare", name="bare", divergence="jsd", scale=1.0)
    res = json.loads((bare / "results.json").read_text())
    del res["frontier"]
    (bare / "results.json").write_text(json.dumps(res))
    written = plots.write_all([str(bare)], str(tmp_path / "plots"))
    assert not any("frontier" in os.path.basename(p) for p in written)


def test_an_moe_run_gets_the_expert_union_speedup_panel(pipeline_workdir, tmp_path):
    """A run whose rows carry the MoE prediction adds the third speedup panel, with its points drawn."""
    moe = _copy_run(pipeline_workdir, tmp_path / "moe", name="moe", divergence="jsd", scale=1.0)
    res = json.loads((moe / "results.json").read_text())
    for row in res["before"] + res["after"]:
        if "predicted_speedup" in row:
            row["predicted_speedup_moe"] = 0.8 * row["predicted_speedup"]
    (moe / "results.json").write_text(json.dumps(res))
    dense_axes = plots.speedup(plots.load_runs([pipeline_workdir])).axes
    moe_axes = plots.speedup(plots.load_runs([moe])).axes
    assert len(moe_axes) == len(dense_axes) + 1
    assert "v_moe" in moe_axes[len(dense_axes)].get_title()
    assert moe_axes[-1].collections  # the scatter points of the MoE prediction
