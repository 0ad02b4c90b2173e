"""The MoE cost model's counts: the expert union of verify windows against a brute-force count with Python
sets, our routing against HF's own router, the uniform-routing closed form against simulation, and the bytes
ratio's limits."""

import jax.numpy as jnp
import numpy as np
import pytest

from distillspec_jax import costs, expert_union
from distillspec_jax.models import catalog, convert, qwen3_moe
from tests.tiny import TINY_MOE_BASE


def _brute_force(experts_lbsa, starts, lengths, width, batch):
    """Python sets: per row, and per group of `batch` rows at a common window index."""
    layers, rows = experts_lbsa.shape[:2]
    per_row, per_batch = [], []
    full = [int(n) // width for n in lengths]
    for b in range(rows):
        for k in range(full[b]):
            for layer in range(layers):
                window = experts_lbsa[layer, b, starts[b] + k * width: starts[b] + (k + 1) * width]
                per_row.append(len(set(window.ravel().tolist())))
    for first in range(0, rows - batch + 1, batch):
        group = range(first, first + batch)
        for k in range(min(full[b] for b in group)):
            for layer in range(layers):
                union = set()
                for b in group:
                    union |= set(experts_lbsa[layer, b, starts[b] + k * width: starts[b] + (k + 1) * width].ravel().tolist())
                per_batch.append(len(union))
    return np.mean(per_row), np.mean(per_batch), len(per_batch)


@pytest.mark.parametrize("width, batch", [(1, 1), (2, 1), (4, 2), (3, 4), (8, 3)])
def test_union_counts_equal_a_brute_force_count(width, batch):
    rng = np.random.default_rng(width * 10 + batch)
    layers, rows, seq, experts, active = 3, 6, 40, 16, 2
    experts_lbsa = np.stack([np.stack([np.stack([rng.choice(experts, active, replace=False) for _ in range(seq)])
                                       for _ in range(rows)]) for _ in range(layers)])
    starts, lengths = rng.integers(0, 10, rows), rng.integers(5, 30, rows)
    counts = expert_union.union_counts(experts_lbsa, starts, lengths, width, batch, experts)
    per_row, per_batch, windows = _brute_force(experts_lbsa, starts, lengths, width, batch)
    assert counts["per_row"] == pytest.approx(per_row) and counts["per_batch"] == pytest.approx(per_batch)
    assert counts["windows"] == windows > 0


def test_routed_experts_are_hfs_router_choices(tiny_moe_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_moe_checkpoints["normed_dense_layer"]  # layers 0 and 2 sparse
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen = []
    hooks = [hf.model.layers[i].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2])) for i in (0, 2)]
    tokens = np.random.RandomState(4).randint(0, TINY_MOE_BASE["vocab_size"], (2, 9))
    with torch.no_grad():
        hf(torch.tensor(tokens))
    for hook in hooks:
        hook.remove()
    ours = np.asarray(qwen3_moe.routed_experts(convert.load_hf(path), jnp.asarray(tokens)))
    assert ours.shape == (2, 2, 9, 2)
    want = np.stack([e.numpy().reshape(2, 9, 2) for e in seen])
    np.testing.assert_array_equal(np.sort(ours, -1), np.sort(want, -1))


def test_uniform_routing_estimate_matches_simulation():
    cfg = catalog.preset("Qwen3-30B-A3B")
    rng = np.random.default_rng(0)
    for tokens in (1, 5, 40):
        draws = [len(set(np.concatenate([rng.choice(128, 8, replace=False) for _ in range(tokens)]).tolist()))
                 for _ in range(400)]
        assert abs(np.mean(draws) - costs.expected_experts_read(cfg, tokens)) <= 5 * np.std(draws) / np.sqrt(400) + 1e-9


def test_verify_cost_ratio_limits():
    moe = catalog.preset("Qwen3-30B-A3B", param_dtype="bfloat16", dtype="bfloat16")
    dense = catalog.preset("Qwen3-8B", param_dtype="bfloat16", dtype="bfloat16")
    assert costs.verify_cost_ratio(dense, 4, 3, 512) == 1.0  # a dense verify call reads what a step reads
    # Every token routed to the same 8 experts: the union never grows, verify costs a step.
    assert costs.verify_cost_ratio(moe, 1, 5, 512, verify_experts=8, step_experts=8) == pytest.approx(1.0)
    # All 128 experts against 8: the expert weights (the bulk of 30B) read in full.
    ratio = costs.verify_cost_ratio(moe, 1, 7, 512, verify_experts=128, step_experts=8)
    full = costs.weight_bytes_read(moe, 8, 128) + 512 * costs.kv_bytes_per_token(moe)
    step = costs.weight_bytes_read(moe, 1, 8) + 512 * costs.kv_bytes_per_token(moe)
    assert ratio == pytest.approx(full / step) and ratio > 5
    assert costs.weight_bytes_read(moe, 1, 8) == pytest.approx(costs.matmul_params(moe) * 2)
