"""Qwen3-MoE in Flax NNX: dense Qwen3's attention, cache and decoder (`qwen3.Qwen3`) with routed experts as
the MLP of its sparse layers; the config with presets for the published MoE checkpoints.

Dimension letters beyond qwen3.py's: E experts, A experts each token is routed to (`num_experts_per_tok`),
M token-expert assignments (B * T * A, sorted by expert for the grouped matmul). F is the width of the MLP at
hand: `moe_intermediate_size` for an expert, `intermediate_size` for a dense layer.

Routing follows HF's Qwen3MoeSparseMoeBlock exactly, because the model must equal it: router logits
[B, T, E] in float32, softmax over E, the top A, renormalised over the A when `norm_topk_prob` is set.
It is dropless: every token reaches its A experts (no capacity factor).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from distillspec_jax.models import qwen3

MOE_MLP = "moe"  # the kind of a layer whose MLP is routed experts
# How the experts' matmuls run: a grouped matmul over the assignments sorted by expert (`ragged_dot`:
# FLOPs for the A routed experts only), or every expert on every token weighted by a one-hot combine
# (`dense`: E / A times the FLOPs, no sort or gather). `auto` picks per shape (`expert_impl_for`).
EXPERT_IMPLS = ("auto", "ragged", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(qwen3.Qwen3Config):
    """A Qwen3-MoE model: every field of dense Qwen3 plus the routed MLP's. Field names follow HF."""

    model_type: ClassVar[str] = "qwen3_moe"

    num_experts: int  # E: experts per sparse layer
    num_experts_per_tok: int  # A: experts each token is routed to
    moe_intermediate_size: int  # F of one expert
    norm_topk_prob: bool = True  # renormalise the A routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (those keep the dense MLP)
    expert_impl: str = "auto"  # how the experts' matmuls run: auto | ragged | dense (see EXPERT_IMPLS)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                             f"{self.num_experts}]: a token cannot be routed to more experts than the layer has")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_hidden_layers}-layer model")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert_impl {self.expert_impl!r}; use one of {EXPERT_IMPLS}")

    @classmethod
    def from_dense(cls, dense: qwen3.Qwen3Config, **moe_fields) -> Qwen3MoeConfig:
        """The dense config's attention, width and numerics with routed experts (`moe_fields`) as its MLPs."""
        return cls(**{f.name: getattr(dense, f.name) for f in dataclasses.fields(qwen3.Qwen3Config)}, **moe_fields)

    def mlp_kinds(self) -> tuple[str, ...]:
        """HF's rule: layer i is sparse unless listed in mlp_only_layers or skipped by decoder_sparse_step."""
        return tuple(MOE_MLP if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     else qwen3.DENSE_MLP for i in range(self.num_hidden_layers))

    def make_mlp(self, kind: str, rngs: nnx.Rngs) -> nnx.Module:
        if kind == MOE_MLP:
            return SparseMoe(self, rngs)
        return super().make_mlp(kind, rngs)

    def mlp_params(self, kind: str) -> int:
        if kind == MOE_MLP:
            return self.num_experts * (3 * self.hidden_size * self.moe_intermediate_size + self.hidden_size)
        return super().mlp_params(kind)

    def active_params(self) -> int:
        """Parameters one token reads: all but the experts it is not routed to (the 'A3B' of 30B-A3B)."""
        unrouted = self.num_experts - self.num_experts_per_tok
        per_expert = 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params() - self.mlp_kinds().count(MOE_MLP) * unrouted * per_expert


def _preset(hidden: int, ffn: int, expert_ffn: int, layers: int, heads: int) -> Qwen3MoeConfig:
    dense = qwen3.published_shape(hidden, ffn, layers, heads, tied=False, kv_heads=4)
    return Qwen3MoeConfig.from_dense(dense, moe_intermediate_size=expert_ffn, num_experts=128, num_experts_per_tok=8,
                                     norm_topk_prob=True)


# The published config.json of each Qwen3-MoE checkpoint (both: 4 kv heads of 128, 128 experts, 8 per token,
# norm_topk_prob true, decoder_sparse_step 1, no mlp_only_layers, rope_theta 1e6, rms_norm_eps 1e-6,
# max_position_embeddings 40960, vocab 151936, untied).
PRESETS: dict[str, Qwen3MoeConfig] = {
    "Qwen3-30B-A3B": _preset(2048, 6144, 768, 48, 32),
    "Qwen3-235B-A22B": _preset(4096, 12288, 1536, 94, 64),
}


# ----------------------------------------------------------------------------------------------
# The routed MLP
# ----------------------------------------------------------------------------------------------


def route(x_btd: jax.Array, router_de: jax.Array, active: int, normalise: bool) -> tuple[jax.Array, jax.Array]:
    """The A experts of every token and their weights: (weights_bta float32, experts_bta int32).

    Softmax over all E router logits in float32, then the top A (ties go to the lower expert index, as
    torch.topk does), renormalised over the A when `normalise`.
    """
    logits_bte = jnp.einsum("btd,de->bte", x_btd, router_de.astype(x_btd.dtype), preferred_element_type=jnp.float32)
    probs_bte = jax.nn.softmax(logits_bte, axis=-1)
    weights_bta, experts_bta = jax.lax.top_k(probs_bte, active)
    if normalise:
        weights_bta = weights_bta / jnp.sum(weights_bta, axis=-1, keepdims=True)
    return weights_bta, experts_bta.astype(jnp.int32)


