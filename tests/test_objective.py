"""The objective: chunked == unchunked (values and gradients), gradients against finite differences, the global
(sharding-independent) mean, the memory of the chunked loss, the next-token alignment and the config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import objective
from distillspec_jax import sharding as shd
from distillspec_jax.models import qwen3
from tests.loss_reference import REAL_V, TEMPERATURE, V, loss_spec, np_loss, random_inputs


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
