"""Mesh construction, global batch assembly from host slices, and the train step's independence from
sharding: 8 fake devices (8x1x1 and 2x2x2 meshes) and two processes x 4 devices through jax.distributed
all give the single-device losses and parameters."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from distillspec_jax import sharding as shd
from tests import distill_helpers as h

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # float32: reductions in another order only


def test_make_mesh_takes_the_rest_and_names_its_axes():
    mesh = shd.make_mesh(-1, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh(2, -1, 1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        shd.make_mesh(-1, -1, 2)
    with pytest.raises(ValueError, match="do not multiply to the device count 8"):
        shd.make_mesh(4, 1, 1)


def test_global_batch_from_the_host_slice():
    mesh = shd.make_mesh(4, 2, 1)
    rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    assert shd.host_slice(8) == slice(0, 8)  # one process: its slice is the whole batch
    batch = shd.global_batch(rows[shd.host_slice(8)], mesh)
    assert batch.shape == (8, 5) and batch.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    # Each of the 8 devices holds one row, in order.
    for shard in batch.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
        assert np.asarray(shard.data).shape == (1, 5)
    np.testing.assert_array_equal(shd.to_host(batch), rows)
    with pytest.raises(ValueError, match="global batch 6 does not divide over data x fsdp = 4 x 2"):
        shd.global_batch(rows[:6], mesh)


def test_place_puts_host_values_on_the_rules_shardings():
    mesh = shd.make_mesh(2, 2, 2)
    model = h.make_draft()
    state = nnx.state(model)
    shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh))
    placed = shd.place(nnx.to_pure_dict(state), shardings)
    assert placed["lm_head"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert placed["layers"]["attn"]["q_proj"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(shd.to_host(placed["embed"]), np.asarray(model.embed[...]))
    assert shd.place(placed, shardings)["embed"] is placed["embed"]  # already there: no copy


@pytest.fixture(scope="module")
def runs():
    """(losses, parameters) of the sharding comparison's steps per mesh shape, computed once."""
    cache = {}

    def get(mesh_shape: tuple[int, int, int]):
        if mesh_shape not in cache:
            mesh = shd.single_device_mesh() if mesh_shape == (1, 1, 1) else shd.make_mesh(*mesh_shape)
            cfg = h.SHARDING_CFG
            cache[mesh_shape] = h.run_steps(cfg, mesh, cfg.steps, h.SHARDING_BATCH, h.SHARDING_SEQ,
                                            draft_layer_scale=h.SHARDING_DRAFT_SCALE)
        return cache[mesh_shape]

    return get


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)], ids=["8x1x1", "2x2x2"])
def test_sharded_steps_equal_single_device(mesh_shape, runs):
    losses, params = runs(mesh_shape)
    want_losses, want_params = runs((1, 1, 1))
    loss_diff = float(np.abs(np.subtract(losses, want_losses)).max())
    param_diff = max(float(np.abs(params[k] - want_params[k]).max()) for k in want_params)
    print(f"\nmesh {mesh_shape}: losses {losses}\n  single device {want_losses}\n"
          f"  max |loss diff| {loss_diff:.2e}, max |param diff| {param_diff:.2e}")
    assert loss_diff <= TOLERANCE and param_diff <= TOLERANCE
    initial = h.params_to_numpy(nnx.to_pure_dict(nnx.state(h.make_draft(0, layer_scale=h.SHARDING_DRAFT_SCALE))))
    moved = max(float(np.abs(want_params[k] - initial[k]).max()) for k in initial)
    print(f"  largest parameter change over the steps {moved:.2e}")
    assert moved > 20 * TOLERANCE  # the steps changed the parameters far more than the tolerance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out: pathlib.Path, workdir: pathlib.Path, *args: str) -> list[subprocess.Popen]:
    """Two tests.multihost_worker processes x 4 CPU devices, jax.distributed over localhost."""
    port, procs = _free_port(), []
    for process_id in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process_id)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(out), str(workdir), *args],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish_cleanly(procs: list[subprocess.Popen]) -> None:
    """Waits for every worker (killing any left after a failure) and asserts that each exited with 0."""
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def test_two_processes_equal_one_process(tmp_path, runs):
    """Two processes x 4 CPU devices (jax.distributed over localhost, gloo collectives), each feeding
    its own host slice of every batch through the training loop (checkpoints written by both), against
    this process's 8 devices, both on a 2x2x2 mesh."""
    want_losses, want_params = runs((2, 2, 2))
    out = tmp_path / "multihost.json"
    _finish_cleanly(_start_workers(out, tmp_path / "run"))
    result = json.loads(out.read_text())
    assert (result["process_count"], result["devices"], result["checkpoints"]) == (2, 8, [2, 3])
    params = dict(np.load(out.with_suffix(".npz")))
    loss_diff = float(np.abs(np.subtract(result["losses"], want_losses)).max())
    param_diff = max(float(np.abs(params[k] - want_params[k]).max()) for k in want_params)
    print(f"\n2 processes x 4 devices: losses {result['losses']}\n1 process x 8 devices: {want_losses}\n"
          f"  max |loss diff| {loss_diff:.2e}, max |param diff| {param_diff:.2e}")
    assert loss_diff <= TOLERANCE and param_diff <= TOLERANCE
    # And both equal the single-device run.
    assert float(np.abs(np.subtract(result["losses"], runs((1, 1, 1))[0])).max()) <= TOLERANCE


def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """A preemption notice reaches one host of a two-process run whose steps never wait on the devices (metrics
    and checkpoints every 1000 steps): both processes stop after the same step, with one checkpoint at it, and
    exit cleanly."""
    out = tmp_path / "sigterm"
    procs = _start_workers(out, tmp_path / "run", "sigterm")
    try:
        deadline = time.monotonic() + 180
        while not all((p := pathlib.Path(f"{out}.{i}.position")).exists() and int(p.read_text() or 0) >= 3
                      for i in range(2)):
            for proc in procs:
                assert proc.poll() is None, f"a worker exited early:\n{proc.communicate()[0][-4000:]}"
            assert time.monotonic() < deadline, "the workers made no progress"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    _finish_cleanly(procs)
    results = [json.loads(pathlib.Path(f"{out}.{i}.json").read_text()) for i in range(2)]
    print(f"\nafter SIGTERM to process 1: {results}")
    assert results[0] == results[1]
    assert results[0]["preempted"] and 3 <= results[0]["step"] < 1000
    assert results[0]["checkpoint"] == results[0]["step"]  # checkpoint_every is 1000: the stop's checkpoint
