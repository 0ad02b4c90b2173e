"""Tracking: metrics.jsonl is written always and cut back to the restored step on resume; W&B without
an API key runs offline into a run directory under the workdir that holds the logged metrics, says so
once, and a resumed run continues the same run id; the API key never reaches a file or the logs."""

from __future__ import annotations

import json
import logging
import pathlib
import struct
import time

import pytest

from distillspec_jax import tracking

FAKE_KEY = "local-" + "0123456789abcdef" * 2 + "feedfacecafe"  # the shape of a W&B key; never sent anywhere


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No W&B credentials and no W&B state outside tmp_path; the offline notice not yet given."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_RUN_ID",
                "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # a `wandb login` of this machine must not count
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tracking, "_offline_notice_given", False)
    return monkeypatch


def _wandb_records(run_dir: pathlib.Path) -> list:
    """The protobuf records of a finished offline run's .wandb file.

    wandb.finish() can return a few milliseconds before W&B's service has flushed the file, so this
    waits (up to 10 s) for the run's closing 'exit' record."""
    deadline = time.monotonic() + 10
    while True:
        records = list(_parse_wandb_log(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def _parse_wandb_log(run_dir: pathlib.Path):
    """W&B's append-only log: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC, length, FULL/FIRST/MIDDLE/LAST) and a piece of a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _history(run_dir: pathlib.Path) -> list[dict]:
    rows = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")})
    return rows


def _run_record(run_dir: pathlib.Path):
    return next(r.run for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "run")


def _offline_runs(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((workdir / "wandb").glob("offline-run-*"))


# ---- metrics.jsonl ---------------------------------------------------------------------------------

def test_metrics_jsonl_is_written_without_wandb_and_cut_back_on_resume(tmp_path):
    with tracking.MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step})
    # A crash after step 5 with the last checkpoint at step 3: steps 4 and 5 are about to be recomputed.
    with open(tmp_path / tracking.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # and a line torn by the crash
    with tracking.MetricsLogger(tmp_path, resume_step=3) as logger:
        logger.log(4, {"loss": 0.3})
    records = tracking.read_metrics(tmp_path / tracking.METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["loss"] == 0.3 and records[2]["loss"] == pytest.approx(1 / 3)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("tail", ['{"step": 4, "loss": 0.', '{"step": 4, "loss": 0.25}'], ids=["torn", "unterminated"])
def test_a_torn_last_line_is_repaired_on_resume(tmp_path, caplog, tail):
    # Nothing to cut back (the checkpoint is at the last logged step), yet a crash mid-write left a fragment,
    # or a record without its newline: resuming must not append the next record onto it.
    with tracking.MetricsLogger(tmp_path) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 1.0 / step})
    with open(tmp_path / tracking.METRICS_FILE, "a") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING), tracking.MetricsLogger(tmp_path, resume_step=4) as logger:
        logger.log(5, {"loss": 0.2})
    lines = (tmp_path / tracking.METRICS_FILE).read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # every line parses
    assert steps == ([1, 2, 3, 5] if tail.endswith(".") else [1, 2, 3, 4, 5])
    if tail.endswith("."):
        assert "dropped 1 torn line" in caplog.text


def test_metrics_values_become_plain_json(tmp_path):
    import numpy as np

    with tracking.MetricsLogger(tmp_path) as logger:
        logger.log(np.int64(1), {"loss": np.float32(0.5), "grad_norm": float("nan"), "tokens": np.int32(7)})
    line = (tmp_path / tracking.METRICS_FILE).read_text().strip()
    assert json.loads(line) == {"step": 1, "loss": 0.5, "grad_norm": "nan", "tokens": 7}


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.jax, "process_index", lambda: 1)
    with tracking.MetricsLogger(tmp_path / "w", use_wandb=True) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists()


# ---- W&B -------------------------------------------------------------------------------------------

def test_without_api_key_wandb_runs_offline_into_the_workdir_with_the_metrics(wandb_env, tmp_path, caplog):
    workdir = tmp_path / "jsd-run"
    config = {"divergence": "jsd", "train": {"steps": 3}}
    with caplog.at_level(logging.INFO):
        with tracking.MetricsLogger(workdir, use_wandb=True, wandb_project="ds-test", config=config,
                                    wandb_entity="my-team", wandb_tags=("jsd", "tiny")) as logger:
            logger.log(1, {"loss": 0.5, "tvd": 0.25})
            logger.log(2, {"loss": 0.25, "tvd": 0.125})
    [run_dir] = _offline_runs(workdir)
    run_id = (workdir / tracking.WANDB_ID_FILE).read_text().strip()
    assert run_dir.name.endswith("-" + run_id)  # wandb/offline-run-<time>-<id>
    assert _history(run_dir) == [{"loss": 0.5, "tvd": 0.25, "_step": 1}, {"loss": 0.25, "tvd": 0.125, "_step": 2}]
    run = _run_record(run_dir)
    assert (run.run_id, run.project, run.entity, run.display_name) == (run_id, "ds-test", "my-team", "jsd-run")
    assert list(run.tags) == ["jsd", "tiny"]
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["divergence"] == "jsd" and logged_config["train"] == {"steps": 3}
    assert [r["step"] for r in tracking.read_metrics(workdir / tracking.METRICS_FILE)] == [1, 2]
    assert any("offline mode" in r.getMessage() and "wandb sync" in r.getMessage() for r in caplog.records)


def test_resumed_run_continues_the_same_wandb_run_and_says_offline_once(wandb_env, tmp_path, caplog):
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        with tracking.MetricsLogger(workdir, use_wandb=True) as logger:
            for step in (1, 2, 3):
                logger.log(step, {"loss": 1.0 / step})
            first_id = logger._wandb.id
        # Preempted after step 3, restored from the checkpoint of step 2.
        with tracking.MetricsLogger(workdir, use_wandb=True, resume_step=2) as logger:
            logger.log(3, {"loss": 0.3})
            second_id = logger._wandb.id
    assert first_id == second_id == (workdir / tracking.WANDB_ID_FILE).read_text().strip()
    runs = _offline_runs(workdir)  # one local run directory per session, both of the same W&B run
    assert len(runs) == 2 and [_run_record(r).run_id for r in runs] == [first_id, first_id]
    assert _history(runs[-1]) == [{"loss": 0.3, "_step": 3}]
    assert [(r["step"], r["loss"]) for r in tracking.read_metrics(workdir / tracking.METRICS_FILE)] == [
        (1, 1.0), (2, 0.5), (3, 0.3)]
    notices = [r for r in caplog.records if "offline mode" in r.getMessage()]
    assert len(notices) == 1, [r.getMessage() for r in notices]


def test_api_key_never_reaches_a_file_or_the_logs(wandb_env, tmp_path, caplog, capfd):
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb_env.setenv("WANDB_MODE", "offline")  # a key, but no network in tests
    workdir = tmp_path / "run"
    # Even a config that carries the key under a secret-looking name does not leak it.
    config = {"tracking": {"project": "p", "api_key": FAKE_KEY}, "hub_token": FAKE_KEY}
    with caplog.at_level(logging.DEBUG):
        with tracking.MetricsLogger(workdir, use_wandb=True, config=config) as logger:
            logger.log(1, {"loss": 1.0})
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (workdir / tracking.METRICS_FILE) in files
    leaked = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    run = _run_record(_offline_runs(workdir)[0])
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["tracking"] == {"project": "p", "api_key": "<redacted>"}
    assert logged_config["hub_token"] == "<redacted>"
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err
    assert all(FAKE_KEY not in r.getMessage() for r in caplog.records)


def test_a_stored_wandb_login_counts_as_a_key(wandb_env, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert not tracking._have_wandb_key()
    wandb_env.setenv("NETRC", str(netrc))
    assert tracking._have_wandb_key()
    wandb_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a login for another host does not count
    assert not tracking._have_wandb_key()
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking._have_wandb_key()


def test_upload_files_attaches_results_to_the_same_wandb_run(wandb_env, tmp_path):
    # The notebook reads results from W&B alone: report() attaches results.json etc. to the run's id.
    workdir = tmp_path / "run"
    with tracking.MetricsLogger(workdir, use_wandb=True, wandb_project="ds-test") as logger:
        logger.log(1, {"loss": 0.5})
    (workdir / "results.json").write_text('{"schema": 1}\n')
    saved = tracking.upload_files(workdir, ["results.json", "metrics.jsonl", "missing.json"], project="ds-test")
    assert saved == ["results.json", "metrics.jsonl"]
    run_id = (workdir / tracking.WANDB_ID_FILE).read_text().strip()
    runs = _offline_runs(workdir)
    # The same run, resumed. Directory names get a "-1" suffix when both sessions start within one
    # second, so the run id is read from each run record, not parsed from the name.
    assert len(runs) == 2 and [_run_record(r).run_id for r in runs] == [run_id, run_id]
    uploaded = runs[-1] / "files" / "results.json"
    assert uploaded.is_file() and uploaded.read_text() == '{"schema": 1}\n'


def test_a_gs_workdir_keeps_wandb_files_in_a_local_folder_named_after_it(monkeypatch, tmp_path):
    # wandb writes only local files, so a gs:// workdir's W&B folder lives under the local cache root.
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    assert tracking.wandb_local_dir("gs://bucket/runs/jsd") == tmp_path / "wandb" / "bucket__runs__jsd"
    assert tracking.wandb_local_dir(tmp_path / "run") == tmp_path / "run"
