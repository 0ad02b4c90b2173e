"""The workdir: every unusable path gets one line naming the fix; overwrite deletes only what a run wrote and
never touches a folder that is not a workdir of ours; the lease lets one run at a time in (atomically, on a
local disk and on GCS), names the owner to the second, and is taken over when its owner is gone; the config
guard lets named fields change on resume."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from distillspec_jax import experiment, lease
from distillspec_jax import workdir as wd
from tests.conftest import run_main

# ----------------------------------------------------------------------------------------------
# Paths that cannot be a workdir
# ----------------------------------------------------------------------------------------------


def _refused(workdir, match: str) -> str:
    with pytest.raises(wd.WorkdirError) as info:
        wd.check_writable(workdir)
    message = str(info.value)
    assert match in message and "fix:" in message and "\n" not in message, message
    return message


def test_a_regular_file_is_not_a_workdir(tmp_path):
    (tmp_path / "f").write_text("x")
    _refused(tmp_path / "f", "is a file, not a folder")
    _refused(tmp_path / "f" / "run", "is a file, not a folder")  # a parent in the way


def test_a_virtual_filesystem_is_named_as_such():
    _refused("/proc/distillspec-run", "virtual or special filesystem")


@pytest.mark.parametrize("code, match", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only filesystem"),
                                         (errno.ENOSPC, "no space left")])
def test_os_failures_become_one_line(tmp_path, monkeypatch, code, match):
    # Simulated (the tests run as root, and no read-only filesystem is at hand): the probe write fails.
    real_open = os.open

    def failing_open(path, flags, *args):
        if ".distillspec-write-test" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", failing_open)
    _refused(tmp_path / "run", match)


def test_a_writable_folder_passes_and_keeps_no_probe(tmp_path):
    wd.check_writable(tmp_path / "new" / "run")
    assert os.listdir(tmp_path / "new" / "run") == []


def test_main_prints_a_workdir_error_in_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = run_main(tmp_path / "f", check=False)
    assert proc.returncode == 1
    assert "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = run_main(tmp_path / "f", "--verbose", check=False)
    assert "Traceback" in proc.stderr  # --verbose shows where it came from


# ----------------------------------------------------------------------------------------------
# Whose folder it is
# ----------------------------------------------------------------------------------------------


def _hf_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_ours_is_refused(tmp_path, overwrite):
    folder = _hf_folder(tmp_path)
    with pytest.raises(wd.WorkdirError, match="not a DistillSpec workdir.*model.safetensors"):
        wd.check_ours(folder, experiment.OWNED, overwrite)


def test_overwrite_on_a_checkpoint_folder_deletes_nothing(tmp_path):
    folder = _hf_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = run_main(folder, "--config.overwrite=True", check=False)
    assert proc.returncode == 1 and "not a DistillSpec workdir" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_ours_by_marker_legacy_config_or_owned_names(tmp_path):
    marked = tmp_path / "marked"
    marked.mkdir()
    wd.write_marker(marked)
    (marked / "notes.txt").write_text("mine")
    wd.check_ours(marked, experiment.OWNED, overwrite=True)  # the marker says it is ours
    legacy = tmp_path / "legacy"  # made before the marker: its config.json is a run's
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"distill": {}, "generator": {}, "stages": "report"}))
    wd.check_ours(legacy, experiment.OWNED, overwrite=True)
    copied = tmp_path / "copied"  # data/ and eval_before.json copied in (the study does this)
    (copied / "data").mkdir(parents=True)
    (copied / "eval_before.json").write_text("[]")
    wd.check_ours(copied, experiment.OWNED, overwrite=False)
    with pytest.raises(wd.WorkdirError, match="overwrite=True deletes nothing"):
        wd.check_ours(copied, experiment.OWNED, overwrite=True)  # deleting needs the proof
    (marked / wd.MARKER_FILE).write_text(json.dumps({"schema": wd.MARKER_SCHEMA + 1}))
    with pytest.raises(wd.WorkdirError, match="newer checkout"):
        wd.check_ours(marked, experiment.OWNED, overwrite=False)


def test_discard_removes_only_what_a_run_wrote(tmp_path):
    for name in ("checkpoints", "data", "models", "plots"):
        (tmp_path / name).mkdir()
    for name in ("results.json", "metrics.jsonl", ".config.json.tmp", "notes.txt", wd.MARKER_FILE):
        (tmp_path / name).write_text("x")
    (tmp_path / "mine").mkdir()
    wd.discard_outputs(tmp_path, experiment.OWNED)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([wd.MARKER_FILE, "mine", "models", "notes.txt"])


# ----------------------------------------------------------------------------------------------
# The config guard
# ----------------------------------------------------------------------------------------------


def test_resume_with_changes_lets_named_fields_differ(tmp_path):
    stored = {"seed": 0, "distill": {"learning_rate": 1e-3, "steps": 10}, "data": {"max_prompt_len": 96}}
    (tmp_path / wd.CONFIG_FILE).write_text(json.dumps(stored))
    lower = json.loads(json.dumps(stored))
    lower["distill"]["learning_rate"] = 1e-4
    with pytest.raises(wd.ConfigGuardError, match="resume_with_changes=distill.learning_rate"):
        wd.check_config(tmp_path, lower, overwrite=False)
    assert wd.check_config(tmp_path, lower, overwrite=False, resume_with_changes=["distill.learning_rate"]) is False
    assert wd.check_config(tmp_path, lower, overwrite=False, resume_with_changes=["distill"]) is False
    other_data = json.loads(json.dumps(stored))
    other_data["data"]["max_prompt_len"] = 128
    with pytest.raises(wd.ConfigGuardError) as info:  # data fields cannot change on resume
        wd.check_config(tmp_path, other_data, overwrite=False)
    assert "--config.resume_with_changes" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# The lease
# ----------------------------------------------------------------------------------------------


def _write_lease(workdir, **fields) -> None:
    now = time.time()
    owner = lease.Owner(host=fields.get("host", socket.gethostname()), pid=fields.get("pid", os.getpid()),
                        token="t0", started=now - 100, heartbeat=fields.get("heartbeat", now),
                        slurm_job=fields.get("slurm_job", ""))
    (workdir / lease.LOCK_FILE).write_text(owner.text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_the_owner(tmp_path):
    with lease.WorkdirLock(str(tmp_path)):
        owner = json.loads((tmp_path / lease.LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(lease.WorkdirBusyError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                         rf"pid {os.getpid()}"):
            lease.WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / lease.LOCK_FILE).exists()  # released
    lease.WorkdirLock(str(tmp_path)).acquire()  # and free again


@pytest.mark.parametrize("stale", ["dead_pid", "expired_heartbeat", "same_slurm_job"])
def test_a_stale_lease_is_taken_over(tmp_path, monkeypatch, capsys, stale):
    if stale == "dead_pid":
        _write_lease(tmp_path, pid=_dead_pid())
    elif stale == "expired_heartbeat":
        _write_lease(tmp_path, host="another-host", heartbeat=time.time() - 1000)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _write_lease(tmp_path, host="node07", slurm_job="4242")
    lock = lease.WorkdirLock(str(tmp_path), expires_s=60)
    lock.acquire()
    try:
        assert "taking over the stale lease" in capsys.readouterr().out
        assert json.loads((tmp_path / lease.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_live_lease_on_another_host_is_respected(tmp_path):
    _write_lease(tmp_path, host="another-host", pid=1)
    with pytest.raises(lease.WorkdirBusyError, match="host another-host, pid 1"):
        lease.WorkdirLock(str(tmp_path), expires_s=60).acquire()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = lease.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    try:
        first = json.loads((tmp_path / lease.LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / lease.LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
        _write_lease(tmp_path, host="another-host")  # someone took it over
        deadline = time.monotonic() + 10
        while not lock.lost:
            assert time.monotonic() < deadline, "the takeover went unnoticed"
            time.sleep(0.02)
    finally:
        lock.release()
    assert json.loads((tmp_path / lease.LOCK_FILE).read_text())["host"] == "another-host"  # theirs stays


class _FakeBlob:
    """google.cloud.storage.Blob's generation preconditions, in memory."""

    def __init__(self, store: dict, name: str):
        self.store, self.name, self.generation = store, name, None

    def upload_from_string(self, text, content_type=None, if_generation_match=None):
        from google.api_core import exceptions

        current = self.store.get(self.name)
        if if_generation_match is not None and (current[1] if current else 0) != if_generation_match:
            raise exceptions.PreconditionFailed("generation mismatch")
        self.generation = (current[1] if current else 0) + 1
        self.store[self.name] = (text, self.generation)

    def download_as_text(self, if_generation_match=None):
        from google.api_core import exceptions

        current = self.store.get(self.name)
        if current is None:
            raise exceptions.NotFound("no such object")
        if if_generation_match is not None and current[1] != if_generation_match:
            raise exceptions.PreconditionFailed("generation mismatch")
        return current[0]

    def delete(self, if_generation_match=None):
        from google.api_core import exceptions

        current = self.store.get(self.name)
        if current is None:
            raise exceptions.NotFound("no such object")
        if if_generation_match is not None and current[1] != if_generation_match:
            raise exceptions.PreconditionFailed("generation mismatch")
        del self.store[self.name]


