"""The loss tests' float64 NumPy reference (written independently of the JAX code) and their shared inputs."""

from __future__ import annotations

import math

import numpy as np

from distillspec_jax import objective

B, T, V, REAL_V = 3, 7, 11, 9  # two padding rows in the vocabulary
TEMPERATURE = 0.7
KL_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def loss_spec(adaspec_fraction: float | None = None, chunk: int = 128, **kwargs) -> objective.LossSpec:
    """An objective.LossSpec: adaspec_fraction None trains every counted token, a number k is AdaSPEC with k."""
    if adaspec_fraction is not None:
        kwargs.update(selection="adaspec", adaspec_fraction=adaspec_fraction)
    return objective.LossSpec(loss_chunk=chunk, **kwargs)


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
