"""The train step and loop: gradient accumulation equals the big batch, exact resume after a crash,
SIGTERM leaves a checkpoint that resumes, a NaN loss stops with the last good checkpoint kept, the
divergences go down when a tiny draft is distilled toward a tiny target, and bad settings fail before
anything compiles."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from distillspec_jax import checkpoint, tracking, train
from distillspec_jax import sharding as shd
from distillspec_jax.data import source as data_source
from distillspec_jax.models import qwen3
from distillspec_jax.train import loop
from tests import distill_helpers as h
from tests import sigterm_worker

REPO = pathlib.Path(__file__).resolve().parents[1]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    records = tracking.read_metrics(workdir / tracking.METRICS_FILE)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicated metrics lines: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _assert_params_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 0.0) -> float:
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= atol, f"parameters differ by {worst}"
    return worst


# ----------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------


def test_grad_accumulation_equals_big_batch():
    """Two micro-batches of 8 rows give the gradient and metrics of one 16-row batch (on a 2x2x2 mesh),
    AdaSPEC's top-k selection over the whole global batch included. The step applies the optimizer to
    exactly this gradient (`Distiller.gradients` is the step's own gradient function)."""
    mesh = shd.make_mesh(2, 2, 2)
    batch = h.synthetic_batch(0, 16, 16)
    divergence, fraction = "jsd", 0.4
    grads, metrics = {}, {}
    for accum in (1, 2):
        cfg = train.TrainConfig(divergence=divergence, selection="adaspec", adaspec_fraction=fraction, loss_chunk=5,
                                grad_accum_steps=accum)
        distiller = train.Distiller(cfg, h.make_draft(), h.make_target(), mesh, reference=h.make_draft(2))
        g, m = distiller.gradients(distiller.init_state().params, distiller.global_batch(batch))
        grads[accum], metrics[accum] = h.params_to_numpy(g), {k: float(v) for k, v in m.items()}
    print(f"accumulated vs big batch: {metrics[2]} vs {metrics[1]}")
    assert metrics[2].keys() == metrics[1].keys()
    for key in metrics[1]:
        np.testing.assert_allclose(metrics[2][key], metrics[1][key], rtol=1e-5, err_msg=key)
    scale = max(float(np.abs(g).max()) for g in grads[1].values())
    worst = _assert_params_equal(grads[2], grads[1], atol=1e-5 * scale)
    print(f"max gradient difference {worst:.2e} (largest gradient entry {scale:.2e})")


# ----------------------------------------------------------------------------------------------
# Checkpoints, resume, SIGTERM, NaN
# ----------------------------------------------------------------------------------------------

LOOP_CFG = train.TrainConfig(divergence="fkl", learning_rate=1e-2, warmup_steps=2, steps=6, loss_chunk=8,
                             checkpoint_every=3, keep_checkpoints=2, log_every=1)
LOOP_BATCH, LOOP_SEQ = 4, 16


def _distiller(cfg: train.TrainConfig = LOOP_CFG) -> train.Distiller:
    return train.Distiller(cfg, h.make_draft(), h.make_target(), shd.single_device_mesh())


def test_resume_after_crash_is_exact(tmp_path):
    straight = train.run(_distiller(), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), tmp_path / "straight")
    assert straight.step == 6 and not straight.preempted

    # The source fails while fetching the batch of step 5: steps 1-4 ran and were logged, the last
    # checkpoint is step 3. Step 4 is lost and must be recomputed identically.
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(_distiller(), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ, fail_at=4), crashed)
    assert sorted(_losses(crashed)) == [1, 2, 3, 4]
    assert checkpoint.Checkpointer(crashed, 2).latest_step() == 3

    # The resumed run's seed is different: the data RNG must come from the checkpoint, not the config.
    resumed = train.run(_distiller(dataclasses.replace(LOOP_CFG, seed=LOOP_CFG.seed + 1)),
                        h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), crashed)
    assert (resumed.step, resumed.data_position) == (6, 6)
    want, got = _losses(tmp_path / "straight"), _losses(crashed)
    print(f"straight losses {[want[s] for s in sorted(want)]}\nresumed losses  {[got[s] for s in sorted(got)]}")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # each step once: the crashed run's step 4 line was replaced
    assert got == want
    _assert_params_equal(h.params_to_numpy(resumed.state.params), h.params_to_numpy(straight.state.params))
    # keep_checkpoints=2: steps 3 and 6 remain.
    assert checkpoint.Checkpointer(crashed, 2).manager.all_steps() == [3, 6]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "tests.sigterm_worker", str(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(tracking.read_metrics(workdir / tracking.METRICS_FILE)) < 2:
            assert proc.poll() is None, f"worker exited early: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    stopped = result["step"]
    assert result["preempted"] and 2 <= stopped < 1000
    # checkpoint_every is 1000: this checkpoint can only come from the signal handler.
    assert checkpoint.Checkpointer(workdir, 2).latest_step() == stopped

    cfg = train.TrainConfig(**{**sigterm_worker.SIGTERM_CFG, "steps": stopped + 2})
    resumed = train.run(_distiller(cfg), h.SyntheticSource(sigterm_worker.BATCH, sigterm_worker.SEQ), workdir)
    assert (resumed.step, resumed.data_position, resumed.preempted) == (stopped + 2, stopped + 2, False)
    assert sorted(_losses(workdir)) == list(range(1, stopped + 3))


def test_data_source_sees_the_current_draft(tmp_path):
    """The on-policy hook: at each position the source gets the draft with the parameters of all the
    steps so far (what an on-policy generator samples from)."""
    seen = []

    def source(position, context):
        while True:
            seen.append(h.params_to_numpy(nnx.to_pure_dict(nnx.state(context.draft()))))
            yield h.synthetic_batch(position, LOOP_BATCH, LOOP_SEQ)
            position += 1

    cfg = dataclasses.replace(LOOP_CFG, steps=3, checkpoint_every=2)
    distiller = _distiller(cfg)
    initial = h.params_to_numpy(nnx.to_pure_dict(nnx.state(h.make_draft())))
    result = train.run(distiller, source, tmp_path)
    assert len(seen) == 3
    _assert_params_equal(seen[0], initial)
    after_two = checkpoint.Checkpointer(tmp_path, 2).restore(distiller.abstract_state(), step=2)[1]
    _assert_params_equal(seen[2], h.params_to_numpy(after_two.params))
    assert np.abs(seen[2]["embed"] - seen[1]["embed"]).max() > 0
    assert result.step == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = dataclasses.replace(LOOP_CFG, checkpoint_every=2)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 5: loss=nan.*checkpoint is step 4"):
        train.run(_distiller(cfg), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ, nan_at=4), tmp_path)
    checkpointer = checkpoint.Checkpointer(tmp_path, 2)
    assert checkpointer.latest_step() == 4
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
    step, state, position, _ = checkpointer.restore(_distiller(cfg).abstract_state())
    assert (step, position) == (4, 4)
    assert all(np.isfinite(x).all() for x in h.params_to_numpy(state.params).values())


