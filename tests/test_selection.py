"""Token selections: AdaSPEC's top-k by loss gap against NumPy, and the registry the loss takes its weights from."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import objective, selection
from tests.loss_reference import REAL_V, TEMPERATURE, loss_spec, np_kl, np_log_probs, np_loss, random_inputs


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
