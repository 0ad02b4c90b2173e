"""Shared test setup: 8 fake CPU devices, and tiny random HF Qwen3 and Qwen3-MoE checkpoints written once per session."""

import os

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices, so sharded
# runs and single-device runs can be compared in the same process.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests.tiny import TINY_CASES, TINY_MOE_CASES, write_hf_checkpoint, write_hf_moe_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """HF checkpoints (safetensors + config.json) written by transformers' save_pretrained.

    Keys: 'tied_gqa', 'untied_gqa', 'tied_mha', 'untied_mha'. Every weight, norms included, is random,
    so a mix-up of any two tensors changes the logits.
    """
    root = tmp_path_factory.mktemp("hf")
    return {name: write_hf_checkpoint(root / name, seed=i, **kw) for i, (name, kw) in enumerate(TINY_CASES.items())}


@pytest.fixture(scope="session")
def tiny_moe_checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """HF Qwen3-MoE checkpoints written by transformers' save_pretrained (one tensor per expert, as on the
    Hub). Keys: TINY_MOE_CASES. Every weight, router and norms included, is random."""
    root = tmp_path_factory.mktemp("hf_moe")
    return {name: write_hf_moe_checkpoint(root / name, seed=10 + i, **kw)
            for i, (name, kw) in enumerate(TINY_MOE_CASES.items())}


PIPELINE_CONFIG = "configs/jsd.py:test"  # the tiny pipeline at test size (configs/common.py:test)
# The pipeline also draws a lossy frontier of one form at one ε beside its γ sweep, so that every stage's optional
# output is made, resumed and read by the tests that run it.
PIPELINE_LENIENCE = ("--config.eval.lenience=p_over_eps", "--config.eval.epsilons=(0.5,)")
PIPELINE_ARGS = (f"--config={PIPELINE_CONFIG}", *PIPELINE_LENIENCE)
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(workdir, *overrides: str, config: str = PIPELINE_CONFIG, env: dict[str, str] | None = None,
             timeout: int = 600, check: bool = True):
    """Runs `python main.py --config=<config>` (the pipeline's config with PIPELINE_LENIENCE) in a subprocess (its
    own JAX: one CPU device, no fake ones) from the repo root; env (default: this process's, without XLA_FLAGS) is
    the subprocess's whole environment."""
    import subprocess
    import sys

    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    pipeline = PIPELINE_LENIENCE if config == PIPELINE_CONFIG else ()
    proc = subprocess.run([sys.executable, "main.py", f"--config={config}", *pipeline, f"--workdir={workdir}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory) -> pathlib.Path:
    """A workdir produced by the whole `:test` pipeline (prepare ... report, PIPELINE_ARGS), once per session."""
    workdir = tmp_path_factory.mktemp("pipeline") / "jsd_test"
    proc = run_main(workdir)
    (workdir / "stdout.txt").write_text(proc.stdout)
    return workdir


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory) -> dict[tuple[str, str], pathlib.Path]:
    """Every repo the real presets name (Qwen/Qwen3-0.6B ... -32B, openai/gsm8k) in its published layout, with
    the real vocabulary and tiny random weights; {(repo_type, repo_id): folder}. See tests/fake_hub.py."""
    from tests import fake_hub

    return fake_hub.write_all_repos(tmp_path_factory.mktemp("hub_repos"))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, hub_repos) -> pathlib.Path:
    """A HF_HOME holding every repo of `hub_repos`, downloaded from a local stand-in for the Hub by
    huggingface_hub's snapshot_download and datasets' load_dataset themselves: the cache a machine has after
    downloading them (blobs, snapshot symlinks, refs/main, tree listings, the datasets arrow cache)."""
    from tests import fake_hub

    home = tmp_path_factory.mktemp("hf_home")
    with fake_hub.FakeHub(hub_repos) as server:
        fake_hub.populate_cache(home, server.url, list(fake_hub.QWEN3_REPOS))
        assert not server.unhandled(), server.unhandled()
    return home
