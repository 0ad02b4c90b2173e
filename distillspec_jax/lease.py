"""The workdir lock: one run at a time works in a workdir.

A lease file `<workdir>/distillspec.lock` names its owner (host, pid, SLURM job, start time) and carries a
heartbeat that a thread of the owner refreshes every `heartbeat_s`. It is created atomically, so of two
runs starting together exactly one gets it:
    local   open(O_CREAT | O_EXCL)
    gs://   an upload with the precondition if_generation_match=0 (the object must not exist); the
            heartbeat and the release are conditional on the generation the owner last wrote
A second run refuses at once, naming the owner. A lease is stale, and taken over with a warning, when
its owner is provably gone: a dead pid on this host, the same SLURM job (a requeued job's earlier
instance has ended), or a heartbeat older than `expires_s` (clocks of the hosts must roughly agree).
Taking over is atomic too: locally the stale file is renamed aside (one renamer wins) and checked to be
the one judged stale; on gs:// it is deleted on the condition of its generation.

Multi-host: process 0 holds the lease; the other processes only learn whether it got it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

import jax

from distillspec_jax import files
from distillspec_jax import sharding as shd
from distillspec_jax.errors import UserError

LOCK_FILE = "distillspec.lock"
LEASE_SCHEMA = 1
HEARTBEAT_S = 30.0  # seconds between heartbeats
EXPIRES_S = 150.0  # a lease whose heartbeat is older than this is stale (5 missed heartbeats)


class WorkdirBusyError(UserError):
    """Another live run holds the workdir's lease."""


# ----------------------------------------------------------------------------------------------
# Where the lease lives: a local file or a GCS object, each with atomic create and conditional writes
# ----------------------------------------------------------------------------------------------


class LocalLeaseFile:
    """The lease as a local file. `version` is the file's text (the owner's token and heartbeat)."""

    def __init__(self, path: str):
        self.path = path

    def create(self, text: str) -> Any | None:
        """Creates the file if it does not exist; returns its version, or None when it exists. The text
        is written to a temporary file first and hard-linked into place (atomic, and failing when the
        lease exists, like O_EXCL), so no reader ever sees a lease without its owner."""
        tmp = f"{self.path}.new-{secrets.token_hex(4)}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        except OSError:  # a filesystem without hard links: O_EXCL, then the text
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "w") as f:
                f.write(text)
        finally:
            os.unlink(tmp)
        return text

    def read(self) -> tuple[str, Any] | None:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return text, text

    def replace(self, text: str, version: Any) -> Any | None:
        """Rewrites the lease if it is still at `version`; returns the new version, or None."""
        current = self.read()
        if current is None or current[1] != version:
            return None
        files.write_text(self.path, text)  # temporary file + rename: readers never see half a lease
        return text

    def delete(self, version: Any) -> bool:
        """Removes the lease if it is at `version`: renamed aside first, so that of several runs that
        judged the same lease stale exactly one removes it, and a lease rewritten meanwhile survives."""
        aside = f"{self.path}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != version:  # not the lease judged stale: put it back unless a new one was created
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True


class GcsLeaseFile:
    """The lease as a GCS object. `version` is its generation; every write is a precondition on it."""

    def __init__(self, url: str, client=None):
        from google.api_core import exceptions

        bucket, _, name = url.removeprefix("gs://").partition("/")
        if client is None:
            from google.cloud import storage

            client = storage.Client()
        self._bucket, self._name = (lambda: client.bucket(bucket)), name
        self._blob = lambda: self._bucket().blob(name)
        self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)

    def create(self, text: str) -> Any | None:
        blob = self._blob()
        try:
            blob.upload_from_string(text, content_type="application/json", if_generation_match=0)
        except self._failed:
            return None
        return blob.generation

    def read(self) -> tuple[str, Any] | None:
        try:
            blob = self._bucket().get_blob(self._name)
            if blob is None:
                return None
            return blob.download_as_text(if_generation_match=blob.generation), blob.generation
        except self._failed:  # replaced or deleted between the two requests
            return None

    def replace(self, text: str, version: Any) -> Any | None:
        blob = self._blob()
        try:
            blob.upload_from_string(text, content_type="application/json", if_generation_match=version)
        except self._failed:
            return None
        return blob.generation

    def delete(self, version: Any) -> bool:
        try:
            self._blob().delete(if_generation_match=version)
        except self._failed:
            return False
        return True


def lease_file(workdir: str, client=None) -> LocalLeaseFile | GcsLeaseFile:
    target = f"{str(workdir).rstrip('/')}/{LOCK_FILE}"
    if files.is_remote(workdir):
        return GcsLeaseFile(target, client)
    return LocalLeaseFile(os.path.join(os.path.abspath(str(workdir)), LOCK_FILE))