def _count_pulls(monkeypatch) -> list[list[int]]:
    """Records the steps of every transfer of metrics from the device (the loop's only wait on a step)."""
    pulls, pull = [], loop._pull
    monkeypatch.setattr(loop, "_pull", lambda pending: pulls.append([p.step for p in pending]) or pull(pending))
    return pulls


RATES = ("tokens_per_s", "positions_per_s")  # wall-clock figures: the only logged values timing may change


def test_metrics_pulled_every_log_every_are_those_pulled_every_step(tmp_path, monkeypatch):
    """With log_every = 3 the loop pulls the metrics twice in 6 steps (no wait per step), and logs, checkpoints and
    returns exactly the values a loop that pulls after every step gives at those steps."""
    pulls = _count_pulls(monkeypatch)
    every = train.run(_distiller(dataclasses.replace(LOOP_CFG, checkpoint_every=6)),
                      h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), tmp_path / "every")
    assert pulls == [[1], [2], [3], [4], [5], [6]]
    pulls.clear()
    sparse = train.run(_distiller(dataclasses.replace(LOOP_CFG, checkpoint_every=6, log_every=3)),
                       h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), tmp_path / "sparse")
    assert pulls == [[1, 2, 3], [4, 5, 6]]
    logged = {r["step"]: r for r in tracking.read_metrics(tmp_path / "every" / tracking.METRICS_FILE)}
    sparse_logged = tracking.read_metrics(tmp_path / "sparse" / tracking.METRICS_FILE)
    assert [r["step"] for r in sparse_logged] == [3, 6]
    for record in sparse_logged:
        want = {k: v for k, v in logged[record["step"]].items() if k not in RATES}
        assert {k: v for k, v in record.items() if k not in RATES} == want
    assert sparse.last_metrics == every.last_metrics and "finite" not in sparse.last_metrics
    _assert_params_equal(h.params_to_numpy(sparse.state.params), h.params_to_numpy(every.state.params))


