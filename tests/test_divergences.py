"""The divergences against direct float64 NumPy computations and their mathematical properties."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import divergences as dv
from distillspec_jax import objective
from distillspec_jax.models import qwen3
from tests.loss_reference import KL_DIVERGENCES, REAL_V, TEMPERATURE, B, V, loss_spec, np_loss, random_inputs

CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"jsd_beta": 0.5}), ("jsd", {"jsd_beta": 0.2}), ("tvd", {}), ("ce", {})]


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}{e.get('jsd_beta', '')}" for n, e in CASES])
def test_divergence_matches_numpy(name, extra):
    p, q, _, mask, labels = random_inputs(0)
    spec = loss_spec(divergence=name, temperature=TEMPERATURE, chunk=0, **extra)
    loss, metrics = objective.loss_from_logits(spec, p, q, mask, REAL_V, labels)
    want_loss, want_acceptance = np_loss(name, p, q, mask, beta=extra.get("jsd_beta", 0.5), labels=labels)
    print(f"{name}{extra}: loss {float(loss):.6f} numpy {want_loss:.6f}")
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["acceptance"]), want_acceptance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["divergence"]), want_loss, rtol=1e-5, atol=1e-6)
    assert float(metrics["tokens"]) == mask[:, :-1].sum()


@pytest.mark.parametrize("name", KL_DIVERGENCES)
def test_divergence_zero_iff_distributions_equal(name):
    p, q, *_ = random_inputs(1)
    fn = loss_spec(divergence=name).divergence_fn()
    same = np.asarray(fn(jnp.asarray(p), jnp.asarray(p)))
    differ = np.asarray(fn(jnp.asarray(p), jnp.asarray(q)))
    assert np.abs(same).max() < 1e-6
    assert differ.min() > 1e-4
    # A shift of all logits is the same distribution: still zero.
    assert np.abs(np.asarray(fn(jnp.asarray(p), jnp.asarray(p + 3.0)))).max() < 1e-5


def test_jsd_half_symmetric_and_bounded_by_log2():
    p, q, *_ = random_inputs(2, scale=6.0)
    jsd = loss_spec(divergence="jsd", jsd_beta=0.5).divergence_fn()
    pq, qp = np.asarray(jsd(jnp.asarray(p), jnp.asarray(q))), np.asarray(jsd(jnp.asarray(q), jnp.asarray(p)))
    np.testing.assert_allclose(pq, qp, rtol=1e-5, atol=1e-7)
    assert pq.max() <= math.log(2) + 1e-6
    # Disjoint supports reach the bound log 2.
    disjoint_p = np.where(np.arange(V) < V // 2, 0.0, qwen3.MASK_VALUE)[None].astype(np.float32)
    disjoint_q = np.where(np.arange(V) < V // 2, qwen3.MASK_VALUE, 0.0)[None].astype(np.float32)
    np.testing.assert_allclose(float(jsd(jnp.asarray(disjoint_p), jnp.asarray(disjoint_q))[0]), math.log(2), rtol=1e-5)


def test_tvd_in_unit_interval():
    p, q, *_ = random_inputs(3, scale=5.0)
    tvd = loss_spec(divergence="tvd").divergence_fn()
    values = np.asarray(tvd(jnp.asarray(p), jnp.asarray(q)))
    assert values.min() >= 0 and values.max() <= 1
    one_hot_a = np.asarray(dv.one_hot_logits(jnp.array([[0]]), V))
    one_hot_b = np.asarray(dv.one_hot_logits(jnp.array([[1]]), V))
    np.testing.assert_allclose(float(tvd(jnp.asarray(one_hot_a), jnp.asarray(one_hot_b))[0, 0]), 1.0, atol=1e-6)


def test_jsd_beta_limits():
    p, q, *_ = random_inputs(4)
    p, q = jnp.asarray(p), jnp.asarray(q)

    def mean_jsd(beta):
        return float(jnp.mean(loss_spec(divergence="jsd", jsd_beta=beta).divergence_fn()(p, q)))

    mid = mean_jsd(0.5)
    assert mid > 1e-2
    assert mean_jsd(0.0) == 0.0 and mean_jsd(1.0) == 0.0
    for small in (1e-2, 1e-3, 1e-4):
        assert mean_jsd(small) < 10 * small * mid and mean_jsd(1 - small) < 10 * small * mid
    assert mean_jsd(1e-4) < mean_jsd(1e-2) < mid and mean_jsd(1 - 1e-4) < mean_jsd(1 - 1e-2) < mid


@pytest.mark.parametrize("name", [*KL_DIVERGENCES, "ce"])
def test_padding_rows_and_padded_positions_change_nothing(name):
    p, q, _, mask, labels = random_inputs(5)
    spec = loss_spec(divergence=name, temperature=TEMPERATURE, chunk=0)
    loss, metrics = objective.loss_from_logits(spec, p, q, mask, REAL_V, labels)
    rng = np.random.default_rng(6)
    p2, q2 = p.copy(), q.copy()
    p2[..., REAL_V:] = 50 * rng.standard_normal(p2[..., REAL_V:].shape)  # padding rows: huge garbage
    q2[..., REAL_V:] = 50 * rng.standard_normal(q2[..., REAL_V:].shape)
    uncounted = mask == 0
    p2[uncounted] = 30 * rng.standard_normal((uncounted.sum(), V))  # uncounted positions: anything
    q2[uncounted] = 30 * rng.standard_normal((uncounted.sum(), V))
    p2[:, -1], q2[:, -1] = 99.0 * rng.standard_normal((B, V)), 0.0  # the last position is never counted
    loss2, metrics2 = objective.loss_from_logits(spec, p2, q2, mask, REAL_V, labels)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics2["acceptance"]), float(metrics["acceptance"]), rtol=1e-6)
    # ... while a change at a counted position does change the loss (the test can fail).
    t0 = np.argwhere(mask[:, :-1] > 0)[0]
    q2[t0[0], t0[1], : REAL_V] += np.linspace(-3, 3, REAL_V).astype(np.float32)
    loss3, _ = objective.loss_from_logits(spec, p2, q2, mask, REAL_V, labels)
    assert abs(float(loss3) - float(loss)) > 1e-5


@pytest.mark.parametrize("name", KL_DIVERGENCES)
def test_a_tiny_temperature_stays_finite_with_padding_rows(name):
    # Temperature is applied before the padding rows are masked: MASK_VALUE / 1e-9 would overflow to
    # -inf, and 0 · (-inf - -inf) inside a KL is NaN.
    p, q, _, mask, labels = random_inputs(7)
    spec = loss_spec(divergence=name, temperature=1e-9, chunk=0)
    loss, metrics = objective.loss_from_logits(spec, p, q, mask, REAL_V, labels)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["acceptance"]))
