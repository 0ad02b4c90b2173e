"""The MoE cost of speculative decoding (design §5): how many distinct experts a verify call reads.

A decode step of B rows reads, in each sparse layer, the union of the experts its B tokens route to; a verify
call reads the union over B·(γ + 1) tokens. The verify call's cost against a step, v_moe, is then the ratio of
their bytes (`costs.verify_cost_ratio`), and the MoE prediction of the speedup is τ / (γ·c + v_moe(γ)) beside
the dense formula's τ / (γ·c + 1) and the measured-v one.

The counts are measured on the target's routing of real continuations: windows of γ + 1 consecutive response
tokens stand for the γ + 1 tokens of a verify call (a verify call's accepted tokens are exactly such a window;
its rejected drafts are other tokens of the same text distribution), and the rows of one batch are aligned by
window index, as the batched loop verifies every row's k-th block in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distillspec_jax import costs
from distillspec_jax.models import qwen3_moe


def window_presence(experts_lbsa: np.ndarray, starts_b: np.ndarray, lengths_b: np.ndarray, width: int,
                    num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(presence_lbke, valid_bk): whether expert e is routed to by any token of row b's k-th window of `width`
    response tokens (positions starts_b[b] + k·width ...), per sparse layer l; valid marks the full windows."""
    layers, rows = experts_lbsa.shape[:2]
    windows = int(np.max(lengths_b) // width) if rows else 0
    presence = np.zeros((layers, rows, windows, num_experts), bool)
    valid = np.zeros((rows, windows), bool)
    layer_l1 = np.arange(layers)[:, None]
    for b in range(rows):
        for k in range(int(lengths_b[b]) // width):
            start = int(starts_b[b]) + k * width
            presence[layer_l1, b, k, experts_lbsa[:, b, start:start + width].reshape(layers, -1)] = True
            valid[b, k] = True
    return presence, valid


def union_counts(experts_lbsa: np.ndarray, starts_b: np.ndarray, lengths_b: np.ndarray, width: int, batch: int,
                 num_experts: int) -> dict[str, float]:
    """Mean distinct experts per sparse layer in a window of `width` tokens: of one row ('per_row'), and of
    `batch` consecutive rows at the same window index ('per_batch': what one batched call reads). Windows
    are counted where every row of the group has a full one."""
    presence, valid = window_presence(experts_lbsa, starts_b, lengths_b, width, num_experts)
    per_row = presence.sum(-1)[:, valid]
    groups = []
    for first in range(0, presence.shape[1] - batch + 1, batch):
        rows = slice(first, first + batch)
        common_k = valid[rows].all(axis=0)
        groups.append(presence[:, rows][:, :, common_k].any(axis=1).sum(-1).ravel())
    per_batch = np.concatenate(groups) if groups else np.zeros(0)
    return {"per_row": float(per_row.mean()) if per_row.size else float("nan"),
            "per_batch": float(per_batch.mean()) if per_batch.size else float("nan"),
            "windows": int(per_batch.size)}


def union_table(cfg: qwen3_moe.Qwen3MoeConfig, experts_lbsa: np.ndarray, starts_b: np.ndarray,
                lengths_b: np.ndarray, gammas: Sequence[int], batches: Sequence[int], context: float
                ) -> list[dict[str, Any]]:
    """Per (γ, batch size): the measured experts per layer of a decode step (B tokens) and of a verify call
    (B·(γ + 1) tokens), per row and per batch, the uniform-routing estimate, and v_moe, the bytes of the verify
    call over the step's at `context` cached positions (weights of the unions, attention, KV cache)."""
    table = []
    for batch in batches:
        step = union_counts(experts_lbsa, starts_b, lengths_b, 1, batch, cfg.num_experts)
        for gamma in gammas:
            verify = union_counts(experts_lbsa, starts_b, lengths_b, gamma + 1, batch, cfg.num_experts)
            row = {"gamma": int(gamma), "batch": int(batch), "windows": verify["windows"],
                   "experts_per_step": step["per_batch"], "experts_per_verify_row": verify["per_row"],
                   "experts_per_verify_batch": verify["per_batch"],
                   "experts_per_verify_uniform": costs.expected_experts_read(cfg, batch * (gamma + 1)),
                   "active_experts": cfg.num_experts_per_tok, "num_experts": cfg.num_experts}
            if verify["windows"]:
                row["verify_cost_ratio_moe"] = costs.verify_cost_ratio(
                    cfg, batch, gamma, context, verify_experts=verify["per_batch"], step_experts=step["per_batch"])
            table.append(row)
    return table