def test_the_guard_finds_a_nan_between_pulls_and_saves_nothing_after_it(tmp_path, monkeypatch):
    """A NaN at step 5 with pulls every 4 steps: the pull before step 8's checkpoint finds it, names step 5, and
    saves neither step 5's state nor a later one."""
    pulls = _count_pulls(monkeypatch)
    cfg = dataclasses.replace(LOOP_CFG, steps=8, log_every=4, checkpoint_every=4)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 5: loss=nan.*checkpoint is step 4"):
        train.run(_distiller(cfg), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ, nan_at=4), tmp_path)
    assert pulls == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert checkpoint.Checkpointer(tmp_path, 2).latest_step() == 4
    assert sorted(_losses(tmp_path)) == [4]


def test_unrolled_layers_and_loss_chunks_take_the_same_step():
    """distill.unroll_layers lays out the layers and loss chunks one after another (what XLA's cost analysis needs to
    count them all); the step it computes is the looped one's."""
    steps = []
    for unroll in (False, True):
        distiller = _distiller(dataclasses.replace(LOOP_CFG, unroll_layers=unroll))
        state, metrics = distiller.step(distiller.init_state(),
                                        distiller.global_batch(h.synthetic_batch(0, LOOP_BATCH, LOOP_SEQ)))
        steps.append((h.params_to_numpy(state.params), jax.device_get(metrics)))
    (looped, looped_metrics), (unrolled, unrolled_metrics) = steps
    assert LOOP_SEQ > LOOP_CFG.loss_chunk  # the loss really is chunked
    _assert_params_equal(unrolled, looped, atol=1e-6)
    for name, value in looped_metrics.items():
        np.testing.assert_allclose(unrolled_metrics[name], value, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------------

LEARN_STEPS, LEARN_BATCH, LEARN_SEQ = 300, 16, 16
EVAL_POSITION = 10**6  # a batch the training stream never yields


def _distill(divergence: str, fraction: float | None = None, reference=None, target_cfg=h.TARGET_CFG):
    """Distils a fresh 1-layer draft toward the 2-layer target; (metrics before, after, trained draft)."""
    cfg = train.TrainConfig(divergence=divergence, **h.selection(fraction), learning_rate=3e-3, warmup_steps=20,
                            steps=LEARN_STEPS, loss_chunk=8)
    distiller = train.Distiller(cfg, h.make_draft(), h.make_target(cfg=target_cfg), shd.single_device_mesh(),
                                reference)
    state = distiller.init_state()
    eval_batch = distiller.global_batch(h.synthetic_batch(EVAL_POSITION, 64, LEARN_SEQ))
    before = {k: float(v) for k, v in distiller.loss_metrics(state.params, eval_batch).items()}
    stream = h.SyntheticSource(LEARN_BATCH, LEARN_SEQ)(0, None)
    for _ in range(LEARN_STEPS):
        state, _ = distiller.step(state, distiller.global_batch(next(stream)))
    after = {k: float(v) for k, v in distiller.loss_metrics(state.params, eval_batch).items()}
    return before, after, distiller.draft_model(state.params)


@pytest.fixture(scope="module")
def fkl_run():
    """FKL distillation; its draft is also AdaSPEC's reference (same init, distilled with FKL)."""
    return _distill("fkl")


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "adaspec"])
def test_distillation_lowers_divergence_and_raises_acceptance(name, fkl_run):
    if name == "fkl":
        before, after, _ = fkl_run
    elif name == "adaspec":
        before, after, _ = _distill("fkl", fraction=0.4, reference=fkl_run[2])
    else:
        before, after, _ = _distill(name)
    print(f"\n{name}: divergence {before['divergence']:.4f} -> {after['divergence']:.4f}, "
          f"1 - TVD {before['acceptance']:.4f} -> {after['acceptance']:.4f} ({LEARN_STEPS} steps, held-out batch)")
    assert after["divergence"] < 0.6 * before["divergence"]
    assert after["acceptance"] > before["acceptance"] + 0.15


