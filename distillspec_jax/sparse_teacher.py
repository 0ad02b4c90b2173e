"""The sparse teacher: the target's distribution kept as its top-k log-probabilities and one tail bucket
(design §4, stored teacher outputs).

At one position the target's p is known on k ids S (its k most likely, ties broken by `lax.top_k`) and on
the bucket "everything else", of mass p_tail = 1 − Σ_S p. The draft's q is pooled the same way: q on S and
q_tail = 1 − Σ_S q. Every divergence of `divergences.DIVERGENCES` is then evaluated on these (k + 1)-bucket
distributions. A bucket vector of normalised log-probabilities is a valid logits vector (its log-softmax
is itself), so the registered functions apply unchanged: one definition per divergence.

What each becomes (`p̄`, `q̄` the bucket distributions; full = over the vocabulary):

    FKL   Σ_S p log(p/q) + p_tail log(p_tail/q_tail). The terms on S are the full FKL's own; the tail term
          is ≤ the full FKL's terms outside S (log-sum inequality), so FKL(p̄‖q̄) ≤ FKL(p‖q). Its gradient
          in the draft's logits is q_i − p_i on S, as in the full loss, and q_i − p_tail·q_i/q_tail outside:
          the tail's teacher mass is spread over the draft's own tail in proportion to q.
    RKL   Σ_S q log(q/p) + q_tail log(q_tail/p_tail) ≤ RKL(q‖p).
    JSD   JSD[β](p̄, q̄) ≤ JSD[β](p, q).
    TVD   ½ Σ_S |p − q| + ½ |p_tail − q_tail| ≤ TVD(p, q); so 1 − TVD on buckets over-estimates acceptance.

Every inequality is the data-processing inequality of an f-divergence under the merge of the ids outside
S into one bucket; each is an equality when p and q are proportional outside S, and with k = V (S the
whole real vocabulary, p_tail = q_tail = 0) everything is exact. `tests/test_sparse_teacher.py` checks
both against NumPy.

Tail. Both tails are log-sum-exps over the complement of S (not log(1 − Σ_S p), which loses every digit
when Σ_S p is near 1 and whose gradient blows up there). An empty complement (k = V) gives ≈ MASK_VALUE,
the finite log of 0 that every divergence treats as probability 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillspec_jax.sampling import MASK_VALUE

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_tail")  # a batch's stored teacher arrays


class TopK(NamedTuple):
    """The sparse teacher at each position: [..., k] ids and log-probabilities, [...] log tail mass."""

    ids: jax.Array  # int32 [..., k]: the k most likely ids, most likely first
    logprobs: jax.Array  # float32 [..., k]: log p at those ids
    tail: jax.Array  # float32 [...]: log(1 − Σ_S p), the log of the remaining mass (≈ MASK_VALUE when none)


def _in_top_k(logits_v: jax.Array, ids_k: jax.Array) -> jax.Array:
    """bool [..., V]: whether each id is one of ids_k [..., k]."""
    return jnp.put_along_axis(jnp.zeros(logits_v.shape, bool), ids_k, True, axis=-1, inplace=False)


def _tail_log_mass(logp_v: jax.Array, ids_k: jax.Array) -> jax.Array:
    """log Σ_{v ∉ S} p_v [...] from log-probabilities [..., V]; ≈ MASK_VALUE when S covers every id."""
    return jax.nn.logsumexp(jnp.where(_in_top_k(logp_v, ids_k), MASK_VALUE, logp_v), axis=-1)


def top_k(logits_v: jax.Array, k: int) -> TopK:
    """The sparse teacher of a distribution's logits [..., V] (already filtered: temperature, padding rows
    masked; `sampling.filtered_logits`). 1 <= k <= V."""
    if not 1 <= k <= logits_v.shape[-1]:
        raise ValueError(f"top-k of a distribution over {logits_v.shape[-1]} ids needs 1 <= k <= "
                         f"{logits_v.shape[-1]}, got k={k}")
    logp_v = jax.nn.log_softmax(logits_v.astype(jnp.float32), axis=-1)
    logprobs_k, ids_k = jax.lax.top_k(logp_v, k)
    return TopK(ids_k.astype(jnp.int32), logprobs_k, _tail_log_mass(logp_v, ids_k))


def teacher_buckets(teacher: TopK) -> jax.Array:
    """float32 [..., k + 1] log-probabilities of the teacher's buckets: the k ids, then the tail."""
    return jnp.concatenate([teacher.logprobs, jnp.maximum(teacher.tail, MASK_VALUE)[..., None]], axis=-1)


def pooled_buckets(logits_v: jax.Array, ids_k: jax.Array) -> jax.Array:
    """float32 [..., k + 1] log-probabilities of a model's distribution (logits [..., V], filtered) pooled on
    the teacher's buckets: log q at ids_k [..., k], then log of q's mass outside them. Differentiable."""
    logq_v = jax.nn.log_softmax(logits_v.astype(jnp.float32), axis=-1)
    logq_k = jnp.take_along_axis(logq_v, ids_k, axis=-1)
    return jnp.concatenate([logq_k, _tail_log_mass(logq_v, ids_k)[..., None]], axis=-1)
