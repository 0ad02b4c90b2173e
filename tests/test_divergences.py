"""The divergences against direct float64 NumPy computations, their mathematical properties, AdaSPEC
selection, chunked == unchunked (values and gradients), gradients against finite differences, the
global (sharding-independent) mean, the memory of the chunked loss, and the config errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import divergences as dv
from distillspec_jax import objective, selection
from distillspec_jax import sharding as shd
from distillspec_jax.models import qwen3

B, T, V, REAL_V = 3, 7, 11, 9  # two padding rows in the vocabulary
TEMPERATURE = 0.7
KL_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def loss_spec(adaspec_fraction: float | None = None, chunk: int = 128, **kwargs) -> objective.LossSpec:
    """An objective.LossSpec: adaspec_fraction None trains every counted token, a number k is AdaSPEC with k."""
    if adaspec_fraction is not None:
        kwargs.update(selection="adaspec", adaspec_fraction=adaspec_fraction)
    return objective.LossSpec(loss_chunk=chunk, **kwargs)


# ----------------------------------------------------------------------------------------------
# float64 NumPy reference
# ----------------------------------------------------------------------------------------------


def np_log_probs(logits: np.ndarray, temperature: float, real_v: int) -> np.ndarray:
    x = np.asarray(logits, np.float64).copy()
    x[..., real_v:] = -np.inf
    x = x / temperature
    top = x.max(-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))


def np_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def np_divergence(name: str, logp: np.ndarray, logq: np.ndarray, beta: float = 0.5) -> np.ndarray:
    p, q = np.exp(logp), np.exp(logq)
    if name == "fkl":
        return np_kl(logp, logq)
    if name == "rkl":
        return np_kl(logq, logp)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "jsd":
        with np.errstate(divide="ignore"):
            logm = np.log(beta * p + (1 - beta) * q)
        return beta * np_kl(logp, logm) + (1 - beta) * np_kl(logq, logm)
    if name == "ce":
        with np.errstate(invalid="ignore"):
            return -np.where(p > 0, p * logq, 0.0).sum(-1)
    raise KeyError(name)


def np_loss(name, p_logits, q_logits, mask, beta=0.5, temperature=TEMPERATURE, real_v=REAL_V, labels=None,
            ref_logits=None, fraction=None):
    """(loss, mean 1 − TVD) by the book: masked mean over counted positions (last position excluded)."""
    counted = np.asarray(mask, np.float64).copy()
    counted[:, -1] = 0
    logq = np_log_probs(q_logits, temperature, real_v)
    if name == "ce":
        with np.errstate(divide="ignore"):
            logp = np.log(np.eye(q_logits.shape[-1])[labels])
    else:
        logp = np_log_probs(p_logits, temperature, real_v)
    values = np_divergence(name, logp, logq, beta)
    weights = counted
    if fraction is not None:
        logr = np_log_probs(ref_logits, temperature, real_v)
        delta = np_kl(logp, logq) - np_kl(logp, logr)
        order = np.argsort(-np.where(counted > 0, delta, -np.inf).reshape(-1), kind="stable")
        keep = math.ceil(fraction * counted.sum() - 1e-9)
        selected = np.zeros(counted.size)
        selected[order[:keep]] = 1
        weights = counted * selected.reshape(counted.shape)
    tvd = np_divergence("tvd", logp, logq)
    return (weights * values).sum() / weights.sum(), 1 - (counted * tvd).sum() / counted.sum()


def random_inputs(seed: int, b: int = B, t: int = T, v: int = V, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    p = (scale * rng.standard_normal((b, t, v))).astype(np.float32)
    q = (scale * rng.standard_normal((b, t, v))).astype(np.float32)
    r = (scale * rng.standard_normal((b, t, v))).astype(np.float32)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    labels = rng.integers(0, REAL_V, size=(b, t)).astype(np.int32)
    return p, q, r, mask, labels


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


# ----------------------------------------------------------------------------------------------
# AdaSPEC
# ----------------------------------------------------------------------------------------------


def test_adaspec_selects_top_fraction_of_counted_tokens():
    rng = np.random.default_rng(7)
    delta = rng.standard_normal((4, 9)).astype(np.float32)
    counted = (rng.random((4, 9)) < 0.6).astype(np.float32)
    for fraction in (0.4, 0.25, 1.0):
        selected = np.asarray(selection.adaspec_select(jnp.asarray(counted), jnp.asarray(delta), fraction))
        n = counted.sum()
        assert selected.sum() == math.ceil(fraction * n - 1e-9)
        assert np.all(selected <= counted)
        # Every selected ΔL is at least every unselected counted ΔL.
        chosen, left = delta[selected > 0], delta[(counted > 0) & (selected == 0)]
        if left.size:
            assert chosen.min() >= left.max()


@pytest.mark.parametrize("name", ["fkl", "tvd"])
def test_adaspec_loss_matches_numpy(name):
    p, q, r, mask, _ = random_inputs(8)
    spec = loss_spec(divergence=name, temperature=TEMPERATURE, adaspec_fraction=0.4, chunk=0)
    loss, metrics = objective.loss_from_logits(spec, p, q, mask, REAL_V, reference_logits_btv=r)
    want, _ = np_loss(name, p, q, mask, ref_logits=r, fraction=0.4)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    counted = mask[:, :-1].sum()
    np.testing.assert_allclose(float(metrics["selected_fraction"]), math.ceil(0.4 * counted) / counted, rtol=1e-6)
    # Selection matters: the mean over all counted tokens differs from the selected mean.
    assert abs(float(metrics["divergence"]) - float(loss)) > 1e-3


# ----------------------------------------------------------------------------------------------
# Chunking, gradients, global mean
# ----------------------------------------------------------------------------------------------


def _head_loss(spec, h_s, w_s, h_t, w_t, h_r, w_r, mask, labels):
    def head(w):
        return lambda h_bcd: jnp.einsum("bcd,dv->bcv", h_bcd, w)

    heads = {objective.DRAFT: head(w_s), objective.TARGET: head(w_t), objective.REFERENCE: head(w_r)}
    hidden = {objective.DRAFT: h_s, objective.TARGET: h_t, objective.REFERENCE: h_r}
    values = objective.token_values(spec, REAL_V, heads, hidden, labels)
    return objective.reduce_loss(spec, values, mask)


@pytest.mark.parametrize("name,fraction", [("fkl", None), ("rkl", None), ("jsd", None), ("tvd", None),
                                           ("ce", None), ("fkl", 0.4)])
def test_chunked_equals_unchunked(name, fraction):
    rng = np.random.default_rng(9)
    b, t, d = 2, 10, 6
    h_s, h_t, h_r = (jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in range(3))
    w_s, w_t, w_r = (jnp.asarray(rng.standard_normal((d, V)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)
    labels = jnp.asarray(rng.integers(0, REAL_V, (b, t)), jnp.int32)

    def loss_and_grads(chunk):
        spec = loss_spec(divergence=name, temperature=TEMPERATURE, adaspec_fraction=fraction, chunk=chunk)
        fn = lambda h, w: _head_loss(spec, h, w, h_t, w_t, h_r, w_r, mask, labels)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h_s, w_s)

    loss_full, (gh_full, gw_full) = loss_and_grads(0)
    assert float(jnp.abs(gw_full).max()) > 1e-4
    for chunk in (3, 4, 5):  # 3 and 4 do not divide T = 10: the last chunk is padded
        loss_c, (gh_c, gw_c) = loss_and_grads(chunk)
        np.testing.assert_allclose(float(loss_c), float(loss_full), rtol=1e-6)
        # float32 sums in another order: compare against the gradients' scale
        for got, want in ((gh_c, gh_full), (gw_c, gw_full)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                       atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("name,fraction", [("fkl", None), ("rkl", None), ("jsd", None), ("tvd", None),
                                           ("ce", None), ("fkl", 0.5)])
def test_gradient_matches_finite_differences(name, fraction):
    """JAX's float32 gradient of the loss w.r.t. the draft's logits against central differences of the
    float64 NumPy loss (an independent implementation)."""
    p, q, r, mask, labels = random_inputs(10, b=2, t=4, v=V)
    beta = 0.3
    spec = loss_spec(divergence=name, jsd_beta=beta, temperature=TEMPERATURE, adaspec_fraction=fraction, chunk=2)
    grad = np.asarray(jax.grad(lambda q_: objective.loss_from_logits(spec, p, q_, mask, REAL_V, labels, r)[0])(jnp.asarray(q)))

    def f(q64):
        return np_loss(name, p, q64, mask, beta=beta, labels=labels, ref_logits=r, fraction=fraction)[0]

    eps = 1e-5
    q64 = q.astype(np.float64)
    fd = np.zeros_like(q64)
    for idx in np.ndindex(q64.shape):
        if idx[-1] >= REAL_V:
            continue  # padding rows: no gradient, checked below
        up, down = q64.copy(), q64.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (f(up) - f(down)) / (2 * eps)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(grad, fd, atol=2e-6 * max(1.0, np.abs(fd).max()), rtol=1e-3)
    assert np.all(grad[..., REAL_V:] == 0)


def test_loss_is_a_global_mean_under_sharding():
    """On 8 devices, with rows of very different token counts on different shards, the loss is the
    mean over all counted tokens of the global batch, not a mean of per-shard means."""
    p, q, _, mask, _ = random_inputs(11, b=8, t=6)
    mask[:4] = 0
    mask[:4, 0] = 1  # the first shards count one token per row, the others about four
    spec = loss_spec(divergence="fkl", temperature=TEMPERATURE, chunk=2)
    mesh = shd.make_mesh(8, 1, 1)
    rows = shd.batch_sharding(mesh, 3)
    fn = jax.jit(lambda p_, q_, m_: objective.loss_from_logits(spec, p_, q_, m_, REAL_V))
    sharded, _ = fn(jax.device_put(p, rows), jax.device_put(q, rows), jax.device_put(mask, shd.batch_sharding(mesh, 2)))
    want, _ = np_loss("fkl", p, q, mask)
    np.testing.assert_allclose(float(sharded), want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _compiled_bytes(chunk: int) -> int:
    b, t, d = 8, 512, 64
    v, real_v = qwen3.QWEN3_VOCAB_SIZE, qwen3.QWEN3_NUM_REAL_TOKENS
    spec = loss_spec(divergence="fkl", chunk=chunk)

    def loss_and_grads(h_s, w_s, h_t, w_t, mask, labels):
        def loss(h_s, w_s):
            heads = {objective.DRAFT: lambda h: jnp.einsum("bcd,dv->bcv", h, w_s),
                     objective.TARGET: lambda h: jnp.einsum("bcd,dv->bcv", h, w_t)}
            values = objective.token_values(spec, real_v, heads, {objective.DRAFT: h_s, objective.TARGET: h_t}, labels)
            return objective.reduce_loss(spec, values, mask)[0]

        return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)

    shapes = [(b, t, d), (d, v), (b, t, d), (d, v), (b, t)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes] + [jax.ShapeDtypeStruct((b, t), jnp.int32)]
    stats = jax.jit(loss_and_grads).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


def test_chunked_loss_memory_is_at_most_a_quarter():
    unchunked, chunked = _compiled_bytes(0), _compiled_bytes(64)
    print(f"loss+grad memory at B=8 T=512 V=151936 D=64 (temp + output): unchunked {unchunked / 2**30:.2f} GiB, "
          f"chunked (C=64) {chunked / 2**30:.2f} GiB, ratio {chunked / unchunked:.3f}")
    assert chunked <= unchunked / 4


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"divergence": "kl"}, "unknown divergence 'kl'; choose one of \\['ce', 'fkl', 'jsd', 'rkl', 'tvd'\\]"),
    ({"divergence": "jsd", "jsd_beta": 1.5}, "jsd_beta must be in \\[0, 1\\]"),
    ({"divergence": "jsd", "jsd_beta": -0.1}, "jsd_beta must be in \\[0, 1\\]"),
    ({"adaspec_fraction": 0.0}, "adaspec_fraction must be in \\(0, 1\\]"),
    ({"adaspec_fraction": 1.2}, "adaspec_fraction must be in \\(0, 1\\]"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"chunk": -4}, "chunk must be >= 0"),
    ({"divergence": "ce", "adaspec_fraction": 0.4}, "uses no target"),
    ({"selection": "topk"}, "unknown token selection 'topk'; choose one of \\['adaspec', 'all'\\]"),
])
def test_bad_loss_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loss_spec(**kwargs)


def test_next_token_alignment():
    tokens = jnp.array([[5, 6, 7, 8, 0]])
    response = jnp.array([[0, 0, 1, 1, 0]])  # prompt 5 6, response 7 8, padding
    np.testing.assert_array_equal(np.asarray(objective.next_token_shift(tokens)), [[6, 7, 8, 0, 0]])
    # Position 1 generates token 7 and position 2 generates token 8: those are trained.
    np.testing.assert_array_equal(np.asarray(objective.next_token_loss_mask(response)), [[0, 1, 1, 0, 0]])


def test_a_registered_token_selection_weights_the_loss(monkeypatch):
    """The loss takes its weights from the selection registry by name: a selection registered here (the first
    counted position of each row only) gives the FKL mean over exactly those tokens (float64 NumPy)."""
    def first_position(counted_bt, score_bt):
        del score_bt
        return counted_bt * (jnp.arange(counted_bt.shape[1]) == 0)[None, :]

    monkeypatch.setitem(selection.SELECTIONS, "first_position", selection.Selection(first_position, "first"))
    p, q, _, mask, _ = random_inputs(12)
    mask[:, 0] = 1
    spec = loss_spec(divergence="fkl", temperature=TEMPERATURE, selection="first_position", chunk=3)
    loss, metrics = objective.loss_from_logits(spec, p, q, mask, REAL_V)
    kl_bt = np_kl(np_log_probs(p, TEMPERATURE, REAL_V), np_log_probs(q, TEMPERATURE, REAL_V))
    np.testing.assert_allclose(float(loss), kl_bt[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["divergence"]), np_loss("fkl", p, q, mask)[0], rtol=1e-5)