def test_distilling_a_dense_draft_toward_an_moe_target_lowers_divergence():
    before, after, _ = _distill("jsd", target_cfg=h.MOE_TARGET_CFG)
    print(f"\njsd toward an MoE target: divergence {before['divergence']:.4f} -> {after['divergence']:.4f}, "
          f"1 - TVD {before['acceptance']:.4f} -> {after['acceptance']:.4f}")
    assert after["divergence"] < 0.6 * before["divergence"]
    assert after["acceptance"] > before["acceptance"] + 0.15


def test_a_sharded_step_with_an_moe_target_equals_one_device():
    """Experts over fsdp, their width over tensor: one distillation step on 8 devices gives the one-device loss
    and parameters."""
    cfg = train.TrainConfig(divergence="fkl", loss_chunk=8, warmup_steps=0, steps=2)
    batch = h.synthetic_batch(0, 8, 16)
    results = {}
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = shd.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        distiller = train.Distiller(cfg, h.make_draft(), h.make_target(cfg=h.MOE_TARGET_CFG), mesh)
        state, metrics = distiller.step(distiller.init_state(), distiller.global_batch(batch))
        results[shape] = (float(metrics["loss"]), jax.device_get(state.params))
    (loss_1, params_1), (loss_8, params_8) = results.values()
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_8, params_1)