# ----------------------------------------------------------------------------------------------
# The lease
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    token: str  # unique per run: tells our lease from another one with the same host and pid
    started: float  # unix time
    heartbeat: float  # unix time of the last heartbeat
    slurm_job: str = ""  # SLURM_JOB_ID of the owner, '' outside SLURM
    command: str = ""

    @staticmethod
    def parse(text: str) -> Owner | None:
        try:
            obj = json.loads(text)
            return Owner(host=str(obj["host"]), pid=int(obj["pid"]), token=str(obj["token"]),
                         started=float(obj["started"]), heartbeat=float(obj["heartbeat"]),
                         slurm_job=str(obj.get("slurm_job", "")), command=str(obj.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def text(self) -> str:
        return json.dumps({"schema": LEASE_SCHEMA, **dataclasses.asdict(self)}, indent=2) + "\n"

    def describe(self, now: float) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return (f"host {self.host}, pid {self.pid}{job}, started {_when(self.started)}, last heartbeat "
                f"{now - self.heartbeat:.0f}s ago")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(owner: Owner | None, now: float, expires_s: float, host: str, slurm_job: str) -> str | None:
    """Why a lease's owner is gone (None: it may be alive)."""
    if owner is None:
        return "the lease file is unreadable (a crash while it was first written)"
    if owner.host == host and not _pid_alive(owner.pid):
        return f"its process {owner.pid} on this host ({host}) has ended"
    if slurm_job and owner.slurm_job == slurm_job:
        return f"it belongs to an earlier instance of this SLURM job ({slurm_job}), which has ended"
    if now - owner.heartbeat > expires_s:
        return f"its heartbeat is {now - owner.heartbeat:.0f}s old (expires after {expires_s:.0f}s)"
    return None


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir's lease (process 0) for the block.

    Raises WorkdirBusyError at once when a live run holds it; takes over a stale lease with a warning.
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, expires_s: float = EXPIRES_S,
                 client=None):
        self.workdir = str(workdir)
        self.heartbeat_s, self.expires_s = heartbeat_s, expires_s
        self._client = client
        self._file = None
        self._owner: Owner | None = None
        self._version = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when the heartbeat finds another owner in the lease

    @property
    def path(self) -> str:
        return f"{self.workdir.rstrip('/')}/{LOCK_FILE}"

    def acquire(self) -> None:
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except Exception as err:  # noqa: BLE001 - every process must learn that process 0 failed
                error = err
        if not shd.all_processes_agree(error is None):
            raise error or WorkdirBusyError(f"process 0 could not take the lease {self.path}; its log says why")

    def _acquire(self) -> None:
        self._file = lease_file(self.workdir, self._client)
        now = time.time()
        host, slurm_job = socket.gethostname(), os.environ.get("SLURM_JOB_ID", "")
        self._owner = Owner(host=host, pid=os.getpid(), token=secrets.token_hex(8), started=now, heartbeat=now,
                            slurm_job=slurm_job, command=" ".join(sys.argv)[:300])
        for _ in range(5):  # a few rounds: another run may create or take over the lease in between
            self._version = self._file.create(self._owner.text())
            if self._version is not None:
                break
            current = self._file.read()
            if current is None:
                continue  # released meanwhile
            text, version = current
            owner = Owner.parse(text)
            reason = stale_reason(owner, time.time(), self.expires_s, host, slurm_job)
            if reason is None:
                raise WorkdirBusyError(
                    f"--workdir {self.workdir} is in use by another run ({owner.describe(time.time())}; lease "
                    f"{self.path}); fix: wait for that run to end or stop it, or pass another --workdir. A lease "
                    f"whose owner died is taken over by the next run (at once on the same host, else after "
                    f"{self.expires_s:.0f}s without a heartbeat)")
            logging.warning("taking over the stale lease %s: %s (was: %s)", self.path, reason,
                            owner.describe(time.time()) if owner else "unreadable")
            print(f"[run] taking over the stale lease {self.path}: {reason}", flush=True)
            self._file.delete(version)
        else:
            raise WorkdirBusyError(f"could not take the lease {self.path}: other runs keep creating it; fix: run "
                                   "one run per --workdir")
        self._thread = threading.Thread(target=self._beat, name="distillspec-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refreshes the lease's heartbeat (the thread's job; public for tests)."""
        if self._owner is None or self.lost:
            return
        owner = dataclasses.replace(self._owner, heartbeat=time.time())
        try:
            version = self._file.replace(owner.text(), self._version)
        except OSError as err:  # a transient storage error: the next heartbeat tries again
            logging.warning("could not refresh the lease %s: %s", self.path, err)
            return
        if version is None:
            self.lost = True
            logging.error("the lease %s was taken over by another run (this one looked dead to it); two runs "
                          "may now write this workdir: stop one of them", self.path)
            return
        self._owner, self._version = owner, version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._file is not None and self._owner is not None and not self.lost:
            try:
                self._file.delete(self._version)
            except OSError as err:
                logging.warning("could not remove the lease %s: %s (the next run takes it over)", self.path, err)
        self._owner = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
