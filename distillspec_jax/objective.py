"""The distillation objective: what the loss computes (`LossSpec`), its per-token values from the models'
hidden states in chunks that never hold the float32 [B, T, V] logits of both models at once, the token
selection's weights, and the masked global mean.

Design §3. The divergence is one of `divergences.DIVERGENCES`, the token selection one of
`selection.SELECTIONS` (every counted token, or AdaSPEC's), both by config name.

Alignment. Position t's logits predict token t+1. `loss_mask[b, t] = 1` means the distribution at
position t, the one that generates token t+1, is trained; `next_token_loss_mask` builds it from a
mask of response tokens with `next_token_shift`, the one shift (labels, evaluation positions). The
last position has no next token and is never counted.

Reduction. loss = Σ w·D / Σ w, w the selection's weights on counted positions. Both sums run over the
whole global batch: under jit a `jnp.sum` of a sharded array is a global sum, so the mean does not
depend on how the batch is split.

Memory. With V = 151936, logits dominate memory: float32 [8, 512, V] is 2.5 GB per model. The
chunked path scans over sequence chunks of C positions; each chunk recomputes the models' logits from
their hidden states under `jax.checkpoint`, so at most a few [B, C, V] buffers live at any time, in the
forward pass and in the backward pass alike.

Roles. The models of a loss are named by role: `draft` (trained), `target` (the teacher p) and
`reference` (the selection's frozen reference draft). `LossSpec.frozen_roles` says which frozen ones a
loss reads; heads and hidden states travel as dicts keyed by role.

Stored teacher. With `stored_teacher`, p is not a model: it is the target's top-k log-probabilities and tail
mass stored with the batch (generator `target_logits`, `data/teacher_store.py`), and every distribution of
the loss (the draft's, a reference's) is pooled onto the same k + 1 buckets (`sparse_teacher`, which
documents what each divergence becomes). No target is then in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax import sparse_teacher
from distillspec_jax.divergences import DIVERGENCES, DivergenceFn, one_hot_logits, total_variation
from distillspec_jax.sampling import Sampler, filtered_logits
from distillspec_jax.selection import SELECTIONS, Selection

DRAFT, TARGET, REFERENCE = "draft", "target", "reference"
# A model's LM head: final-norm hidden states [B, C, D] -> float32 logits [B, C, V].
Head = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss computes. Hashable: a static argument of jitted functions. Validated on creation,
    so a bad config fails before anything compiles. Field names are config.distill's."""

    divergence: str = "fkl"  # a name in divergences.DIVERGENCES: fkl | rkl | jsd | tvd | ce
    jsd_beta: float = 0.5  # β of JSD[β], in [0, 1]
    temperature: float = 1.0  # temperature of both p and q, > 0: the decode temperature
    selection: str = "all"  # a name in selection.SELECTIONS: all | adaspec (tokens the loss trains on)
    adaspec_fraction: float = 0.4  # adaspec: fraction k of counted tokens kept, in (0, 1]
    loss_chunk: int = 128  # sequence positions per loss chunk; 0 = the whole sequence at once (no scan)
    stored_teacher: bool = False  # p is the batch's stored top-k (generator target_logits), not a target model

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {sorted(DIVERGENCES)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown token selection {self.selection!r}; choose one of {sorted(SELECTIONS)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not self.temperature > 0.0:
            raise ValueError(
                f"loss temperature must be > 0, got {self.temperature}: divergences compare full distributions, "
                "which greedy (temperature 0) decoding does not define; use 1.0 for greedy decoding"
            )
        if not 0.0 < self.adaspec_fraction <= 1.0:
            raise ValueError(f"adaspec_fraction must be in (0, 1], got {self.adaspec_fraction}")
        if self.uses_reference and not self.uses_teacher:
            raise ValueError(f"token selection {self.selection!r} compares draft and reference against the target; "
                             f"divergence {self.divergence!r} uses no target")
        if self.stored_teacher and not self.uses_teacher:
            raise ValueError(f"divergence {self.divergence!r} trains on the tokens alone and reads no teacher "
                             "distribution, so stored teacher logits (generator target_logits) would go unused; "
                             "use generator.kind=target for cross-entropy on the target's text (black-box)")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0 = unchunked), got {self.loss_chunk}")

    @property
    def uses_teacher(self) -> bool:
        """Whether the divergence reads the target's distribution p (from a model, or stored)."""
        return DIVERGENCES[self.divergence].uses_target

    @property
    def uses_target(self) -> bool:
        """Whether the loss needs the target model in memory (not when p is stored with the batch)."""
        return self.uses_teacher and not self.stored_teacher

    @property
    def token_selection(self) -> Selection:
        return SELECTIONS[self.selection]

    @property
    def uses_reference(self) -> bool:
        return self.token_selection.uses_reference

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        """The frozen models this loss reads, by role."""
        return (TARGET,) * self.uses_target + (REFERENCE,) * self.uses_reference

    def divergence_fn(self) -> DivergenceFn:
        """The registered function with this spec's hyperparameters bound: (p_logits, q_logits) -> values."""
        entry = DIVERGENCES[self.divergence]
        kwargs = {name: getattr(self, name) for name in entry.hyperparams}
        return lambda p_logits, q_logits: entry.fn(p_logits, q_logits, **kwargs)

    def weights(self, counted_bt: jax.Array, score_bt: jax.Array | None) -> jax.Array:
        """The selection's unnormalised weights [B, T] over the global batch's counted positions."""
        entry = self.token_selection
        return entry.weights(counted_bt, score_bt, **{name: getattr(self, name) for name in entry.hyperparams})


# ----------------------------------------------------------------------------------------------
# Token masks
# ----------------------------------------------------------------------------------------------


def next_token_shift(x_bt):
    """x'[b, t] = x[b, t + 1], what position t's logits predict (labels from tokens, or the positions that
    generate a response token from a response mask); 0 (False) at the last position, which predicts
    nothing inside the sequence. NumPy in, NumPy out (host-side data); jax in, jax out."""
    xp = np if isinstance(x_bt, np.ndarray) else jnp
    return xp.concatenate([x_bt[:, 1:], xp.zeros_like(x_bt[:, :1])], axis=1)


def next_token_loss_mask(response_mask_bt):
    """float32 loss_mask[b, t] = response_mask[b, t + 1]: train the distributions that generate response tokens.

    response_mask marks positions holding response tokens (not prompt, not padding). The last
    position predicts nothing inside the sequence and gets 0.
    """
    return next_token_shift(response_mask_bt).astype(np.float32)


def counted_mask(loss_mask_bt: jax.Array) -> jax.Array:
    """float32 [B, T] weights of counted positions: the loss mask with the last position zeroed.

    The mask's values are used as they are (1 for counted, 0 for not), so corrupt data such as a NaN
    in it surfaces as a non-finite loss instead of being silently dropped.
    """
    t = loss_mask_bt.shape[1]
    has_next_t = (jnp.arange(t) < t - 1).astype(jnp.float32)
    return loss_mask_bt.astype(jnp.float32) * has_next_t[None, :]


# ----------------------------------------------------------------------------------------------
# Per-token values, chunked
# ----------------------------------------------------------------------------------------------


def scan_positions(fn: Callable, init, xs_bt, chunk: int, *, remat: bool = False, unroll: bool = False):
    """(carry, ys_bt): `fn(carry, xs_bc) -> (carry, ys_bc)` run over chunks of C = `chunk` positions.

    xs_bt is a pytree of [B, T, ...] arrays, ys_bc a pytree of [B, C, ...] arrays (or None). With chunk = 0
    or chunk >= T, fn sees the whole sequence at once; otherwise a `lax.scan` walks M = ceil(T / C) chunks, the
    last one zero-padded (fn must give padded positions no weight in its carry; they are cut from ys).
    Only [B, C, V] distributions then exist at a time, which is what keeps V = 151936 in memory (design §3).
    remat: the body is rematerialised, so a backward pass recomputes each chunk's logits from its [B, C, D]
    hidden states instead of keeping them (the training losses; evaluation never rematerialises).
    unroll: the chunks are laid out one after another instead of a loop (see `Qwen3.step`).
    """
    b, t = jax.tree.leaves(xs_bt)[0].shape[:2]
    if chunk == 0 or chunk >= t:
        return fn(init, xs_bt)
    m = -(-t // chunk)  # M chunks

    def to_chunks(x_bt: jax.Array) -> jax.Array:  # [B, T, ...] -> [M, B, C, ...]
        x_bt = jnp.pad(x_bt, [(0, 0), (0, m * chunk - t)] + [(0, 0)] * (x_bt.ndim - 2))
        return jnp.swapaxes(x_bt.reshape(b, m, chunk, *x_bt.shape[2:]), 0, 1)

    def from_chunks(y_mbc: jax.Array) -> jax.Array:  # [M, B, C, ...] -> [B, T, ...]
        return jnp.swapaxes(y_mbc, 0, 1).reshape(b, m * chunk, *y_mbc.shape[3:])[:, :t]

    body = jax.checkpoint(fn, prevent_cse=False) if remat else fn  # inside scan, CSE cannot undo the remat
    carry, ys_mbc = jax.lax.scan(body, init, jax.tree.map(to_chunks, xs_bt), unroll=unroll)
    return carry, jax.tree.map(from_chunks, ys_mbc)


class TokenValues(NamedTuple):
    """Per-position values [B, T]; only `divergence` carries a gradient (towards the draft)."""

    divergence: jax.Array  # the configured divergence D(p, q)
    tvd: jax.Array  # TVD(p, q), for the acceptance estimate 1 − TVD
    score: jax.Array | None  # the token selection's score (AdaSPEC: ΔL), or None when it has none


def _chunk_values(spec: LossSpec, real_vocab_size: int, heads: dict[str, Head], h_bcd: dict[str, jax.Array],
                  labels_bc: jax.Array, teacher_bc: dict[str, jax.Array] | None) -> tuple[jax.Array, ...]:
    """Values [B, C] of one chunk: (divergence, tvd[, score])."""
    sampler = Sampler(temperature=spec.temperature)

    def logits(role: str) -> jax.Array:  # the frozen models' logits are constants of the draft's loss
        out = filtered_logits(heads[role](h_bcd[role]), sampler, real_vocab_size)
        return out if role == DRAFT else jax.lax.stop_gradient(out)

    if spec.stored_teacher:  # p and every model's q on the stored teacher's k + 1 buckets
        teacher = sparse_teacher.TopK(*(teacher_bc[key] for key in sparse_teacher.TEACHER_KEYS))
        p_bcv = sparse_teacher.teacher_buckets(teacher)
        distribution = lambda role: sparse_teacher.pooled_buckets(logits(role), teacher.ids)  # noqa: E731
    else:
        distribution = logits
    q_bcv = distribution(DRAFT)
    if not spec.stored_teacher:
        p_bcv = distribution(TARGET) if spec.uses_target else one_hot_logits(labels_bc, q_bcv.shape[-1])
    divergence_bc = spec.divergence_fn()(p_bcv, q_bcv)
    q_const_bcv = jax.lax.stop_gradient(q_bcv)
    tvd_bc = total_variation(p_bcv, q_const_bcv)  # the acceptance metric 1 − TVD: never a gradient
    if not spec.uses_reference:
        return divergence_bc, tvd_bc
    return divergence_bc, tvd_bc, spec.token_selection.score(p_bcv, q_const_bcv, distribution(REFERENCE))


def token_values(spec: LossSpec, real_vocab_size: int, heads: dict[str, Head], hidden_btd: dict[str, jax.Array],
                 labels_bt: jax.Array, teacher_bt: dict[str, jax.Array] | None = None, *,
                 unroll: bool = False) -> TokenValues:
    """Per-position divergence, TVD and selection score, [B, T] each, from the models' hidden states.

    heads and hidden_btd are keyed by role (`draft` and `spec.frozen_roles`). Heads map hidden states
    [B, C, D] to float32 logits [B, C, V]; the frozen models' are evaluated under stop_gradient. With
    spec.loss_chunk = C > 0 (and C < T) the sequence is processed in ceil(T / C) chunks by a scan whose body
    is rematerialised: in the backward pass each chunk's logits are recomputed from [B, C, D] hidden
    states instead of being kept from the forward pass. Widths D may differ per model; only V must agree.
    teacher_bt: with spec.stored_teacher, the stored teacher (`sparse_teacher.TEACHER_KEYS`: ids and
    log-probabilities [B, T, k], tail [B, T]) in place of a target model. unroll: the chunks' scan unrolled.
    """
    roles = (DRAFT, *spec.frozen_roles)
    missing = [role for role in roles if role not in heads or role not in hidden_btd]
    if missing:
        raise ValueError(f"divergence {spec.divergence!r} with selection {spec.selection!r} needs the heads and "
                         f"hidden states of {list(roles)}; missing {missing}")
    if spec.stored_teacher and (teacher_bt is None or any(k not in teacher_bt for k in sparse_teacher.TEACHER_KEYS)):
        raise ValueError(f"a loss on the stored teacher needs {list(sparse_teacher.TEACHER_KEYS)} with the batch")
    teacher_bt = {k: teacher_bt[k] for k in sparse_teacher.TEACHER_KEYS} if spec.stored_teacher else None
    inputs = {role: hidden_btd[role] if role == DRAFT else jax.lax.stop_gradient(hidden_btd[role]) for role in roles}

    def values(carry: None, xs) -> tuple[None, tuple[jax.Array, ...]]:
        return carry, _chunk_values(spec, real_vocab_size, heads, *xs)

    _, out = scan_positions(values, None, (inputs, labels_bt, teacher_bt), spec.loss_chunk, remat=True,
                            unroll=unroll)
    return TokenValues(divergence=out[0], tvd=out[1], score=out[2] if spec.uses_reference else None)


# ----------------------------------------------------------------------------------------------
# Weights and the masked global mean
# ----------------------------------------------------------------------------------------------


def loss_weights(spec: LossSpec, loss_mask_bt: jax.Array, score_bt: jax.Array | None) -> jax.Array:
    """Unnormalised per-position weights [B, T] of the loss: the counted mask, as the selection weighs it."""
    return spec.weights(counted_mask(loss_mask_bt), score_bt)


def metric_sums(spec: LossSpec, values: TokenValues, loss_mask_bt: jax.Array,
                weights_bt: jax.Array) -> dict[str, jax.Array]:
    """Global sums from which `finalize_metrics` forms the reported means; sums of micro-batches add up."""
    counted = counted_mask(loss_mask_bt)
    div = jax.lax.stop_gradient(values.divergence)
    sums = {
        "loss_sum": jnp.sum(weights_bt * div),
        "weight_sum": jnp.sum(weights_bt),
        "divergence_sum": jnp.sum(counted * div),
        "tvd_sum": jnp.sum(counted * values.tvd),
        "tokens": jnp.sum(counted),
    }
    if values.score is not None:
        sums[f"{spec.token_selection.score_metric}_sum"] = jnp.sum(counted * values.score)
    return sums


def finalize_metrics(spec: LossSpec, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from global sums: loss (over the loss's tokens), divergence and acceptance = 1 − TVD (over
    every counted token), token counts and, with a selection other than `all`, the selected fraction
    and the mean of its score (AdaSPEC: `adaspec_delta`, the mean ΔL)."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
        "loss": sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "divergence": sums["divergence_sum"] / tokens,
        "tvd": sums["tvd_sum"] / tokens,
        "acceptance": 1.0 - sums["tvd_sum"] / tokens,
        "tokens": sums["tokens"],
    }
    if spec.uses_reference:
        metrics["selected_fraction"] = sums["weight_sum"] / tokens
        name = spec.token_selection.score_metric
        metrics[name] = sums[f"{name}_sum"] / tokens
    return metrics


def reduce_loss(spec: LossSpec, values: TokenValues, loss_mask_bt: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics): loss = Σ w·D / Σ w over the global batch, w the counted (and selected) positions."""
    weights = loss_weights(spec, loss_mask_bt, values.score)
    sums = metric_sums(spec, values, loss_mask_bt, weights)
    loss = jnp.sum(weights * values.divergence) / jnp.maximum(sums["weight_sum"], 1.0)
    return loss, finalize_metrics(spec, sums)


def _identity_head(x: jax.Array) -> jax.Array:
    return x


def loss_from_logits(
    spec: LossSpec,
    p_logits_btv: jax.Array | None,
    q_logits_btv: jax.Array,
    loss_mask_bt: jax.Array,
    real_vocab_size: int,
    labels_bt: jax.Array | None = None,
    reference_logits_btv: jax.Array | None = None,
    teacher_bt: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) straight from logits [B, T, V] (small shapes and tests; models use `token_values`
    with their heads so that full logits are never materialised). With spec.stored_teacher, p comes from
    teacher_bt (`sparse_teacher.TEACHER_KEYS`) and p_logits_btv is not read."""
    if labels_bt is None:
        labels_bt = jnp.zeros(q_logits_btv.shape[:2], jnp.int32)
    logits = {DRAFT: q_logits_btv, TARGET: p_logits_btv if spec.uses_target else None,
              REFERENCE: reference_logits_btv}
    hidden = {role: x for role, x in logits.items() if x is not None}
    values = token_values(spec, real_vocab_size, {role: _identity_head for role in hidden}, hidden, labels_bt,
                          teacher_bt)
    return reduce_loss(spec, values, loss_mask_bt)