def test_bfloat16_target_runs_close_to_float32():
    """The default target numerics (bfloat16 compute) give nearly the float32 loss."""
    cfg = train.TrainConfig(divergence="fkl", loss_chunk=8, warmup_steps=0)
    mesh = shd.single_device_mesh()
    batch = h.synthetic_batch(0, 8, 16)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        target = h.make_target(cfg=h.TARGET_CFG.replace(dtype=dtype))
        distiller = train.Distiller(cfg, h.make_draft(), target, mesh)
        state = distiller.init_state()
        losses[dtype] = float(distiller.loss_metrics(state.params, distiller.global_batch(batch))["loss"])
    print(f"FKL with a float32 target {losses['float32']:.5f}, bfloat16 target {losses['bfloat16']:.5f}")
    assert losses["bfloat16"] != losses["float32"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# Settings and errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_file", ["fkl", "rkl", "jsd", "tvd", "adaspec"])
@pytest.mark.parametrize("preset", ["", "0.6b-1.7b", "1.7b-32b", "tiny", "study", "test"])
def test_config_distill_is_train_config_in_one_hop(config_file, preset):
    """config.distill's fields are TrainConfig's (the loss's among them, declared once in LossSpec), with the
    same names and nothing left over: the distill stage builds it as TrainConfig(**c.distill, seed=c.seed,
    stored_teacher=...), the last from config.generator (a generator that stores the teacher's logits)."""
    import importlib

    from distillspec_jax.stages import distill as distill_stage

    c = importlib.import_module(f"configs.{config_file}").get_config(preset)
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert set(c.distill.keys()) == fields - {"seed", "stored_teacher"}
    cfg = distill_stage.train_config(c)
    assert all(getattr(cfg, k) == c.distill[k] for k in c.distill.keys()) and cfg.seed == c.seed
    assert cfg.uses_reference == (config_file == "adaspec")
    assert not cfg.stored_teacher
    c.generator.kind = "target_logits"
    assert distill_stage.train_config(c).stored_teacher and not distill_stage.train_config(c).uses_target


def test_the_reference_run_of_adaspec_is_fkl_on_every_token():
    cfg = train.TrainConfig(divergence="jsd", selection="adaspec", steps=40, warmup_steps=30, reference_steps=10)
    ref = cfg.reference_config()
    assert (ref.divergence, ref.selection, ref.steps, ref.warmup_steps) == ("fkl", "all", 10, 10)
    assert dataclasses.replace(cfg, reference_steps=0).reference_config().steps == 40
    with pytest.raises(ValueError, match="uses no reference draft"):
        train.TrainConfig().reference_config()


def test_a_run_that_is_all_warmup_builds_its_optimizer():
    # optax's warmup + cosine schedule raises for a cosine part of 0 steps (warmup == total steps).
    cfg = train.TrainConfig(learning_rate=1e-3, warmup_steps=4, steps=4)
    train.make_optimizer(cfg)
    lr = train.learning_rate_schedule(cfg)
    assert [float(lr(t)) for t in range(5)] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_learning_rate_schedule_warmup_and_cosine_floor():
    cfg = train.TrainConfig(learning_rate=2e-3, warmup_steps=10, steps=110, end_lr_fraction=0.1)
    lr = train.learning_rate_schedule(cfg)
    np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [0.0, 1e-3, 2e-3], rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 2e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(float(lr(110)), 2e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"divergence": "kld"}, "unknown divergence 'kld'; choose one of"),
    ({"divergence": "jsd", "jsd_beta": 2.0}, r"jsd_beta must be in \[0, 1\]"),
    ({"adaspec_fraction": 0.0}, r"adaspec_fraction must be in \(0, 1\]"),
    ({"adaspec_fraction": 1.5}, r"adaspec_fraction must be in \(0, 1\]"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be >= 1"),
    ({"warmup_steps": 20, "steps": 10}, "warmup_steps must be in"),
])
def test_bad_train_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kwargs)


@pytest.mark.parametrize("change", [dict(vocab_size=128), dict(num_real_tokens=h.REAL_VOCAB - 1)],
                         ids=["vocab_size", "real_vocab_size"])
def test_different_vocabularies_raise(change):
    target = h.make_target(cfg=h.TARGET_CFG.replace(**change))
    with pytest.raises(ValueError, match="vocabularies differ"):
        train.Distiller(train.TrainConfig(), h.make_draft(), target, shd.single_device_mesh())


def test_an_moe_draft_with_a_dense_target_of_another_vocabulary_raises():
    draft = qwen3.init_model(h.MOE_TARGET_CFG.replace(vocab_size=128, num_real_tokens=None, num_hidden_layers=1))
    with pytest.raises(ValueError, match="vocabularies differ"):
        train.Distiller(train.TrainConfig(), draft, h.make_target(), shd.single_device_mesh())


def test_adaspec_without_reference_raises():
    with pytest.raises(ValueError, match="needs the reference draft"):
        train.Distiller(train.TrainConfig(selection="adaspec"), h.make_draft(), h.make_target(),
                        shd.single_device_mesh())


