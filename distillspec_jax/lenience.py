"""Lossy speculative decoding (DistillSpec §5; Leviathan et al. 2023, §A.5): a lenience function f(p, ε) relaxes
the acceptance test of a draft token x from min(1, p(x)/q(x)) to min(1, f(p(x), ε)/q(x)), and the output law
that the relaxed test produces, in closed form.

Forms, registered by name (ε ∈ (0, 1]; f(p, 1) = p, the lossless rule; f(p, ε) ≥ p and it grows as ε falls):

    p_over_eps     f = p / ε
    p_over_eps2    f = p / ε²
    p_pow_eps      f = p^ε

The rejection step is the lossless one: at the first rejected position a token is drawn from the residual
r = norm(max(p − q, 0)) (DistillSpec changes only the test). With f ≥ p a rejection still implies p(x) < q(x),
so r has mass wherever a rejection can happen. At one position, a draft token y ~ q passes with probability
min(1, f(p(y))/q(y)), so

    P_ε(y) = min(q(y), f(p(y), ε)) + (1 − β_ε) · r(y),    β_ε = Σ_x min(q(x), f(p(x), ε)),

where β_ε is the probability that the position's draft token is accepted. At ε = 1, P_1 = min(p, q) +
(1 − Σ min(p, q)) · norm(max(p − q, 0)) = p. As ε → 0 (f → ∞ where p > 0), P_ε → q on the support of p.

Every position of a block follows P_ε of its own (p, q) whatever happened before it in the block (the draft's
token there is a fresh draw from q given the prefix), except the bonus token after γ accepts, which is drawn
from p; a row's output is therefore the product of these per-position laws over its prefix.

Dimension letters (style.md): V vocabulary; `...` any leading dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LenienceForm = Callable[[jax.Array, jax.Array], jax.Array]  # f(p, ε): elementwise, ε broadcast against p

LENIENCE_FORMS: dict[str, LenienceForm] = {}


def register_lenience(name: str, form: LenienceForm) -> LenienceForm:
    """Adds f(p, ε) under `name` (refused if taken), so that `speculative_generate(..., lenience=name)` and the
    closed forms below use it. A form must satisfy f(p, 1) = p (ε = 1 is lossless) and f(p, ε) ≥ p (the
    rejection residual then always has mass)."""
    if name in LENIENCE_FORMS:
        raise ValueError(f"lenience form {name!r} is already registered")
    LENIENCE_FORMS[name] = form
    return form


register_lenience("p_over_eps", lambda p, eps: p / eps)
register_lenience("p_over_eps2", lambda p, eps: p / (eps * eps))
register_lenience("p_pow_eps", lambda p, eps: jnp.where(p > 0, jnp.power(jnp.where(p > 0, p, 1.0), eps), 0.0))


def check_lenience(lenience: str | None, epsilon: float | None) -> None:
    """A registered form with ε ∈ (0, 1], or neither (the lossless rule)."""
    if lenience is None:
        if epsilon is not None:
            raise ValueError(f"epsilon={epsilon} was given without a lenience form; choose one of "
                             f"{sorted(LENIENCE_FORMS)} or leave epsilon out for the lossless rule")
        return
    if lenience not in LENIENCE_FORMS:
        raise ValueError(f"unknown lenience form {lenience!r}; choose one of {sorted(LENIENCE_FORMS)}")
    if epsilon is None or not 0.0 < float(epsilon) <= 1.0:
        raise ValueError(f"lenience {lenience!r} needs epsilon in (0, 1] (1 = lossless), got {epsilon}")


def parse_forms(text: str) -> tuple[str, ...]:
    """config eval.lenience: '' (off) or comma-separated registered form names, in the order given."""
    forms = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in forms if x not in LENIENCE_FORMS]
    if unknown:
        raise ValueError(f"comma-separated lenience forms from {', '.join(sorted(LENIENCE_FORMS))} (unknown: "
                         f"{', '.join(unknown)})")
    return forms


def lenient_p(p: jax.Array, lenience: str, epsilon) -> jax.Array:
    """f(p, ε) of the named form."""
    return LENIENCE_FORMS[lenience](p, jnp.asarray(epsilon, p.dtype))


def accepted_mass(p_v: jax.Array, q_v: jax.Array, lenience: str | None, epsilon=None) -> jax.Array:
    """min(q, f(p, ε)) [..., V]: per token, the probability of proposing it and accepting it (lossless: min(p, q))."""
    return jnp.minimum(q_v, p_v if lenience is None else lenient_p(p_v, lenience, epsilon))


def acceptance_probability(p_v: jax.Array, q_v: jax.Array, lenience: str | None, epsilon=None) -> jax.Array:
    """β_ε = Σ_v min(q, f(p, ε)) [...]: the chance that one position's draft token is accepted."""
    return jnp.sum(accepted_mass(p_v, q_v, lenience, epsilon), axis=-1)


def output_law(p_v: jax.Array, q_v: jax.Array, lenience: str | None, epsilon=None) -> jax.Array:
    """P_ε [..., V] of one position (see the module docstring); p_v and q_v are distributions over V."""
    accepted_v = accepted_mass(p_v, q_v, lenience, epsilon)
    residual_v = jnp.maximum(p_v - q_v, 0.0)
    residual_mass = jnp.sum(residual_v, axis=-1, keepdims=True)
    rejected = jnp.maximum(1.0 - jnp.sum(accepted_v, axis=-1, keepdims=True), 0.0)
    # p = q leaves no residual, and then nothing is ever rejected (β = 1).
    return accepted_v + rejected * jnp.where(residual_mass > 0, residual_v / jnp.where(residual_mass > 0,
                                                                                       residual_mass, 1.0), 0.0)


def law_distance(p_v: jax.Array, q_v: jax.Array, lenience: str | None, epsilon=None) -> jax.Array:
    """TVD(P_ε, p) = ½ Σ_v |P_ε − p| [...]: how far one position's output law is from the target's (0 lossless)."""
    return 0.5 * jnp.sum(jnp.abs(output_law(p_v, q_v, lenience, epsilon) - p_v), axis=-1)