class _FakeBucket:
    def __init__(self, store):
        self.store = store

    def blob(self, name):
        return _FakeBlob(self.store, name)

    def get_blob(self, name):
        if name not in self.store:
            return None
        blob = _FakeBlob(self.store, name)
        blob.generation = self.store[name][1]
        return blob


class _FakeClient:
    def __init__(self):
        self.store: dict = {}

    def bucket(self, name):
        assert name == "bucket"
        return _FakeBucket(self.store)


def test_gcs_lease_uses_generation_preconditions():
    client = _FakeClient()
    key = f"runs/a/{lease.LOCK_FILE}"
    first = lease.WorkdirLock("gs://bucket/runs/a", client=client, heartbeat_s=3600)
    first.acquire()
    assert json.loads(client.store[key][0])["pid"] == os.getpid()
    with pytest.raises(lease.WorkdirBusyError, match="in use by another run"):
        lease.WorkdirLock("gs://bucket/runs/a", client=client).acquire()
    first.heartbeat()
    assert client.store[key][1] == 2  # rewritten on the condition of generation 1
    first.release()
    assert key not in client.store
    # A stale lease (its heartbeat expired) is deleted on the condition of its generation, then created anew.
    client.store[key] = (lease.Owner("other", 1, "t", 0.0, 0.0).text(), 7)
    second = lease.WorkdirLock("gs://bucket/runs/a", client=client, heartbeat_s=3600, expires_s=60)
    second.acquire()
    assert json.loads(client.store[key][0])["pid"] == os.getpid()
    # Someone else rewrote the lease: the heartbeat's precondition fails and the loss is noticed.
    client.store[key] = (client.store[key][0], 99)
    second.heartbeat()
    assert second.lost
    second.release()
    assert key in client.store  # not ours any more: left alone