def test_batch_that_does_not_divide_raises_before_compiling():
    mesh = shd.make_mesh(4, 2, 1)
    distiller = train.Distiller(train.TrainConfig(grad_accum_steps=2), h.make_draft(), h.make_target(), mesh)
    bad = {"tokens": np.zeros((12, 8), np.int32), "loss_mask": np.zeros((12, 8), np.float32)}
    with pytest.raises(ValueError, match=r"global batch 12 does not divide over data x fsdp = 4 x 2"):
        distiller.global_batch(bad)
    # 24 rows divide over 8 shards, but each of the 2 micro-batches would have 12.
    with pytest.raises(ValueError, match=r"micro-batch \(global batch / 2\) 12 does not divide"):
        distiller.check_batch({"tokens": np.zeros((24, 8), np.int32), "loss_mask": np.zeros((24, 8), np.float32)})
    with pytest.raises(ValueError, match="does not split into grad_accum_steps=2"):
        distiller.check_batch({"tokens": np.zeros((9, 8), np.int32), "loss_mask": np.zeros((9, 8), np.float32)})
    with pytest.raises(ValueError, match="batch lacks"):
        distiller.check_batch({"tokens": np.zeros((16, 8), np.int32)})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        distiller.check_batch({"tokens": np.full((16, 8), h.VOCAB, np.int32), "loss_mask": np.ones((16, 8), np.float32)})
    assert distiller._step._cache_size() == 0  # nothing was compiled


def test_mesh_that_does_not_fill_the_devices_raises():
    with pytest.raises(ValueError, match="do not multiply to the device count 8"):
        shd.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="8 is not a multiple of 3"):
        shd.make_mesh(-1, 3, 1)


# ----------------------------------------------------------------------------------------------
# Rematerialisation belongs to the training step's backward pass only (design §9)
# ----------------------------------------------------------------------------------------------


def test_remat_training_then_decoding_the_draft_works():
    """The real presets train with remat=True and then decode the same draft (on-policy data, evaluation).
    Before remat moved out of the model config, every such decode died with flax's TraceContextError."""
    from distillspec_jax import generate as gen
    from distillspec_jax import speculative
    from distillspec_jax.sampling import Sampler

    cfg = dataclasses.replace(LOOP_CFG, remat=True)
    distiller = _distiller(cfg)
    state = distiller.init_state()
    source = h.SyntheticSource(LOOP_BATCH, LOOP_SEQ)(0, None)
    state, metrics = distiller.step(state, distiller.global_batch(next(source)))
    assert np.isfinite(float(metrics["loss"]))
    draft = distiller.draft_model(state.params)
    prompts = np.asarray(h.synthetic_batch(0, 2, 8)["tokens"])
    lens = np.asarray([8, 5], np.int32)
    out = gen.generate(draft, prompts, lens, 4, Sampler(temperature=1.0), jax.random.key(0))
    assert out.tokens.shape == (2, 4)
    spec_out = speculative.speculative_generate(h.make_target(), draft, prompts, lens, 4, 2, Sampler(temperature=0.0),
                                                jax.random.key(0))
    assert spec_out.tokens.shape[0] == 2



def _step_temp_bytes(remat: bool) -> int:
    cfg = dataclasses.replace(LOOP_CFG, remat=remat, loss_chunk=0)
    deep = h.DRAFT_CFG.replace(num_hidden_layers=8)
    distiller = train.Distiller(cfg, h.make_draft(cfg=deep), h.make_target(), shd.single_device_mesh())
    batch = distiller.global_batch(h.synthetic_batch(0, 8, 256))
    compiled = distiller._step.lower(distiller.abstract_state(), distiller.frozen,
                                     {k: batch[k] for k in data_source.BATCH_KEYS}).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_shrinks_the_compiled_steps_temporaries():
    with_remat, without = _step_temp_bytes(True), _step_temp_bytes(False)
    print(f"train step temporaries: remat {with_remat / 2**20:.2f} MiB, no remat {without / 2**20:.2f} MiB")
    assert with_remat < 0.8 * without


# ----------------------------------------------------------------------------------------------
# Faults: a damaged checkpoint, a run that resumes at its end, a NaN before any checkpoint, positions
# ----------------------------------------------------------------------------------------------

