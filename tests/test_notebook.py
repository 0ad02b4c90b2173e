"""analysis/distillspec_analysis.ipynb: committed without outputs, and it runs headless (nbclient, the current
interpreter's `python3` kernel from ipykernel) against the `:test` pipeline's workdir, showing every plot and
the comparison table of that run."""

import base64
import io
import pathlib

import matplotlib.image as mimage
import nbformat

from analysis import plots

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "distillspec_analysis.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} carries outputs"
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_executes_headless_on_pipeline_workdir(pipeline_workdir, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DISTILLSPEC_WORKDIRS", str(pipeline_workdir))  # the kernel inherits the environment
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (with the cell and traceback) if any cell fails.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"({pipeline_workdir})" in text, "the notebook did not read the workdir given by DISTILLSPEC_WORKDIRS"
    images = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(plots.FIGURES)
    width, height = plots.PIXEL_SIZE
    for png in images:
        img = mimage.imread(io.BytesIO(base64.b64decode(png)), format="png")
        assert img.shape[:2] == (height, width) and img[..., :3].var() > 0
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 1 and f"| {pipeline_workdir.name} |" in tables[0]


def test_install_cell_is_guarded():
    """The Colab install cell pip-installs only when analysis.plots is not importable (never in this test run)."""
    [source] = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if "REPO_URL =" in c.source]
    assert "pip" in source and "git+" in source
    guard = source.index("from analysis import plots")
    assert source.index("except ImportError") > guard and source.index("pip") > source.index("except ImportError")
