"""The experiment entry point: the whole `:test` pipeline through main.py, stage-level resume, the config
guard, and the early errors that bad settings get before any model is loaded or anything compiles."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from configs import jsd
from distillspec_jax import checks, errors, experiment, lease, model_sources
from distillspec_jax import workdir as wd
from distillspec_jax.stages import prepare as prepare_stage
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
    # Stopped with its checkpoint saved: the documented exit status that the launch scripts requeue on
    # (before issue #14 it was 0, which looked like a finished run).
    assert proc.returncode == errors.EXIT_PREEMPTED, stderr[-3000:]
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
    # One line naming the closest field, not ml_collections' chained traceback.
    proc = run_main(tmp_path / "w", "--config.distill.learning_rat=1", check=False)
    assert proc.stderr.strip().splitlines() == [
        "main.py: error: --config.distill.learning_rat: no such config field 'learning_rat'; fix: "
        "--config.distill.learning_rate (did you mean it? every field, with its comment: configs/common.py)"]


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
    ("distill.reference_steps", -1, "reference_steps"),
    ("distill.selection", "topk", "unknown token selection"),
    ("draft.model", "/no/such/checkpoint", "no/such/checkpoint"),
    ("tiny.target_experts", -1, "tiny.target_experts"),
    ("tiny.target_experts_per_tok", 9, "at most tiny.target_experts=8"),
])
def test_bad_settings_fail_validation(field, value, message):
    c = jsd.get_config("test")
    if field == "tiny.target_experts_per_tok":
        c.tiny.target_experts = 8
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


def test_same_vocabulary_check_reads_configs_and_stored_fields_alike():
    """The one vocabulary check takes a Qwen3Config or the fields stored with a converted model; an unset
    num_real_tokens means every row is real, so it equals num_real_tokens = vocab_size."""
    import dataclasses

    from distillspec_jax.models import qwen3

    cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    checks.check_same_vocabulary(cfg, dataclasses.asdict(cfg.replace(num_real_tokens=64)), "target", "a test")
    for other in (cfg.replace(num_real_tokens=60), dataclasses.asdict(cfg.replace(vocab_size=128))):
        with pytest.raises(ValueError, match="vocabularies differ"):
            checks.check_same_vocabulary(cfg, other, "target", "a test")


def test_prepare_refuses_different_vocabularies(tmp_path):
    c = jsd.get_config("test")
    c.target.model = str(write_hf_checkpoint(tmp_path / "target", seed=0, num_attention_heads=4, num_key_value_heads=2))
    c.draft.model = str(write_hf_checkpoint(tmp_path / "draft", seed=1, vocab_size=384, num_attention_heads=4,
                                            num_key_value_heads=2))
    c.tokenizer = prepare_stage.OFFLINE_QWEN3_TOKENIZER
    experiment.validate(c)
    from distillspec_jax import sharding as shd

    with pytest.raises(ValueError, match="vocabularies differ"):
        prepare_stage.prepare(c, str(tmp_path / "w"), shd.make_mesh(-1, 1, 1))
    # The conversions are cached: a second prepare does not convert again.
    converted = sorted((tmp_path / "w" / "models").iterdir())
    assert len(converted) == 2
    stamps = [(p / "qwen3_config.json").stat().st_mtime_ns for p in converted]
    with pytest.raises(ValueError, match="vocabularies differ"):
        prepare_stage.prepare(c, str(tmp_path / "w"), shd.make_mesh(-1, 1, 1))
    assert [(p / "qwen3_config.json").stat().st_mtime_ns for p in converted] == stamps


def test_compilation_cache_sits_beside_the_model_cache(tmp_path):
    import jax

    c = jsd.get_config("test")
    previous = jax.config.jax_compilation_cache_dir
    try:
        assert prepare_stage.enable_compilation_cache(c, str(tmp_path)) == str(tmp_path / "models" / "xla_cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "models" / "xla_cache")
        c.tiny.cache_dir = str(tmp_path / "shared")
        assert prepare_stage.enable_compilation_cache(c, str(tmp_path)) == str(tmp_path / "shared" / "xla_cache")
        c.compilation_cache = ""
        assert prepare_stage.enable_compilation_cache(c, str(tmp_path)) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_tiny_models_of_a_gs_workdir_are_cached_locally(monkeypatch, tmp_path):
    # The tiny build writes with local-file APIs; real conversions (Orbax) may live under gs://.
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    tiny_cfg = jsd.get_config("test")
    assert str(prepare_stage.model_cache(tiny_cfg, "gs://bucket/run")) == str(tmp_path / "tiny")
    assert str(prepare_stage.model_cache(tiny_cfg, str(tmp_path / "run"))) == str(tmp_path / "run" / "models")
    real = jsd.get_config("")
    assert str(prepare_stage.model_cache(real, "gs://bucket/run")) == "gs://bucket/run/models"


# ----------------------------------------------------------------------------------------------
# Faults and bad inputs (issue #14)
# ----------------------------------------------------------------------------------------------


def test_every_config_field_is_validated():
    c = jsd.get_config("test")
    assert set(checks.all_fields(c)) <= checks.check_fields(c)


def test_a_feature_that_is_off_still_has_its_fields_checked():
    c = jsd.get_config("test")
    assert c.generator.kind != "mix"
    c.generator.mix_lambda = 2.0
    with pytest.raises(errors.ConfigError) as info:
        experiment.validate(c)
    assert str(info.value) == ("config.generator.mix_lambda = 2.0: must be a number in [0, 1]; fix: "
                               "--config.generator.mix_lambda=0.5")


def test_sequences_past_the_models_positions_are_refused_before_anything_loads(tmp_path):
    from distillspec_jax import tiny

    c = jsd.get_config("test")
    c.generator.kind, c.data.max_prompt_len = "fixed", tiny.TINY_MAX_POSITIONS
    with pytest.raises(errors.ConfigError, match=r"config.data.max_prompt_len = 4096: must be small enough that "
                                                 r"training .* max_position_embeddings=4096 .*fix: lower "
                                                 r"data.max_prompt_len or data.max_response_len"):
        experiment.validate(c)
    c = jsd.get_config("test")
    c.eval.max_new_tokens = tiny.TINY_MAX_POSITIONS
    with pytest.raises(errors.ConfigError, match=r"config.eval.max_new_tokens .* evaluation .*eval.gammas"):
        experiment.validate(c)
    proc = run_main(tmp_path / "w", "--config.generator.kind=fixed", "--config.data.max_prompt_len=5000",
                    check=False)
    assert proc.returncode == 1 and "max_position_embeddings=4096" in proc.stderr
    assert "[prepare]" not in proc.stdout and "Traceback" not in proc.stderr


def test_a_checkpoint_replaced_at_the_same_path_is_converted_again(tmp_path, capsys):
    import json as json_

    from distillspec_jax import sharding as shd

    mesh = shd.make_mesh(-1, 1, 1)
    source, cache = tmp_path / "ckpt", wd.path(tmp_path / "models")
    write_hf_checkpoint(source, seed=0, vocab_size=384)
    out = prepare_stage.converted(str(source), "float32", cache, mesh)
    vocab = lambda: json_.loads(wd.path(out, "qwen3_config.json").read_text())["vocab_size"]  # noqa: E731
    assert vocab() == 384
    stamp = (pathlib.Path(out) / "qwen3_config.json").stat().st_mtime_ns
    prepare_stage.converted(str(source), "float32", cache, mesh)  # unchanged: reused
    assert (pathlib.Path(out) / "qwen3_config.json").stat().st_mtime_ns == stamp
    import shutil

    shutil.rmtree(source)
    write_hf_checkpoint(source, seed=1, vocab_size=512)  # another checkpoint, same path
    capsys.readouterr()
    assert prepare_stage.converted(str(source), "float32", cache, mesh) == out
    assert vocab() == 512
    assert f"converting {source} again: the checkpoint in {source} changed" in capsys.readouterr().out


def test_hub_conversions_follow_the_cached_revision(tmp_path):
    snapshot = tmp_path / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--Qwen--Qwen3-0.6B" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen3-0.6B" / "refs" / "main").write_text("abc123")
    current = model_sources.hub_identity("Qwen/Qwen3-0.6B", cache_dir=str(tmp_path))
    assert current["revision"] == "abc123"
    same = {"param_dtype": "float32", "identity": dict(current)}
    assert model_sources._why_stale(same, current, "float32") is None
    older = {"param_dtype": "float32", "identity": {**current, "revision": "0ld"}}
    assert "converted from revision 0ld" in model_sources._why_stale(older, current, "float32")
    assert "converted to bfloat16" in model_sources._why_stale({**same, "param_dtype": "bfloat16"}, current, "float32")
    assert "has no distillspec_source.json" in model_sources._why_stale(None, current, "float32")


def _prepared_copy(pipeline_workdir: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """A workdir with the pipeline's models, data and first evaluation: a run of it starts at distillation."""
    import shutil

    workdir.mkdir()
    for name in ("models", "data"):
        shutil.copytree(pipeline_workdir / name, workdir / name)
    shutil.copy2(pipeline_workdir / "eval_before.json", workdir / "eval_before.json")
    return workdir


def test_two_runs_on_one_workdir_exactly_one_trains(pipeline_workdir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import PIPELINE_ARGS, REPO

    workdir = _prepared_copy(pipeline_workdir, tmp_path / "shared")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "main.py", *PIPELINE_ARGS, f"--workdir={workdir}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert f"is in use by another run (host {os.uname().nodename}, pid {procs[winner].pid}" in outs[loser][1]
    assert "[distill]" not in outs[loser][0] and "Traceback" not in outs[loser][1]
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == jsd.get_config("test").distill.steps
    assert not (workdir / lease.LOCK_FILE).exists()  # released at the end


def test_killed_before_the_summary_still_reports_the_final_metrics(pipeline_workdir, tmp_path):
    # kill -9 after the last checkpoint but before distilled/summary.json: the rerun trains no step, and
    # the report's training metrics come from the checkpoint, not from the memory of a process.
    import shutil

    workdir = tmp_path / "killed"
    shutil.copytree(pipeline_workdir, workdir, ignore=shutil.ignore_patterns("distilled", "eval_after.json",
                                                                            "results.json"))
    run_main(workdir)
    want, got = _results(pipeline_workdir)["training"], _results(workdir)["training"]
    assert got["last_metrics"] and got == want
