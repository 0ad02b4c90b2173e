"""Token selection: which of the counted positions the loss trains on. A registry, like the divergences.

Design §3. A selection is registered under its config name (`distill.selection`) with `@register(name)`:
- `weights(counted_bt, score_bt, **hyperparameters) -> float32 [B, T]`, the loss's unnormalised weights over
  the whole global batch (a global ranking is a global sort under jit, so it does not depend on sharding);
- optionally a per-token `score(p_bcv, q_bcv, reference_bcv) -> [B, C]` that the chunked loss computes from
  the distributions it already holds (no gradient flows through it), and the frozen `reference` draft that
  score compares against, trained before the run with `reference_divergence`.

`all` trains every counted position. `adaspec` is AdaSPEC (Hu et al. 2025).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from distillspec_jax.divergences import forward_kl

# AdaSPEC keeps the ceil(k * count) tokens of largest ΔL; this slack keeps ceil() from rounding an
# exact integer such as 0.4 * 10 = 4.0000001 (float32) up to 5.
_CEIL_SLACK = 1e-4

# (p_bcv, q_bcv, reference_bcv) -> per-token score [B, C]; all three are constants of the loss.
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (counted_bt, score_bt | None, **hyperparameters) -> float32 weights [B, T]
WeightsFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Selection:
    """A registered token selection and what it needs."""

    weights: WeightsFn
    title: str  # how reports name it (AdaSPEC)
    score: ScoreFn | None = None  # per-token score from the chunk's distributions; None = no score
    score_metric: str = ""  # metrics name of the score's mean over counted tokens
    reference_divergence: str = ""  # the frozen reference draft is first distilled with this; '' = no reference
    hyperparams: tuple[str, ...] = ()  # LossSpec fields passed to `weights` as keyword arguments

    @property
    def uses_reference(self) -> bool:
        return bool(self.reference_divergence)


SELECTIONS: dict[str, Selection] = {}


def register(name: str, *, title: str = "", score: ScoreFn | None = None, score_metric: str = "",
             reference_divergence: str = "", hyperparams: tuple[str, ...] = ()):
    """Decorator: registers a token selection's weights function under its config name."""

    def add(fn: WeightsFn) -> WeightsFn:
        if name in SELECTIONS:
            raise ValueError(f"token selection {name!r} is already registered")
        if (score is None) != (not reference_divergence):
            raise ValueError(f"selection {name!r}: a score compares against the reference draft; give both or neither")
        SELECTIONS[name] = Selection(fn, title or name, score, score_metric, reference_divergence, hyperparams)
        return fn

    return add


@register("all")
def all_counted(counted_bt: jax.Array, score_bt: jax.Array | None) -> jax.Array:
    """Every counted position, with weight 1."""
    del score_bt
    return counted_bt


def adaspec_gap(p_bcv: jax.Array, q_bcv: jax.Array, reference_bcv: jax.Array) -> jax.Array:
    """ΔL = KL(p‖q_draft) − KL(p‖q_ref), per token. Forward KL whatever the trained divergence: the reference
    was distilled with FKL, and the paper's ΔL is the gap between the two drafts' KL(p‖·)."""
    return forward_kl(p_bcv, q_bcv) - forward_kl(p_bcv, reference_bcv)


@register("adaspec", title="AdaSPEC", score=adaspec_gap, score_metric="adaspec_delta", reference_divergence="fkl",
          hyperparams=("adaspec_fraction",))
def adaspec_select(counted_bt: jax.Array, score_bt: jax.Array, adaspec_fraction: float) -> jax.Array:
    """float32 [B, T]: 1 on the ceil(k · count) counted positions of largest ΔL, else 0 (k = adaspec_fraction).

    AdaSPEC (Hu et al. 2025): ΔL = L_draft − L_ref is large where the reference (same init, distilled
    with FKL) fits the target but the draft does not yet, i.e. tokens the draft can still learn; the
    smallest ΔL are the tokens too hard for a draft of this size, and are left out. The ranking runs
    over the whole global batch (a global sort), and ties break by position, so the selection does
    not depend on sharding. It is a constant of the loss (no gradient flows through it).
    """
    counted_flat = counted_bt.reshape(-1) > 0
    score_flat = jnp.where(counted_flat, jax.lax.stop_gradient(score_bt).reshape(-1), -jnp.inf)
    count = jnp.sum(counted_flat.astype(jnp.int32))
    keep = jnp.ceil(adaspec_fraction * count.astype(jnp.float32) - _CEIL_SLACK).astype(jnp.int32)
    order = jnp.argsort(-score_flat, stable=True)  # descending ΔL; uncounted (-inf) come last
    rank_flat = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    selected_flat = (rank_flat < keep) & counted_flat
    return counted_bt * selected_flat.reshape(score_bt.shape).astype(jnp.float32)
