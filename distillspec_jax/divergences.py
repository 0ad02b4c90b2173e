"""Per-token divergences between the target p and the draft q, their masked global mean, AdaSPEC token
selection, and the chunked evaluation that never holds the float32 [B, T, V] logits of both models at once.

Design §3. Notation: p is the target's next-token distribution, q the draft's, both over the real
vocabulary (padding rows masked) and both at the sampling temperature used at decode time, formed by
`sampling.filtered_logits` (the one place distributions are formed).

Registry. A divergence is one function `(p_logits [..., V], q_logits [..., V]) -> values [...]`,
registered under its config name with `@register(name)`. Adding one = a function + a test.

Alignment. Position t's logits predict token t+1. `loss_mask[b, t] = 1` means the distribution at
position t, the one that generates token t+1, is trained; `next_token_loss_mask` builds it from a
mask of response tokens with `next_token_shift`, the one shift (labels, evaluation positions). The
last position has no next token and is never counted.

Reduction. loss = Σ_counted values / count. Both sums run over the whole global batch: under jit a
`jnp.sum` of a sharded array is a global sum, so the mean does not depend on how the batch is split.

Memory. With V = 151936, logits dominate memory: float32 [8, 512, V] is 2.5 GB per model. The
chunked path scans over sequence chunks of C positions; each chunk recomputes the draft's and the
target's logits from their hidden states under `jax.checkpoint`, so at most a few [B, C, V] buffers
live at any time, in the forward pass and in the backward pass alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax.sampling import MASK_VALUE, Sampler, filtered_logits

# (p_logits [..., V], q_logits [..., V], **hyperparameters) -> per-token values [...]
DivergenceFn = Callable[..., jax.Array]
# A model's LM head: final-norm hidden states [B, C, D] -> float32 logits [B, C, V].
Head = Callable[[jax.Array], jax.Array]

# AdaSPEC keeps the ceil(k * count) tokens of largest ΔL; this slack keeps ceil() from rounding an
# exact integer such as 0.4 * 10 = 4.0000001 (float32) up to 5.
_CEIL_SLACK = 1e-4


@dataclasses.dataclass(frozen=True)
class Divergence:
    """A registered divergence and what it needs."""

    fn: DivergenceFn
    uses_target: bool = True  # False: p is the one-hot of the next token (labels), no target model
    hyperparams: tuple[str, ...] = ()  # LossSpec fields passed to fn as keyword arguments


DIVERGENCES: dict[str, Divergence] = {}


def register(name: str, *, uses_target: bool = True, hyperparams: tuple[str, ...] = ()):
    """Decorator: registers a per-token divergence under its config name."""

    def add(fn: DivergenceFn) -> DivergenceFn:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = Divergence(fn, uses_target, hyperparams)
        return fn

    return add


def _log_probs(logits_tv: jax.Array) -> jax.Array:
    # Masked entries hold MASK_VALUE (finite), so they get log-probability ~-1e30 and probability
    # exactly 0; every `p * (log p - log q)` below is then 0 * 0 for them, never 0 * inf = NaN.
    return jax.nn.log_softmax(logits_tv.astype(jnp.float32), axis=-1)


def _kl(logp_tv: jax.Array, logq_tv: jax.Array) -> jax.Array:
    """KL(p‖q) = Σ_v p (log p − log q) from log-probabilities; returns [...]."""
    return jnp.sum(jnp.exp(logp_tv) * (logp_tv - logq_tv), axis=-1)


@register("fkl")
def forward_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p‖q): mass-covering; the draft is pushed to put mass wherever the target does."""
    return _kl(_log_probs(p_logits), _log_probs(q_logits))


