"""The benchmark programs run end to end at test size and print one JSON object with the expected figures,
each finite and positive: a script that breaks, or a figure that turns NaN, fails here. About a minute and a
half on a 2-core CPU (each script compiles its jitted loops in its own process), hence `slow`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY_MODEL = ("--model=tiny", "--runs=1")

pytestmark = pytest.mark.slow


def run_bench(module: str, *args: str) -> dict:
    """`python -m bench.<module> ARGS` from the repo root (one CPU device: no fake-device XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench.{module} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout)  # the whole stdout is one JSON object


def assert_positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"


def assert_machine(result: dict) -> None:
    machine = result["machine"]
    for key in ("platform", "cpu", "cpu_count", "device_kind", "jax_backend", "versions"):
        assert key in machine
    assert machine["versions"]["jax"] and machine["versions"]["flax"]


def test_decode_bench_reports_roofline_and_hf_reference():
    result = run_bench("decode", *TINY_MODEL, "--batch_sizes=1,2", "--prompt_len=8", "--new_tokens=6",
                       "--hf=eager", "--bandwidth_mib=8")
    assert result["benchmark"] == "decode"
    assert_machine(result)
    assert_positive(result["bandwidth"], "bandwidth_gb_s")
    assert_positive(result["peak"], "peak_flops")
    assert [r["batch"] for r in result["results"]] == [1, 2]
    for entry in result["results"]:
        assert_positive(entry["jax"], "time_s", "tokens_per_s", "ms_per_token", "roofline_fraction",
                        "measured_over_ideal")
        assert_positive(entry["roofline"], "step_bytes", "ideal_step_ms")
        assert entry["jax"]["compiles_for_timed_shape"] <= 1  # timed calls never recompile
        hf = entry["hf"]["eager"]
        assert "error" not in hf, hf
        assert_positive(hf, "time_s", "tokens_per_s", "speedup_end_to_end")
        # The same weights: HF's greedy tokens start out the same as ours.
        assert hf["greedy_agreement"] > 0
        assert_positive(entry, "speedup_vs_best_hf")


def test_speculative_bench_reports_costs_per_gamma():
    result = run_bench("speculative", *TINY_MODEL, "--draft_model=tiny-draft", "--gammas=1,2",
                       "--prompt_len=8", "--new_tokens=8")
    assert result["benchmark"] == "speculative"
    assert_machine(result)
    assert_positive(result, "target_time_s", "target_step_s")
    assert [v["gamma"] for v in result["verify"]] == [1, 2]
    for v in result["verify"]:
        assert_positive(v, "verify_s", "verify_over_step")
    assert set(result["drafts"]) == {"copy", "truncated", "random"}
    for draft in result["drafts"].values():
        assert_positive(draft, "draft_step_s", "cost_ratio", "prefill_both_s")
        for entry in draft["gammas"]:
            assert_positive(entry, "block_efficiency", "speculative_time_s", "measured_speedup", "predicted_speedup",
                            "predicted_speedup_with_verify_cost", "blocks", "block_s", "ideal_block_s")
            assert math.isfinite(entry["loop_overhead"])
            assert entry["recompiles_after_first_call"] == 0
    # The copy of the target is the upper bound: every greedy proposal is accepted.
    for entry in result["drafts"]["copy"]["gammas"]:
        assert entry["acceptance_rate"] == 1.0


def test_distill_step_bench_reports_mfu_and_memory():
    result = run_bench("distill_step", "--student=tiny-draft", "--teacher=tiny", "--batch=2", "--seq_len=16",
                       "--loss_chunks=8,0", "--runs=1", "--teachers=online,16", "--loop_steps=3", "--log_every=2")
    assert result["benchmark"] == "distill_step"
    assert_machine(result)
    assert_positive(result["flops_per_token"], "matmul", "attention", "total")
    assert result["stored_teacher_flops_per_token"]["total"] < result["flops_per_token"]["total"]
    assert [(r["teacher"], r["loss_chunk"]) for r in result["results"]] == [
        ("online", 8), ("online", 0), ("stored top-16", 8), ("stored top-16", 0)]
    online, stored = result["results"][0], result["results"][2]
    assert stored["batch_bytes"] > online["batch_bytes"]  # the stored teacher travels with the batch
    if online["compiled_memory"]["available"]:  # ... and the teacher's float32 parameters no longer do
        teacher_bytes = 4 * result["teacher"]["params"]
        assert (stored["compiled_memory"]["argument_size_in_bytes"] - online["compiled_memory"]["argument_size_in_bytes"]
                == stored["batch_bytes"] - online["batch_bytes"] - teacher_bytes)
    for entry in result["results"]:
        assert_positive(entry, "step_s", "tokens_per_s", "mfu", "compile_s", "loss")
        [loop] = entry["loop"]  # the training loop around the same step, metrics pulled every 2 steps
        assert (loop["log_every"], loop["steps"]) == (2, 3)
        assert_positive(loop, "step_s", "tokens_per_s", "loss")
        memory = entry["compiled_memory"]
        if memory["available"]:
            assert_positive(memory, "peak_estimate_bytes")
        else:
            assert memory["reason"]



def test_step_cost_bench_reports_bytes_per_layer_count_and_both_weight_layouts():
    result = run_bench("step_cost", "--models=tiny", "--dtype=float32", "--layers=1,2", "--batch_sizes=1",
                       "--prompt_len=8", "--new_tokens=8", "--cache_len=256", "--verify_tokens=4", "--platforms=cpu")
    assert result["benchmark"] == "step_cost"
    one, two = result["results"]
    assert (one["layers"], two["layers"]) == (1, 2)
    for entry in (one, two):
        generation = entry["generation"]
        assert_positive(generation, "ideal_bytes_per_step")
        for live in ("live", "live_resident_weights"):
            assert_positive(generation[live], "bytes_per_step", "bytes_over_ideal")
        for layout in ("stored_layouts", "resident_weights"):
            costs = entry["verify"][layout]
            assert_positive(costs, "bytes_ratio", "flops_ratio")
            assert costs["verify"]["flops"] > costs["step"]["flops"]  # 4 tokens against 1
    # a second layer adds its weights and cache: the layer override reaches the compiled program
    assert two["generation"]["live"]["bytes_per_step"] > one["generation"]["live"]["bytes_per_step"]
    assert two["generation"]["ideal_bytes_per_step"] > one["generation"]["ideal_bytes_per_step"]

def test_report_renders_every_stored_result(capsys):
    # docs/benchmarks.md's tables come from these files through bench.report: every kind must render.
    from bench import report

    folder = os.path.join(REPO, "bench", "results")
    paths = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names if f.endswith(".json"))
    assert paths
    report.main(paths)
    out = capsys.readouterr().out
    assert out.count("<!-- ") == len(paths) and "| B | op time / step |" in out


def test_gpu_check_script_passes_shellcheck():
    from tests.test_launch import _shellcheck

    result = subprocess.run([_shellcheck(), "--shell=bash", "--severity=style", "bench/gpu_check.sh"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
