"""The sparse (stored top-k) teacher: exact with every id kept, the documented (k + 1)-bucket formula checked
in float64 NumPy for small k, the lower bound, FKL's gradient on and off the top-k, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import objective, sparse_teacher
from distillspec_jax.sampling import Sampler, filtered_logits
from tests.loss_reference import KL_DIVERGENCES, REAL_V, TEMPERATURE, loss_spec, np_divergence, np_log_probs, \
    random_inputs


def _stored(p_logits, k: int, temperature: float = TEMPERATURE) -> dict[str, jax.Array]:
    """The batch arrays a stored teacher of top-k holds, from the target's logits (as the writer forms them)."""
    top = sparse_teacher.top_k(filtered_logits(jnp.asarray(p_logits), Sampler(temperature=temperature), REAL_V), k)
    return dict(zip(sparse_teacher.TEACHER_KEYS, top))


def _np_buckets(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 [..., k + 1]: log-probabilities on ids, then the log of the mass outside them (by the book)."""
    on = np.take_along_axis(logp, ids, axis=-1)
    probs = np.exp(logp)
    outside = probs.sum(-1) - np.take_along_axis(probs, ids, axis=-1).sum(-1)
    with np.errstate(divide="ignore"):
        return np.concatenate([on, np.log(np.maximum(outside, 0.0))[..., None]], axis=-1)


@pytest.mark.parametrize("name", KL_DIVERGENCES)
def test_every_id_kept_equals_the_full_loss(name):
    p, q, _, mask, _ = random_inputs(3)
    full, full_metrics = objective.loss_from_logits(loss_spec(divergence=name, temperature=TEMPERATURE), p, q, mask,
                                                    REAL_V)
    spec = loss_spec(divergence=name, temperature=TEMPERATURE, stored_teacher=True)
    sparse, sparse_metrics = objective.loss_from_logits(spec, None, q, mask, REAL_V, teacher_bt=_stored(p, REAL_V))
    np.testing.assert_allclose(float(sparse), float(full), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(sparse_metrics["acceptance"]), float(full_metrics["acceptance"]), atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("name", KL_DIVERGENCES)
def test_small_k_follows_the_bucket_formula_and_bounds_the_full_loss(name, k):
    p, q, _, mask, _ = random_inputs(5)
    spec = loss_spec(divergence=name, temperature=TEMPERATURE, stored_teacher=True, chunk=3)
    stored = _stored(p, k)
    values = objective.token_values(spec, REAL_V, {objective.DRAFT: lambda x: x}, {objective.DRAFT: jnp.asarray(q)},
                                    jnp.zeros(mask.shape, jnp.int32), stored)
    logp, logq = np_log_probs(p, TEMPERATURE, REAL_V), np_log_probs(q, TEMPERATURE, REAL_V)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.sort(np.asarray(stored["teacher_ids"]), -1), np.sort(ids, -1))
    want = np_divergence(name, _np_buckets(logp, ids), _np_buckets(logq, ids))
    np.testing.assert_allclose(np.asarray(values.divergence), want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(values.tvd), np_divergence("tvd", _np_buckets(logp, ids),
                                                                     _np_buckets(logq, ids)), atol=2e-6)
    # Merging the ids outside the top-k can only lower an f-divergence (data processing).
    assert np.all(np.asarray(values.divergence) <= np_divergence(name, logp, logq) + 1e-5)
    loss, _ = objective.loss_from_logits(spec, None, q, mask, REAL_V, teacher_bt=stored)
    full, _ = objective.loss_from_logits(loss_spec(divergence=name, temperature=TEMPERATURE), p, q, mask, REAL_V)
    assert float(loss) < float(full)


def test_fkl_gradient_on_and_off_the_top_k():
    """d FKL(p̄‖q̄) / d logits_i = (q_i − p_i) / T on the stored ids, and (q_i − p_tail · q_i / q_tail) / T outside."""
    p, q, *_ = random_inputs(7, b=1, t=1)
    k, temperature = 4, TEMPERATURE
    stored = _stored(p, k, temperature)
    spec = loss_spec(divergence="fkl", temperature=temperature, stored_teacher=True)

    def loss(q_logits):
        values = objective.token_values(spec, REAL_V, {objective.DRAFT: lambda x: x}, {objective.DRAFT: q_logits},
                                        jnp.zeros((1, 1), jnp.int32), stored)
        return values.divergence.sum()

    grad = np.asarray(jax.grad(loss)(jnp.asarray(q)), np.float64)[0, 0]
    logp, logq = np_log_probs(p, temperature, REAL_V)[0, 0], np_log_probs(q, temperature, REAL_V)[0, 0]
    probs_p, probs_q = np.exp(logp), np.exp(logq)
    ids = np.asarray(stored["teacher_ids"])[0, 0]
    inside = np.zeros(probs_q.shape, bool)
    inside[ids] = True
    p_tail, q_tail = probs_p[~inside].sum(), probs_q[~inside].sum()
    want = np.where(inside, probs_q - probs_p, probs_q - p_tail * probs_q / q_tail) / temperature
    np.testing.assert_allclose(grad, want, atol=2e-6)


def test_tail_is_accurate_when_the_top_k_holds_nearly_all_mass():
    """log(1 − Σ_S p) loses every digit when Σ_S p rounds to 1 in float32; the log-sum-exp tail does not."""
    logits = jnp.asarray([[30.0, 0.0, -1.0, -2.0]])
    top = sparse_teacher.top_k(logits, 1)
    want = np.log(np.exp([0.0, -1.0, -2.0]).sum()) - np.log(np.exp([30.0, 0.0, -1.0, -2.0]).sum())
    np.testing.assert_allclose(float(top.tail[0]), want, rtol=1e-6)
    assert float(sparse_teacher.pooled_buckets(logits, top.ids)[0, -1]) == pytest.approx(want, rel=1e-6)


def test_k_out_of_range_and_unused_stored_teacher_are_errors():
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        sparse_teacher.top_k(jnp.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match="1 <= k"):
        sparse_teacher.top_k(jnp.zeros((2, 4)), 0)
    with pytest.raises(ValueError, match="generator.kind=target"):
        objective.LossSpec(divergence="ce", stored_teacher=True)
    assert not objective.LossSpec(divergence="fkl", stored_teacher=True).uses_target
    assert objective.LossSpec(divergence="fkl", stored_teacher=True).frozen_roles == ()