@register("rkl")
def reverse_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(q‖p): mode-seeking; the draft is penalised for mass where the target has little."""
    return _kl(_log_probs(q_logits), _log_probs(p_logits))


@register("jsd", hyperparams=("jsd_beta",))
def jensen_shannon(p_logits: jax.Array, q_logits: jax.Array, jsd_beta: float = 0.5) -> jax.Array:
    """JSD[β] = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; bounded by the entropy of Bernoulli(β).

    log m is a logsumexp of log β + log p and log(1−β) + log q, so it stays finite and accurate where
    p or q underflow. β = 0 or 1 makes m equal q or p and JSD identically 0.
    """
    if jsd_beta in (0.0, 1.0):
        return jnp.zeros(jnp.broadcast_shapes(p_logits.shape, q_logits.shape)[:-1], jnp.float32)
    logp, logq = _log_probs(p_logits), _log_probs(q_logits)
    logm = jnp.logaddexp(math.log(jsd_beta) + logp, math.log1p(-jsd_beta) + logq)
    return jsd_beta * _kl(logp, logm) + (1.0 - jsd_beta) * _kl(logq, logm)


@register("tvd")
def total_variation(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """TVD = ½ Σ_v |p − q| ∈ [0, 1]; 1 − TVD = Σ min(p, q) is the speculative acceptance probability."""
    p, q = jnp.exp(_log_probs(p_logits)), jnp.exp(_log_probs(q_logits))
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


@register("ce", uses_target=False)
def cross_entropy(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """H(p, q) = −Σ p log q. With p the one-hot of the next token (how the loss calls it, since 'ce'
    uses no target model) this is the usual next-token cross-entropy, −log q(label): supervised
    baselines and training models from scratch."""
    return -jnp.sum(jnp.exp(_log_probs(p_logits)) * _log_probs(q_logits), axis=-1)


def one_hot_logits(labels_bt: jax.Array, vocab_size: int) -> jax.Array:
    """Logits [B, T, V] of the point mass on each label: 0 at the label, MASK_VALUE elsewhere."""
    hit_btv = labels_bt[..., None] == jnp.arange(vocab_size)
    return jnp.where(hit_btv, 0.0, MASK_VALUE).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Configuration and validation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss computes. Hashable: a static argument of jitted functions. Validated on creation,
    so a bad config fails before anything compiles."""

    divergence: str = "fkl"  # a name in DIVERGENCES: fkl | rkl | jsd | tvd | ce
    jsd_beta: float = 0.5  # β of JSD[β], in [0, 1]
    temperature: float = 1.0  # temperature of both p and q, > 0: the decode temperature
    adaspec_fraction: float | None = None  # AdaSPEC: fraction k of counted tokens kept, in (0, 1]; None = off
    chunk: int = 128  # sequence positions per loss chunk; 0 = the whole sequence at once (no scan)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {sorted(DIVERGENCES)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not self.temperature > 0.0:
            raise ValueError(
                f"loss temperature must be > 0, got {self.temperature}: divergences compare full distributions, "
                "which greedy (temperature 0) decoding does not define; use 1.0 for greedy decoding"
            )
        if self.adaspec_fraction is not None:
            if not 0.0 < self.adaspec_fraction <= 1.0:
                raise ValueError(f"adaspec_fraction must be in (0, 1] (or None for off), got {self.adaspec_fraction}")
            if not self.uses_target:
                raise ValueError(f"AdaSPEC selection compares draft and reference against the target; "
                                 f"divergence {self.divergence!r} uses no target")
        if self.chunk < 0:
            raise ValueError(f"loss chunk must be >= 0 (0 = unchunked), got {self.chunk}")

    @property
    def uses_target(self) -> bool:
        return DIVERGENCES[self.divergence].uses_target

    @property
    def adaspec(self) -> bool:
        return self.adaspec_fraction is not None

    def divergence_fn(self) -> DivergenceFn:
        """The registered function with this spec's hyperparameters bound: (p_logits, q_logits) -> values."""
        entry = DIVERGENCES[self.divergence]
        kwargs = {name: getattr(self, name) for name in entry.hyperparams}
        return lambda p_logits, q_logits: entry.fn(p_logits, q_logits, **kwargs)


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


