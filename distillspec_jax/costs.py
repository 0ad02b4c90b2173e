"""What a Qwen3 step costs and what a chip offers: byte and FLOP counts of a model's forward pass and decode step
(dense or MoE: an MoE call reads the union of the experts its tokens route to), and the memory, peak FLOP/s and
bandwidth of known accelerators. Shared by the pre-flight (`aot`), its roofline
estimates, and the benchmarks' rooflines (bench/common.py).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from distillspec_jax.models import catalog, qwen3, qwen3_moe

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: the memory the verdict budgets against, and the vendor peaks of the roofline."""

    name: str  # short name: v5p, H100
    hbm_bytes: int  # memory per chip (design §9)
    peak_flops: float  # dense bfloat16 FLOP/s per chip, vendor figure
    hbm_bytes_per_s: float  # HBM bandwidth per chip, vendor figure


# Keyed by jax's Device.device_kind (GPUs by the prefix of theirs, e.g. 'NVIDIA H100 80GB HBM3').
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1.23e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 0.82e12),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2.77e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1.64e12),
    "NVIDIA H100": Chip("H100", 80 * 10**9, 989e12, 3.35e12),
    "NVIDIA H200": Chip("H200", 141 * 10**9, 989e12, 4.8e12),
}


def chip(device_kind: str) -> Chip:
    """The Chip of a jax device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3') or of a short name ('v5e', 'H100')."""
    for kind, c in CHIPS.items():
        if device_kind == kind or device_kind == c.name or (kind.startswith("NVIDIA") and device_kind.startswith(kind)):
            return c
    raise ValueError(f"no HBM figure for device kind {device_kind!r}; known: {sorted(CHIPS)} "
                     f"(or short names {[c.name for c in CHIPS.values()]})")


# ----------------------------------------------------------------------------------------------
# Counting bytes and FLOPs
# ----------------------------------------------------------------------------------------------


def dtype_bytes(name: str) -> int:
    return jnp.dtype(qwen3.resolve_dtype(name)).itemsize


def matmul_params(cfg: qwen3.Qwen3Config) -> int:
    """Parameters that one token multiplies: all of them except an untied input embedding, which is only
    gathered (B rows per step), and, in an MoE model, the experts the token is not routed to. A tied
    embedding is the LM head and is read whole."""
    return cfg.active_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def expert_params(cfg: qwen3_moe.Qwen3MoeConfig) -> int:
    """Parameters of one expert of one layer (gate, up and down)."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def expected_experts_read(cfg: qwen3_moe.Qwen3MoeConfig, tokens: float) -> float:
    """Distinct experts per sparse layer that `tokens` tokens route to, if each token's A experts were a uniform
    draw: E·(1 − (1 − A/E)^tokens). An estimate for planning; `expert_union.union_counts` measures the real count."""
    return cfg.num_experts * (1.0 - (1.0 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens)


def weight_bytes_read(cfg: qwen3.Qwen3Config, tokens: float, experts_read: float | None = None) -> float:
    """Bytes of weights one call of `tokens` tokens reads: every matmul weight of a dense model; in an MoE model
    everything but the experts, plus the union of the experts its tokens route to in each sparse layer
    (`experts_read` per layer, measured, or the uniform-routing estimate)."""
    if not catalog.is_moe(cfg):
        return matmul_params(cfg) * dtype_bytes(cfg.param_dtype)
    sparse = cfg.mlp_kinds().count(qwen3_moe.MOE_MLP)
    routed = sparse * cfg.num_experts_per_tok * expert_params(cfg)  # the active share counted in matmul_params
    if experts_read is None:
        experts_read = expected_experts_read(cfg, tokens)
    return (matmul_params(cfg) - routed + sparse * experts_read * expert_params(cfg)) * dtype_bytes(cfg.param_dtype)


def kv_bytes_per_token(cfg: qwen3.Qwen3Config) -> int:
    """Bytes of keys and values one cached position holds, over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes(cfg.dtype)


def decode_step_bytes(cfg: qwen3.Qwen3Config, batch: int, context: float, tokens_per_row: int = 1,
                      experts_read: float | None = None) -> float:
    """Bytes one cached call of `tokens_per_row` tokens per row must read at least: the weights it uses once
    (`weight_bytes_read` of its batch * tokens_per_row tokens), plus each row's `context` cached positions.
    (Activations, the embedding rows and the cache writes are a few KB and are left out.)"""
    return (weight_bytes_read(cfg, batch * tokens_per_row, experts_read)
            + batch * context * kv_bytes_per_token(cfg))


def verify_cost_ratio(cfg: qwen3.Qwen3Config, batch: int, gamma: int, context: float,
                      verify_experts: float | None = None, step_experts: float | None = None) -> float:
    """v: the bytes of a verify call (γ + 1 tokens per row) over the bytes of one decode step, at the same
    context. 1 for a dense model up to the KV written; for an MoE model the union of the experts of the
    batch's B·(γ + 1) tokens against the B tokens' (measured counts per layer, or the uniform estimate)."""
    return (decode_step_bytes(cfg, batch, context, gamma + 1, verify_experts)
            / decode_step_bytes(cfg, batch, context, 1, step_experts))


def attention_flops_per_token(cfg: qwen3.Qwen3Config, context: float) -> float:
    """Forward FLOPs of q·k and p·v for one query over `context` keys, all layers."""
    return 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context


def forward_flops_per_token(cfg: qwen3.Qwen3Config, context: float) -> float:
    """2·N (matmul weights) + attention, the forward pass of one token that attends to `context` keys."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, context)
