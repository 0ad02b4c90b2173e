"""The experiment entry point: the whole `:test` pipeline through main.py, stage-level resume, the config
guard, and the early errors that bad settings get before any model is loaded or anything compiles."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from configs import jsd
from distillspec_jax import experiment
from distillspec_jax import workdir as wd
from tests.conftest import run_main
from tests.tiny import write_hf_checkpoint


def _results(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_pipeline_writes_every_output(pipeline_workdir):
    c = jsd.get_config("test")
    res = _results(pipeline_workdir)
    expected_keys = {(float(t), g) for t in c.eval.temperatures for g in c.eval.gammas}
    for when in ("before", "after"):
        rows = res[when]
        assert {(r["temperature"], r["gamma"]) for r in rows} == expected_keys
        for r in rows:
            assert 1.0 <= r["block_efficiency"] <= r["gamma"] + 1
            # τ is consistent with the counts: emitted / calls, and each call emits its accepted drafts + 1
            # (fewer only where an EOS or the budget cuts the block).
            assert r["block_efficiency"] == pytest.approx(r["emitted_tokens"] / r["target_calls"])
            assert r["emitted_tokens"] <= r["accepted_tokens"] + r["target_calls"]
            assert r["acceptance_rate"] == pytest.approx(r["accepted_tokens"] / r["proposed_tokens"])
            assert r["proposed_tokens"] == r["gamma"] * r["target_calls"]
            assert 0.0 <= r["acceptance_rate"] <= 1.0
            assert len(r["per_position_acceptance"]) == r["gamma"]
            assert r["rows"] == c.eval.num_prompts
            for key in ("measured_speedup", "predicted_speedup", "alpha_hat", "expected_block_efficiency"):
                assert np.isfinite(r[key]) and r[key] > 0, key
    assert res["training"]["steps"] == c.distill.steps
    assert res["run"]["divergence"] == "jsd" and res["run"]["generator"] == c.generator.kind
    lines = [json.loads(x) for x in (pipeline_workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(c.distill.log_every, c.distill.steps + 1, c.distill.log_every))
    assert lines[-1]["divergence"] < lines[0]["divergence"]  # the distillation loss went down
    checks = res["checks"]["tau_after_exceeds_before"]
    assert set(checks) == {f"{t:g}" for t in c.eval.temperatures}
    assert all(set(v) == {str(g) for g in c.eval.gammas} for v in checks.values())
    stored = json.loads((pipeline_workdir / "config.json").read_text())
    assert stored["distill"]["divergence"] == "jsd" and stored["eval"]["gammas"] == list(c.eval.gammas)
    stdout = (pipeline_workdir / "stdout.txt").read_text()
    assert "τ before" in stdout and "temperature 1" in stdout  # the printed table


def test_distillation_raises_sampled_acceptance(pipeline_workdir):
    # Even at test size (12 steps), on-policy JSD must move the draft toward the target: the analytic
    # acceptance α̂ = E[1 − TVD] at temperature 1 rises. (The :tiny preset shows τ rising; see README.)
    res = _results(pipeline_workdir)
    before = {r["gamma"]: r for r in res["before"] if r["temperature"] == 1.0}
    after = {r["gamma"]: r for r in res["after"] if r["temperature"] == 1.0}
    assert after[1]["alpha_hat"] > before[1]["alpha_hat"] + 0.02


def test_distilled_draft_loads_in_transformers(pipeline_workdir):
    import torch
    from transformers import Qwen3ForCausalLM

    from distillspec_jax.models import convert

    hf = Qwen3ForCausalLM.from_pretrained(pipeline_workdir / "distilled" / "hf", dtype=torch.float32).eval()
    ours = convert.load_orbax(pipeline_workdir / "distilled" / "orbax")
    tokens = np.arange(1, 17, dtype=np.int32)[None, :]
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens))[..., : theirs.shape[-1]], theirs, atol=1e-4)


def test_rerun_skips_finished_stages(pipeline_workdir, tmp_path):
    # A rerun of a finished workdir recomputes nothing but the report; one with a stage's output
    # removed reruns only that stage.
    workdir = tmp_path / "copy"
    import shutil

    shutil.copytree(pipeline_workdir, workdir, ignore=shutil.ignore_patterns("results.json", "eval_after.json"))
    before = (workdir / "eval_before.json").read_text()
    metrics = (workdir / "metrics.jsonl").read_text()
    proc = run_main(workdir)
    assert "already done: data,distill,eval_before" in proc.stdout
    assert "[eval_after]" in proc.stdout and "[eval_before]" not in proc.stdout and "[distill]" not in proc.stdout
    assert (workdir / "eval_before.json").read_text() == before
    assert (workdir / "metrics.jsonl").read_text() == metrics
    assert _results(workdir)["after"]


def _comparable(res: dict) -> dict:
    """results.json without wall-clock figures, which differ between any two runs."""
    timed = ("time_s", "speedup", "cost_ratio")
    strip = lambda rows: [{k: v for k, v in r.items() if not any(t in k for t in timed)} for r in rows]  # noqa: E731
    return {"before": strip(res["before"]), "after": strip(res["after"]), "steps": res["training"]["steps"],
            "data_position": res["training"]["data_position"]}


def test_interrupted_run_resumes_to_the_same_results(pipeline_workdir, tmp_path):
    # SIGTERM during distillation: the run checkpoints and exits cleanly; rerunning the same command
    # finishes with the same results as the uninterrupted pipeline (timings aside).
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import PIPELINE_ARGS, REPO

    workdir = tmp_path / "interrupted"
    workdir.mkdir()
    for name in ("models", "data"):  # the prepared models and data of the same config, to save time
        shutil.copytree(pipeline_workdir / name, workdir / name)
    shutil.copy2(pipeline_workdir / "eval_before.json", workdir / "eval_before.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "main.py", *PIPELINE_ARGS, f"--workdir={workdir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "main.py ended before training logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "rerun the same command to resume" in stdout
    assert not (workdir / "results.json").exists()
    stopped_at = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert stopped_at < jsd.get_config("test").distill.steps
    run_main(workdir)
    assert _comparable(_results(workdir)) == _comparable(_results(pipeline_workdir))


def test_changed_config_is_refused_without_overwrite(pipeline_workdir, tmp_path):
    workdir = tmp_path / "guard"
    workdir.mkdir()
    (workdir / "config.json").write_text((pipeline_workdir / "config.json").read_text())
    proc = run_main(workdir, "--config.distill.steps=13", "--config.stages=report", check=False)
    assert proc.returncode != 0
    assert "distill.steps" in proc.stderr and "--config.overwrite=True" in proc.stderr
    # Fields that do not change what is computed may differ.
    stored = json.loads((pipeline_workdir / "config.json").read_text())
    changed = json.loads(json.dumps(stored))
    changed["stages"], changed["eval"]["timing_repeats"] = "report", 7
    changed["mesh"]["data"], changed["distill"]["checkpoint_every"] = 2, 1
    assert wd.config_differences(stored, changed) == []


def test_redaction_hides_secrets_but_not_token_budgets():
    # Fields named after tokens are settings, not secrets: redacting them would also hide their changes
    # from the resume guard.
    config = {"eval": {"max_new_tokens": 48}, "tokenizer": "tiny", "hf_token": "hf_x", "tracking": {"api_key": "k"},
              "db": {"password": "p", "secret": "s"}}
    assert wd.redact(config) == {"eval": {"max_new_tokens": 48}, "tokenizer": "tiny", "hf_token": "<redacted>",
                                 "tracking": {"api_key": "<redacted>"},
                                 "db": {"password": "<redacted>", "secret": "<redacted>"}}
    changed = json.loads(json.dumps(config))
    changed["eval"]["max_new_tokens"] = 64
    assert wd.config_differences(wd.redact(config), wd.redact(changed)) == ["eval.max_new_tokens"]


def test_unknown_config_key_is_an_error(tmp_path):
    proc = run_main(tmp_path / "w", "--config.distill.no_such_field=1", check=False)
    assert proc.returncode != 0 and "no_such_field" in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


@pytest.mark.parametrize("field, value, message", [
    ("eval.gammas", (0, 2), "gammas"),
    ("eval.temperatures", (-1.0,), "temperature"),
    ("eval.num_prompts", 12, "multiple"),
    ("distill.divergence", "kl", "unknown divergence"),
    ("distill.jsd_beta", 1.5, "jsd_beta"),
    ("distill.adaspec_fraction", 1.5, "adaspec_fraction"),
    ("generator.kind", "teacher", "unknown generator"),
    ("generator.mix_lambda", 2.0, "mix_lambda"),
    ("stages", "prepare,train", "unknown stages"),
    ("data.source", "s3", "unknown data source"),
    ("data.eval_split", "test", "has no splits"),  # humaneval is one collection: held-out prompts only
    ("data.name", "/no/such/file.jsonl", "does not exist"),
    ("tokenizer", "tiny", "belongs to the 'tiny' models"),
    ("distill.adaspec_reference_steps", -1, "adaspec_reference_steps"),
    ("draft.model", "/no/such/checkpoint", "no/such/checkpoint"),
])
def test_bad_settings_fail_validation(field, value, message):
    c = jsd.get_config("test")
    group, _, name = field.rpartition(".")
    (c[group] if group else c)[name] = value
    if field == "generator.mix_lambda":
        c.generator.kind = "mix"
    if field == "draft.model":
        c.target.model = "/no/such/checkpoint"
    if field == "data.name":
        c.data.source = "jsonl"
    if field == "tokenizer":
        c.target.model = c.draft.model = "Qwen/Qwen3-0.6B"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        experiment.validate(c)


def test_batch_must_divide_the_mesh():
    from distillspec_jax import sharding as shd

    c = jsd.get_config("test")
    mesh = shd.make_mesh(-1, 1, 1)  # 8 fake devices (conftest)
    c.eval.batch_size = c.eval.num_prompts = 4
    with pytest.raises(ValueError, match="eval.batch_size 4 does not divide"):
        experiment.check_mesh(c, mesh)


def test_prepare_refuses_different_vocabularies(tmp_path):
    c = jsd.get_config("test")
    c.target.model = str(write_hf_checkpoint(tmp_path / "target", seed=0, num_attention_heads=4, num_key_value_heads=2))
    c.draft.model = str(write_hf_checkpoint(tmp_path / "draft", seed=1, vocab_size=384, num_attention_heads=4,
                                            num_key_value_heads=2))
    c.tokenizer = experiment.OFFLINE_QWEN3_TOKENIZER
    experiment.validate(c)
    from distillspec_jax import sharding as shd

    with pytest.raises(ValueError, match="vocabularies differ"):
        experiment.prepare(c, str(tmp_path / "w"), shd.make_mesh(-1, 1, 1))
    # The conversions are cached: a second prepare does not convert again.
    converted = sorted((tmp_path / "w" / "models").iterdir())
    assert len(converted) == 2
    stamps = [(p / "qwen3_config.json").stat().st_mtime_ns for p in converted]
    with pytest.raises(ValueError, match="vocabularies differ"):
        experiment.prepare(c, str(tmp_path / "w"), shd.make_mesh(-1, 1, 1))
    assert [(p / "qwen3_config.json").stat().st_mtime_ns for p in converted] == stamps


def test_compilation_cache_sits_beside_the_model_cache(tmp_path):
    import jax

    c = jsd.get_config("test")
    previous = jax.config.jax_compilation_cache_dir
    try:
        assert experiment.enable_compilation_cache(c, str(tmp_path)) == str(tmp_path / "models" / "xla_cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "models" / "xla_cache")
        c.tiny.cache_dir = str(tmp_path / "shared")
        assert experiment.enable_compilation_cache(c, str(tmp_path)) == str(tmp_path / "shared" / "xla_cache")
        c.compilation_cache = ""
        assert experiment.enable_compilation_cache(c, str(tmp_path)) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_tiny_models_of_a_gs_workdir_are_cached_locally(monkeypatch, tmp_path):
    # The tiny build writes with local-file APIs; real conversions (Orbax) may live under gs://.
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    tiny_cfg = jsd.get_config("test")
    assert str(experiment.model_cache(tiny_cfg, "gs://bucket/run")) == str(tmp_path / "tiny")
    assert str(experiment.model_cache(tiny_cfg, str(tmp_path / "run"))) == str(tmp_path / "run" / "models")
    real = jsd.get_config("")
    assert str(experiment.model_cache(real, "gs://bucket/run")) == "gs://bucket/run/models"