def experts_dense(x_btd, weights_bta, experts_bta, gate_edf, up_edf, down_efd) -> jax.Array:
    """Every expert on every token, combined with the routing weights scattered over E (zero for the experts
    a token is not routed to): exact, E / A times the FLOPs, no sort, gather or scatter."""
    combine_bte = jnp.einsum("bta,btae->bte", weights_bta,
                             jax.nn.one_hot(experts_bta, gate_edf.shape[0], dtype=weights_bta.dtype))
    gate_btef = jnp.einsum("btd,edf->btef", x_btd, gate_edf)
    up_btef = jnp.einsum("btd,edf->btef", x_btd, up_edf)
    out_bted = jnp.einsum("btef,efd->bted", jax.nn.silu(gate_btef) * up_btef, down_efd)
    return jnp.einsum("bted,bte->btd", out_bted, combine_bte.astype(x_btd.dtype))


def experts_ragged(x_btd, weights_bta, experts_bta, gate_edf, up_edf, down_efd) -> jax.Array:
    """The grouped matmul: the M = B * T * A assignments sorted by expert, one `ragged_dot` per projection
    over the groups, then each token's A outputs summed with their routing weights."""
    b, t, d = x_btd.shape
    active, num_experts = experts_bta.shape[-1], gate_edf.shape[0]
    experts_m = experts_bta.reshape(-1)
    order_m = jnp.argsort(experts_m, stable=True)  # assignment m belongs to token m // A
    x_md = x_btd.reshape(b * t, d)[order_m // active]
    sizes_e = jnp.bincount(experts_m, length=num_experts).astype(jnp.int32)
    gate_mf = jax.lax.ragged_dot(x_md, gate_edf, sizes_e)
    up_mf = jax.lax.ragged_dot(x_md, up_edf, sizes_e)
    out_md = jax.lax.ragged_dot(jax.nn.silu(gate_mf) * up_mf, down_efd, sizes_e)
    out_btad = out_md[jnp.argsort(order_m)].reshape(b, t, active, d)  # back to token order
    return jnp.einsum("btad,bta->btd", out_btad, weights_bta.astype(x_btd.dtype))


EXPERT_FUNCTIONS = {"ragged": experts_ragged, "dense": experts_dense}

# `auto` computes every expert densely when a call has at most this many tokens (B * T): every decode step and
# verify call up to B * (γ + 1) = 256, while prefills and training steps take the grouped matmul. Measured with
# bench/moe.py (docs/moe.md), E = 128, A = 8, D = 1024, F = 384: on CPU the dense form was faster at every count
# up to 512 (ragged_dot's CPU lowering touches every group); in XLA's TPU cost estimate both read the same
# weight bytes, and the dense form's 16x FLOPs stay under v5p's ridge point up to about 400 tokens. Under GSPMD the
# grouped form's verify call also needed 4-9x the temporaries per chip (30B-A3B pre-flight, docs/moe.md).
DENSE_MAX_TOKENS = 256


def expert_impl_for(impl: str, tokens: int) -> str:
    """The expert implementation for a call of `tokens` tokens (B * T; static under jit)."""
    if impl != "auto":
        return impl
    return "dense" if tokens <= DENSE_MAX_TOKENS else "ragged"


class SparseMoe(nnx.Module):
    """The routed MLP of one sparse layer: a router [D, E] and E SwiGLU experts stacked as [E, D, F] / [E, F, D]."""

    def __init__(self, cfg: Qwen3MoeConfig, rngs: nnx.Rngs):
        pdt = qwen3.resolve_dtype(cfg.param_dtype)
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.active, self.normalise, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.expert_impl
        self.router = nnx.Param(qwen3.normal_init(rngs, (d, e), pdt), axes=("embed", "expert_logits"))
        self.gate_proj = nnx.Param(qwen3.normal_init(rngs, (e, d, f), pdt), axes=("expert", "expert_embed", "expert_mlp"))
        self.up_proj = nnx.Param(qwen3.normal_init(rngs, (e, d, f), pdt), axes=("expert", "expert_embed", "expert_mlp"))
        self.down_proj = nnx.Param(qwen3.normal_init(rngs, (e, f, d), pdt), axes=("expert", "expert_mlp", "expert_embed"))

    def routing(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(weights_bta, experts_bta) of the tokens (see `route`)."""
        return route(x_btd, self.router[...], self.active, self.normalise)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = x_btd.dtype
        weights_bta, experts_bta = self.routing(x_btd)
        compute = EXPERT_FUNCTIONS[expert_impl_for(self.impl, x_btd.shape[0] * x_btd.shape[1])]
        return compute(x_btd, weights_bta, experts_bta, self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt),
                       self.down_proj[...].astype(dt))


def routed_experts(model: qwen3.Qwen3, tokens_bt: jax.Array) -> jax.Array:
    """experts_lbta: the A experts of every token in every sparse layer (in layer order) of a causal pass,
    [L_sparse, B, T, A] int32. What the expert-union cost model counts."""
    cfg = model.cfg
    experts = []
    for (start, kinds), mlp_in_lbtd in zip(qwen3.layer_runs(cfg), model.mlp_inputs(tokens_bt)):
        if kinds[0] != MOE_MLP:
            continue
        router_lde = getattr(model, qwen3.run_name(start)).mlp.router[...]
        route_layer = jax.vmap(lambda x, r: route(x, r, cfg.num_experts_per_tok, cfg.norm_topk_prob)[1])
        experts.append(route_layer(mlp_in_lbtd, router_lde))
    return jnp.concatenate(experts, axis=0)
