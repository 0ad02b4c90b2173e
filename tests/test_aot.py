"""The pre-flight (distillspec_jax.aot): slice names map to libtpu topologies and unknown ones are refused with
the known names; a missing or mismatched libtpu is refused with the install command; the cheap estimate's
per-chip bytes equal the parameters' and optimizer's bytes over their shards, computed here from the shapes;
an 8B bfloat16 teacher replicated on 16 GiB v5e chips is refused with fsdp named. With libtpu installed, the
ahead-of-time compile for v5e:2x2 reports per-chip argument bytes that agree with the same hand count, and a
config made not to fit is refused, on the CLI too, with the mesh that fits."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from configs import jsd
from distillspec_jax import aot, tpu_topology
from distillspec_jax.models import convert, qwen3

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: compiling for a TPU topology needs it (pip install -r requirements-tpu.txt)")

# Small models whose every dimension is a multiple of TPU tiles (8 x 128), so XLA's TPU layouts add no padding
# and per-chip bytes can be counted from the shapes. MHA with 8 heads of 128: q, k, v, o are [256, 8, 128].
TARGET = qwen3.Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
DRAFT = dataclasses.replace(TARGET, num_hidden_layers=1, tie_word_embeddings=True)


def _model_dir(root: pathlib.Path, name: str, cfg: qwen3.Qwen3Config) -> str:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(convert.to_hf_config(cfg)))
    return str(folder)


def small_config(tmp_path: pathlib.Path, data: int, fsdp: int):
    """The :test pipeline with the tile-sized models above (float32 target, float32 master draft)."""
    c = jsd.get_config("test")
    c.target.model, c.draft.model = _model_dir(tmp_path, "target", TARGET), _model_dir(tmp_path, "draft", DRAFT)
    c.tokenizer = ""
    c.mesh.update(data=data, fsdp=fsdp, tensor=1)
    c.distill.batch_size = 8
    c.data.update(max_prompt_len=64, pad_multiple=64, max_response_len=64)
    c.generator.max_new_tokens = 64  # training sequences of 128 positions
    return c


def hand_count_bytes(cfg: qwen3.Qwen3Config, fsdp: int, bytes_per_value: int) -> int:
    """Per-chip bytes of a model's parameters from its shapes: every matrix has a model dimension D split over
    fsdp (sharding.LOGICAL_RULES: 'embed' -> fsdp); norm scales are replicated."""
    d, f, n, k, h, v, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers)
    matrices = layers * (d * n * h * 2 + d * k * h * 2 + 3 * d * f) + v * d * (1 if cfg.tie_word_embeddings else 2)
    norms = layers * (2 * d + 2 * h) + d
    return (matrices // fsdp + norms) * bytes_per_value


def test_slice_names_map_to_libtpu_topologies():
    # v4 and v5p names count TensorCores (v5p-8 = 4 chips); v5e and v6e names count chips.
    assert tpu_topology.topology("v5p-8") == tpu_topology.Topology("v5p-8", "v5p:2x2x1", None, "megacore")
    assert tpu_topology.topology("v4-8").topology_name == "v4:2x2x1"
    assert tpu_topology.topology("v5p-32").topology_name == "v5p:2x2x4"
    assert tpu_topology.topology("v5e-16").topology_name == "v5e:4x4"
    assert tpu_topology.topology("v5litepod-16") == tpu_topology.topology("v5e-16")
    assert tpu_topology.topology("v6e-8") == tpu_topology.Topology("v6e-8", "v6e:2x4", (2, 4, 1), None)  # one host of 8 chips
    assert tpu_topology.topology("v5e:2x2").topology_name == "v5e:2x2"  # raw topologies pass through


def test_unknown_topology_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v9-8'.*v5p-8.*v5e-16"):
        tpu_topology.topology("v9-8")


def test_missing_or_mismatched_libtpu_names_the_install_command(monkeypatch):
    real_version = importlib.metadata.version

    def version(name, answer):
        if name != "libtpu":
            return real_version(name)
        if answer is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return answer

    install = f'pip install -r requirements-tpu.txt   (or: pip install "jax[tpu]=={jax.__version__}")'
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, None))
    with pytest.raises(RuntimeError, match="libtpu is not installed") as missing:
        tpu_topology.check_libtpu()
    assert install in str(missing.value)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, "0.0.1"))
    with pytest.raises(RuntimeError, match=r"libtpu 0\.0\.1 is installed, but jax .* pins libtpu") as wrong:
        tpu_topology.check_libtpu()
    assert install in str(wrong.value)


def test_estimate_bytes_are_parameters_and_optimizer_over_their_shards(tmp_path):
    est = aot.estimate_fit(small_config(tmp_path, data=1, fsdp=4), "TPU v5 lite", 4)
    distill = est.phase_bytes["distill"]
    assert distill["target"] == hand_count_bytes(TARGET, 4, 4)
    assert distill["draft"] == hand_count_bytes(DRAFT, 4, 4)
    # Adam's two moments, shaped and sharded like the parameters, plus two int32 step counts (Adam's and
    # the learning-rate schedule's).
    assert distill["opt_state"] == 2 * hand_count_bytes(DRAFT, 4, 4) + 2 * 4
    assert est.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and est.fits


def test_8b_bfloat16_teacher_replicated_on_v5e_is_refused_with_fsdp_named():
    c = jsd.get_config("")  # Qwen3-0.6B draft, Qwen3-8B bfloat16 target, mesh data=-1 (replicated weights)
    with pytest.raises(aot.DoesNotFitError, match=r"mesh that fits: --config\.mesh\.data=8 --config\.mesh\.fsdp=2"):
        aot.check_fits(c, device_kind="TPU v5 lite", num_devices=16)
    c.mesh.update(data=8, fsdp=2)
    assert aot.check_fits(c, device_kind="TPU v5 lite", num_devices=16).fits
    assert aot.check_fits(jsd.get_config(""), device_kind="NVIDIA H100 80GB HBM3", num_devices=1).fits


def test_check_fits_skips_what_it_cannot_size():
    # For experiment.run on every run: CPU devices have no fixed HBM, and a hub id outside the presets has no
    # shape offline; neither may stop a run, so both are passed over (None), not refused.
    assert aot.check_fits(jsd.get_config("test"), jax.devices()) is None
    c = jsd.get_config("")
    c.target.model = "someone/qwen3-custom"
    with pytest.raises(aot.UnknownShapeError, match="no shape is known offline"):
        aot.model_config(c, "target")
    assert aot.check_fits(c, device_kind="TPU v5 lite", num_devices=16) is None


@needs_libtpu
def test_compiled_argument_bytes_match_parameters_and_optimizer_over_shards(tmp_path):
    c = small_config(tmp_path, data=2, fsdp=2)
    result = aot.preflight(c, "v5e:2x2", only=["distill_step"])
    step = next(p for p in result["programs"] if p["name"] == "distill_step")
    state = 3 * hand_count_bytes(DRAFT, 2, 4)  # float32 parameters and Adam's two moments
    batch = 8 // 4 * 128 * (4 + 4)  # this chip's rows of tokens (int32) and loss_mask (float32)
    expected = hand_count_bytes(TARGET, 2, 4) + state + batch
    assert abs(step["argument_bytes"] - expected) / expected < 0.05, (step, expected)
    # The donated state comes back in the same buffers: counted once.
    assert abs(step["alias_bytes"] - state) / state < 0.05
    assert step["total_bytes"] == (step["argument_bytes"] + step["temp_bytes"] + step["output_bytes"]
                                   - step["alias_bytes"] + step["generated_code_bytes"] + step["resident_bytes"])
    assert result["fits"] and result["topology"]["devices"] == 4 and result["chip"]["name"] == "v5e"


@needs_libtpu
def test_config_that_does_not_fit_is_refused_with_the_mesh_that_fits(tmp_path):
    c = small_config(tmp_path, data=4, fsdp=1)
    replicated = aot.estimate_fit(c, "TPU v5 lite", 4).peak_bytes
    # A budget of 0.75x the replicated resident bytes: data=4 cannot fit, fsdp=2 halves the weights.
    headroom = 1 - 0.75 * replicated / aot.CHIPS["TPU v5 lite"].hbm_bytes
    result = aot.preflight(c, "v5e:2x2", only=["distill_step"], headroom=headroom, search=2)
    assert not result["fits"] and result["programs"] == []  # refused by the estimate, before compiling
    assert result["suggested_mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}  # compiled on that mesh, and fits
    assert "--config.mesh.fsdp=2" in aot.verdict(result)


@needs_libtpu
def test_cli_refuses_a_replicated_8b_teacher_on_v5e_and_names_the_fix():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "distillspec_jax.aot", "--config=configs/jsd.py",
                           "--topology=v5e-4", "--search=0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stderr and "--config.mesh.fsdp=2" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["estimate_suggested_mesh"]["fsdp"] == 2


def test_cli_unknown_topology_exits_with_the_known_names():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "distillspec_jax.aot", "--config=configs/jsd.py:test",
                           "--topology=v7x-8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown TPU topology 'v7x-8'" in proc.stderr and "v5e-16" in proc.stderr


class _FakeChip:
    """A device as experiment.check_memory reads it: its kind only (no TPU on a CI host)."""

    def __init__(self, kind: str):
        self.device_kind = kind


def test_run_refuses_a_teacher_that_does_not_fit_before_any_model_loads():
    """0.6B -> 8B with the default mesh (data = -1: the bfloat16 8B teacher replicated) on 16 v5e chips of
    16 GiB: refused with the fsdp setting that fits; the same config on 8 H200s of 141 GB passes."""
    from configs import jsd
    from distillspec_jax import experiment

    c = jsd.get_config()
    with pytest.raises(aot.DoesNotFitError, match=r"mesh that fits: --config\.mesh\.data=\d+ --config\.mesh\.fsdp=\d+ --config\.mesh\.tensor=\d+"):
        experiment.check_memory(c, [_FakeChip("TPU v5 lite")] * 16)
    experiment.check_memory(c, [_FakeChip("NVIDIA H200")] * 8)
    experiment.check_memory(c, jax.devices())  # CPU devices: host RAM is no chip memory, nothing to check


@needs_libtpu
def test_every_program_of_a_run_compiles_for_a_tpu_slice(tmp_path):
    """Not only the training step: every program the stages run (generation, the γ sweep's decode, verify and
    speculative loops, the analytic pass and, with eval.lenience, the lossy frontier's) lowers with the
    arguments the stages give it and compiles for the slice."""
    c = small_config(tmp_path, data=4, fsdp=1)
    c.eval.update(gammas=(2,), temperatures=(0.0, 1.0), lenience="p_over_eps,p_pow_eps", epsilons=(0.5, 0.1))
    result = aot.preflight(c, "v5e:2x2")
    names = {p["name"] for p in result["programs"]}  # both evaluations run the same programs: listed once
    assert {"eval/T0/speculative_g2", "eval/T1/speculative_g2", "eval/T1/analytic_acceptance",
            "eval/T1/frontier_speculative_g2_lossless", "eval/T1/frontier_speculative_g2_p_pow_eps",
            "eval/T1/frontier_alpha_hat_p_over_eps", "eval/T1/frontier_quality_p_pow_eps", "distill_step",
            "generate_draft_on_policy"} <= names, names
    assert not any(n.startswith("eval/T0/frontier") for n in names)  # greedy keeps its exact rule
    assert result["fits"] and all(p["fits"] for p in result["programs"])