FALLBACK_CFG = dataclasses.replace(LOOP_CFG, checkpoint_every=2, keep_checkpoints=3)


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory):
    """An uninterrupted run, and one that crashed after step 5 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("fallback")
    straight = train.run(_distiller(FALLBACK_CFG), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), root / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(_distiller(FALLBACK_CFG), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ, fail_at=5),
                  root / "crashed")
    resumer = _distiller(FALLBACK_CFG)  # resumed runs never need the initial draft: one compiled step serves all
    resumer.release_initial_params()
    return straight, root, resumer


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncated_data_file":
        biggest = max((p for p in step_dir.joinpath("state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 2)
    elif how == "missing_meta":
        (step_dir / "meta" / "metadata").unlink()
    else:
        import shutil

        shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated_data_file", "missing_meta", "missing_state"])
def test_a_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(fallback_runs, tmp_path, capsys, how):
    straight, root, resumer = fallback_runs
    crashed = _copy(root / "crashed", tmp_path / "crashed")
    _corrupt(crashed / checkpoint.CHECKPOINT_DIR / "4", how)
    resumed = train.run(resumer, h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), crashed)
    out = capsys.readouterr().out
    assert "checkpoint step 4" in out and "unreadable" in out and "resuming from step 2" in out
    assert (crashed / checkpoint.CHECKPOINT_DIR / "corrupt-4").is_dir()  # kept aside for a post-mortem
    assert resumed.step == 6 and _losses(crashed) == _losses(root / "straight")
    _assert_params_equal(h.params_to_numpy(resumed.state.params), h.params_to_numpy(straight.state.params))


def test_no_restorable_checkpoint_is_a_clear_error(fallback_runs, tmp_path):
    _, root, resumer = fallback_runs
    crashed = _copy(root / "crashed", tmp_path / "crashed")
    for step in ("2", "4"):
        _corrupt(crashed / checkpoint.CHECKPOINT_DIR / step, "missing_meta")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .*checkpoints restores.*fix: restore"):
        train.run(resumer, h.SyntheticSource(LOOP_BATCH, LOOP_SEQ), crashed)


def test_a_run_resumed_at_its_end_reports_the_last_metrics(fallback_runs, tmp_path):
    # Killed after the final checkpoint, before the caller wrote its summary: the rerun trains no step,
    # and the final metrics come from the checkpoint.
    straight, root, resumer = fallback_runs
    again = train.run(resumer, h.SyntheticSource(LOOP_BATCH, LOOP_SEQ),
                      _copy(root / "straight", tmp_path / "straight"))
    assert again.step == straight.step == 6
    assert again.last_metrics == straight.last_metrics and straight.last_metrics["loss"] > 0


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(train.NonFiniteLossError, match=r"step 2: loss=nan.*No checkpoint has been saved yet.*step 0"):
        train.run(_distiller(), h.SyntheticSource(LOOP_BATCH, LOOP_SEQ, nan_at=1), tmp_path)


def test_batches_longer_than_the_models_positions_are_refused():
    distiller = _distiller()
    too_long = distiller.max_positions + 1
    with pytest.raises(ValueError, match=f"{too_long} positions exceed the models' max_position_embeddings"):
        distiller.check_batch({"tokens": np.zeros((4, too_long), np.int32),
                               "loss_mask": np.zeros((4, too_long), np.float32)})


def test_a_checkpoint_of_the_per_layer_layout_is_named_not_moved_aside(fallback_runs, tmp_path):
    # Written before the layers were stacked: params['layers'] held one subtree per layer ('0', '1', ...).
    _, _, resumer = fallback_runs
    stacked = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), resumer.abstract_state().params)
    layers = stacked["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    old = {**stacked, "layers": {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)}}
    saver = checkpoint.Checkpointer(tmp_path, 2)
    saver.save(4, train.TrainState(old, train.make_optimizer(FALLBACK_CFG).init(old)), 4, jax.random.key(0))
    saver.wait()
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4 .* another parameter layout .*layers.*overwrite=True"):
        checkpoint.Checkpointer(tmp_path, 2).restore_newest(resumer.abstract_state())
    assert (tmp_path / checkpoint.CHECKPOINT_DIR / "4").is_dir()  # kept where it was: it is not damaged
