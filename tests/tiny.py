"""Tiny random Qwen3 and Qwen3-MoE checkpoints made with transformers itself, the reference we must match."""

from __future__ import annotations

import pathlib

import numpy as np

# Tiny shapes (design §8): vocab of a few hundred, 2 layers, hidden 64.
TINY_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                 max_position_embeddings=256, rope_theta=10000.0)
TINY_CASES = {
    "tied_gqa": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2),
    "untied_gqa": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2),
    "tied_mha": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    "untied_mha": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4),
}


# Tiny Qwen3-MoE shapes: 8 experts of width 32, 2 per token, GQA; the cases cover both routing weightings
# and both of HF's ways of keeping a layer dense.
TINY_MOE_BASE = dict(TINY_BASE, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, tie_word_embeddings=False)
TINY_MOE_CASES = {
    "normed_dense_layer": dict(norm_topk_prob=True, mlp_only_layers=[1]),
    "unnormed_sparse_step": dict(norm_topk_prob=False, decoder_sparse_step=2),
}


def _randomise_norms(model):
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # HF initialises norms to 1; make them distinguishable
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            if name.endswith("mlp.gate.weight"):  # HF's router starts at 0 (uniform routing); make it route
                param.normal_(0.0, 0.5)
    return model


def hf_qwen3(seed: int = 0, **overrides):
    """A transformers Qwen3ForCausalLM in float32 and eval mode, with every weight random."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return _randomise_norms(Qwen3ForCausalLM(Qwen3Config(**{**TINY_BASE, **overrides})).eval())


def hf_qwen3_moe(seed: int = 0, **overrides):
    """A transformers Qwen3MoeForCausalLM in float32 and eval mode, with every weight random, the router's too."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return _randomise_norms(Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE_BASE, **overrides})).eval())


def write_hf_checkpoint(path: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    model = hf_qwen3(seed, **overrides)
    model.save_pretrained(path)
    return path


def write_hf_moe_checkpoint(path: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    hf_qwen3_moe(seed, **overrides).save_pretrained(path)
    return path


def hf_logits(path_or_model, tokens_bt: np.ndarray, attention_mask_bt: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [B, T, V] from transformers' PyTorch Qwen3 or Qwen3-MoE (a model, or a checkpoint folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, (str, pathlib.Path)):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    kwargs = {}
    if attention_mask_bt is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask_bt)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens_bt), dtype=torch.long), **kwargs).logits.float().numpy()