def scan_positions(fn: Callable, init, xs_bt, chunk: int, *, remat: bool = False):
    """(carry, ys_bt): `fn(carry, xs_bc) -> (carry, ys_bc)` run over chunks of C = `chunk` positions.

    xs_bt is a pytree of [B, T, ...] arrays, ys_bc a pytree of [B, C, ...] arrays (or None). With chunk = 0
    or chunk >= T, fn sees the whole sequence at once; otherwise a `lax.scan` walks M = ceil(T / C) chunks, the
    last one zero-padded (fn must give padded positions no weight in its carry; they are cut from ys).
    Only [B, C, V] distributions then exist at a time, which is what keeps V = 151936 in memory (design §3).
    remat: the body is rematerialised, so a backward pass recomputes each chunk's logits from its [B, C, D]
    hidden states instead of keeping them (the training losses; evaluation never rematerialises).
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
    carry, ys_mbc = jax.lax.scan(body, init, jax.tree.map(to_chunks, xs_bt))
    return carry, jax.tree.map(from_chunks, ys_mbc)


class TokenValues(NamedTuple):
    """Per-position values [B, T]; only `divergence` carries a gradient (towards the draft)."""

    divergence: jax.Array  # the configured divergence D(p, q)
    tvd: jax.Array  # TVD(p, q), for the acceptance estimate 1 − TVD
    adaspec_delta: jax.Array | None  # ΔL = KL(p‖q_draft) − KL(p‖q_ref) when AdaSPEC is on, else None


def _chunk_values(spec: LossSpec, real_vocab_size: int, draft_head: Head, target_head: Head | None,
                  reference_head: Head | None, draft_h_bcd: jax.Array, target_h_bcd: jax.Array | None,
                  reference_h_bcd: jax.Array | None, labels_bc: jax.Array) -> tuple[jax.Array, ...]:
    """Values [B, C] of one chunk: (divergence, tvd[, adaspec_delta])."""
    sampler = Sampler(temperature=spec.temperature)
    q_bcv = filtered_logits(draft_head(draft_h_bcd), sampler, real_vocab_size)
    if spec.uses_target:
        # The target is frozen: its logits are constants of the draft's loss.
        p_bcv = jax.lax.stop_gradient(filtered_logits(target_head(target_h_bcd), sampler, real_vocab_size))
    else:
        p_bcv = one_hot_logits(labels_bc, q_bcv.shape[-1])
    divergence_bc = spec.divergence_fn()(p_bcv, q_bcv)
    q_const_bcv = jax.lax.stop_gradient(q_bcv)
    # The acceptance metric never contributes a gradient; when the loss is TVD it is the same value.
    tvd_bc = jax.lax.stop_gradient(divergence_bc) if spec.divergence == "tvd" else total_variation(p_bcv, q_const_bcv)
    if not spec.adaspec:
        return divergence_bc, tvd_bc
    # AdaSPEC scores tokens by forward KL whatever the trained divergence: the reference draft was
    # distilled with FKL, and the paper's ΔL is the gap between the two drafts' KL(p‖·).
    ref_bcv = jax.lax.stop_gradient(filtered_logits(reference_head(reference_h_bcd), sampler, real_vocab_size))
    delta_bc = forward_kl(p_bcv, q_const_bcv) - forward_kl(p_bcv, ref_bcv)
    return divergence_bc, tvd_bc, delta_bc


def token_values(
    spec: LossSpec,
    real_vocab_size: int,
    draft_head: Head,
    draft_h_btd: jax.Array,
    target_head: Head | None,
    target_h_btd: jax.Array | None,
    labels_bt: jax.Array,
    reference_head: Head | None = None,
    reference_h_btd: jax.Array | None = None,
) -> TokenValues:
    """Per-position divergence, TVD and (AdaSPEC) ΔL, [B, T] each, from the models' hidden states.

    Heads map hidden states [B, C, D] to float32 logits [B, C, V]; the target's and the reference's
    are evaluated under stop_gradient. With spec.chunk = C > 0 (and C < T) the sequence is processed
    in ceil(T / C) chunks by a scan whose body is rematerialised: in the backward pass each chunk's
    logits are recomputed from [B, C, D] hidden states instead of being kept from the forward pass.
    The hidden states may have different widths D per model; only V must agree.
    """
    if spec.uses_target and (target_head is None or target_h_btd is None):
        raise ValueError(f"divergence {spec.divergence!r} needs the target's head and hidden states")
    if spec.adaspec and (reference_head is None or reference_h_btd is None):
        raise ValueError("AdaSPEC (adaspec_fraction set) needs the reference draft's head and hidden states")
    inputs = {"draft_h_bcd": draft_h_btd, "labels_bc": labels_bt}
    if spec.uses_target:
        inputs["target_h_bcd"] = jax.lax.stop_gradient(target_h_btd)
    if spec.adaspec:
        inputs["reference_h_bcd"] = jax.lax.stop_gradient(reference_h_btd)

    def values(carry: None, chunk_inputs: dict[str, jax.Array]) -> tuple[None, tuple[jax.Array, ...]]:
        return carry, _chunk_values(spec, real_vocab_size, draft_head, target_head, reference_head,
                                    chunk_inputs["draft_h_bcd"], chunk_inputs.get("target_h_bcd"),
                                    chunk_inputs.get("reference_h_bcd"), chunk_inputs["labels_bc"])

    _, out = scan_positions(values, None, inputs, spec.chunk, remat=True)
    return TokenValues(divergence=out[0], tvd=out[1], adaspec_delta=out[2] if spec.adaspec else None)


# ----------------------------------------------------------------------------------------------
# AdaSPEC selection and the masked global mean
# ----------------------------------------------------------------------------------------------


def adaspec_select(delta_bt: jax.Array, counted_bt: jax.Array, fraction: float) -> jax.Array:
    """float32 [B, T]: 1 on the ceil(fraction · count) counted positions of largest ΔL, else 0.

    AdaSPEC (Hu et al. 2025): ΔL = L_draft − L_ref is large where the reference (same init, distilled
    with FKL) fits the target but the draft does not yet, i.e. tokens the draft can still learn; the
    smallest ΔL are the tokens too hard for a draft of this size, and are left out. The ranking runs
    over the whole global batch (a global sort), and ties break by position, so the selection does
    not depend on sharding. It is a constant of the loss (no gradient flows through it).
    """
    counted_flat = counted_bt.reshape(-1) > 0
    score_flat = jnp.where(counted_flat, jax.lax.stop_gradient(delta_bt).reshape(-1), -jnp.inf)
    count = jnp.sum(counted_flat.astype(jnp.int32))
    keep = jnp.ceil(fraction * count.astype(jnp.float32) - _CEIL_SLACK).astype(jnp.int32)
    order = jnp.argsort(-score_flat, stable=True)  # descending ΔL; uncounted (-inf) come last
    rank_flat = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    selected_flat = (rank_flat < keep) & counted_flat
    return selected_flat.reshape(delta_bt.shape).astype(jnp.float32)


def loss_weights(spec: LossSpec, loss_mask_bt: jax.Array, adaspec_delta_bt: jax.Array | None) -> jax.Array:
    """Unnormalised per-position weights [B, T] of the loss: the counted mask, AdaSPEC-selected if on."""
    counted = counted_mask(loss_mask_bt)
    if not spec.adaspec:
        return counted
    return counted * adaspec_select(adaspec_delta_bt, counted, spec.adaspec_fraction)


def metric_sums(values: TokenValues, loss_mask_bt: jax.Array, weights_bt: jax.Array) -> dict[str, jax.Array]:
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
    if values.adaspec_delta is not None:
        sums["adaspec_delta_sum"] = jnp.sum(counted * values.adaspec_delta)
    return sums


def finalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from global sums: loss (over the loss's tokens), divergence and acceptance = 1 − TVD (over
    every counted token), token counts and, with AdaSPEC, the selected fraction and mean ΔL."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
        "loss": sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "divergence": sums["divergence_sum"] / tokens,
        "tvd": sums["tvd_sum"] / tokens,
        "acceptance": 1.0 - sums["tvd_sum"] / tokens,
        "tokens": sums["tokens"],
    }
    if "adaspec_delta_sum" in sums:
        metrics["selected_fraction"] = sums["weight_sum"] / tokens
        metrics["adaspec_delta"] = sums["adaspec_delta_sum"] / tokens
    return metrics


def reduce_loss(spec: LossSpec, values: TokenValues, loss_mask_bt: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics): loss = Σ w·D / Σ w over the global batch, w the counted (and selected) positions."""
    weights = loss_weights(spec, loss_mask_bt, values.adaspec_delta)
    sums = metric_sums(values, loss_mask_bt, weights)
    loss = jnp.sum(weights * values.divergence) / jnp.maximum(sums["weight_sum"], 1.0)
    return loss, finalize_metrics(sums)


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) straight from logits [B, T, V] (small shapes and tests; models use `token_values`
    with their heads so that full logits are never materialised)."""
    if labels_bt is None:
        labels_bt = jnp.zeros(q_logits_btv.shape[:2], jnp.int32)
    values = token_values(spec, real_vocab_size, _identity_head, q_logits_btv, _identity_head, p_logits_btv,
                          labels_bt, _identity_head, reference_logits_btv)
    return reduce_loss(spec, values, loss_mask_bt)
