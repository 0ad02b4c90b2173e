"""The Flax Qwen3-MoE computes what transformers' Qwen3MoeForCausalLM computes: both routing weightings, dense
layers among sparse ones, GQA, ragged batches, prefill and cached decode, both expert implementations, router
ties; and the published shapes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from distillspec_jax.models import catalog, convert, qwen3, qwen3_moe
from tests.tiny import TINY_MOE_BASE, TINY_MOE_CASES, hf_logits, hf_qwen3_moe

ATOL = 1e-4  # float32 parity bound on logits (issue 16)
VOCAB = TINY_MOE_BASE["vocab_size"]


def _tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _with_impl(model, impl):
    """The same weights, with the experts computed by `impl`."""
    from flax import nnx

    graphdef, state = nnx.split(qwen3.abstract_model(model.cfg.replace(expert_impl=impl)))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("case", sorted(TINY_MOE_CASES))
@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_matches_hf_logits(tiny_moe_checkpoints, case, impl):
    tokens = _tokens(3, 11, seed=1)
    model = _with_impl(convert.load_hf(tiny_moe_checkpoints[case]), impl)
    assert catalog.is_moe(model.cfg) and qwen3.DENSE_MLP in model.cfg.mlp_kinds()
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(tiny_moe_checkpoints[case], tokens)
    err = np.abs(ours - ref).max()
    print(f"parity moe {case} {impl}: max|dlogit|={err:.2e}")
    assert ours.shape == ref.shape and err <= ATOL


def test_the_cases_cover_both_weightings_and_both_dense_layer_rules(tiny_moe_checkpoints):
    cfgs = {case: convert.load_hf(path).cfg for case, path in tiny_moe_checkpoints.items()}
    assert {c.norm_topk_prob for c in cfgs.values()} == {True, False}
    assert cfgs["normed_dense_layer"].mlp_kinds() == ("moe", "dense", "moe")
    assert cfgs["unnormed_sparse_step"].mlp_kinds() == ("dense", "moe", "dense")
    assert all(c.num_key_value_heads < c.num_attention_heads for c in cfgs.values())  # GQA


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_ragged_batch_matches_hf_with_attention_mask(tiny_moe_checkpoints, impl):
    path = tiny_moe_checkpoints["normed_dense_layer"]
    lengths = np.array([9, 4, 1, 6])
    valid = np.arange(9)[None, :] < lengths[:, None]
    tokens = np.where(valid, _tokens(4, 9, seed=3), 0)
    ours = np.asarray(_with_impl(convert.load_hf(path), impl)(jnp.asarray(tokens)))
    ref = hf_logits(path, tokens, attention_mask_bt=valid.astype(np.int64))
    err = np.abs(ours - ref)[valid].max()
    print(f"parity moe ragged batch {impl}: max|dlogit|={err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", sorted(TINY_MOE_CASES))
def test_prefill_then_cached_decode_matches_hf(tiny_moe_checkpoints, case):
    """A prefill chunk, then single and multi-token cached steps (the `auto` expert implementation), equal HF's
    one pass."""
    path = tiny_moe_checkpoints[case]
    tokens = _tokens(2, 15, seed=5)
    model = convert.load_hf(path)
    cache = qwen3.KVCache.init(model.cfg, batch=2, max_len=24)
    step = jax.jit(lambda m, t, c: m.step(t, c))
    pieces = []
    for lo, hi in [(0, 9), (9, 10), (10, 11), (11, 14), (14, 15)]:
        logits, cache = step(model, jnp.asarray(tokens[:, lo:hi]), cache)
        pieces.append(np.asarray(logits))
    err = np.abs(np.concatenate(pieces, axis=1) - hf_logits(path, tokens)).max()
    print(f"parity moe cached {case}: max|dlogit|={err:.2e}")
    assert err <= ATOL


def test_auto_picks_dense_for_decode_steps_and_grouped_for_prefill():
    assert qwen3_moe.expert_impl_for("auto", 1) == "dense"
    assert qwen3_moe.expert_impl_for("auto", qwen3_moe.DENSE_MAX_TOKENS + 1) == "ragged"
    assert qwen3_moe.expert_impl_for("ragged", 1) == "ragged"


def test_router_near_ties_route_as_hf_and_exact_ties_go_to_the_lower_expert(tmp_path):
    """Two router rows nearly equal (1e-6 apart) and two exactly equal. On the tokens where a near-tie sits at
    the top-A boundary, our routing of HF's own MLP inputs picks HF's experts. An exact tie has no defined
    winner in HF: torch.topk breaks it in no fixed order (here it takes the higher index on some tokens and
    the lower on others), so we take the lower index, as lax.top_k does, and check that HF's pick is one of the
    tied pair. With one layer the MLP of position t only changes the logits of t, so every token without an
    exact tie must match HF's logits."""
    import torch

    model = hf_qwen3_moe(seed=3, num_hidden_layers=1, norm_topk_prob=True)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight[3] = gate.weight[2]
        gate.weight[5] = gate.weight[4] * (1 + 1e-6)
    seen = {}
    hook = gate.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), experts=out[2]))
    tokens = _tokens(4, 16, seed=9)
    with torch.no_grad():
        model(torch.tensor(tokens))
    hook.remove()
    model.save_pretrained(tmp_path)
    hf_ma = seen["experts"].numpy()  # [B*T, A]
    ours = convert.load_hf(tmp_path)
    _, experts_bta = qwen3_moe.route(jnp.asarray(seen["x"].numpy())[None], ours.layers.mlp.router[...][0], 2, True)
    ours_ma = np.asarray(experts_bta)[0]

    def at_boundary(experts_ma, pair):
        return np.isin(experts_ma, pair).sum(-1) == 1

    near, exact = at_boundary(hf_ma, (4, 5)), at_boundary(hf_ma, (2, 3)) | at_boundary(ours_ma, (2, 3))
    print(f"tokens with a tie at the top-2 boundary: near {near.sum()}, exact {exact.sum()}; HF took the higher "
          f"index on {int(np.isin(hf_ma[exact], 3).any(-1).sum())} of the exact ones")
    assert near.sum() > 0 and exact.sum() > 0  # the input exercises both kinds of tie
    np.testing.assert_array_equal(np.sort(ours_ma[~exact], -1), np.sort(hf_ma[~exact], -1))
    assert np.isin(ours_ma[exact], 2).any(-1).all() and not np.isin(ours_ma[exact], 3).any()
    assert (np.isin(hf_ma[exact], (2, 3)).sum(-1) == 1).all()
    err = np.abs(np.asarray(ours(jnp.asarray(tokens))) - hf_logits(tmp_path, tokens)).reshape(-1, VOCAB)[~exact].max()
    print(f"parity moe router near-ties: max|dlogit|={err:.2e}")
    assert err <= ATOL


def test_presets_match_published_shapes():
    a3b, a22b = catalog.preset("Qwen/Qwen3-30B-A3B"), catalog.preset("Qwen3-235B-A22B")
    assert (a3b.num_hidden_layers, a3b.hidden_size, a3b.num_attention_heads, a3b.num_key_value_heads) == (48, 2048, 32, 4)
    assert (a3b.num_experts, a3b.num_experts_per_tok, a3b.moe_intermediate_size) == (128, 8, 768)
    assert (a22b.num_hidden_layers, a22b.hidden_size, a22b.num_attention_heads, a22b.moe_intermediate_size) == (
        94, 4096, 64, 1536)
    # The published totals: 30.5B parameters with 3.3B active; 235B with 22B active.
    assert round(a3b.num_params() / 1e9, 1) == 30.5 and round(a3b.active_params() / 1e9, 1) == 3.4
    assert round(a22b.num_params() / 1e9) == 235 and round(a22b.active_params() / 1e9) == 22
    assert qwen3.layer_runs(a3b) == [(0, ("moe",) * 48)]


def test_real_30b_a3b_config_matches_hf_parameter_count():
    """Our parameter count of the 30B-A3B shape equals transformers' (built on the meta device)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    hf_config = convert.to_hf_config(catalog.preset("Qwen3-30B-A3B"))
    from transformers import Qwen3MoeConfig

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf_config))
    assert sum(p.numel() for p in model.parameters()) == catalog.preset("Qwen3-30B-A3B").num_params()
    assert convert.from_hf_config(hf_config) == catalog.preset("Qwen3-30B-A3B")


def test_what_transformers_saves_is_one_tensor_per_expert(tiny_moe_checkpoints):
    path = tiny_moe_checkpoints["normed_dense_layer"]
    with safe_open(path / "model.safetensors", framework="np") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    # transformers 5.x writes num_local_experts where the Hub's files say num_experts; both are read.
    config = json.loads((path / "config.json").read_text())
    assert convert.from_hf_config(config).num_experts == TINY_MOE_BASE["num_experts"]


def test_export_round_trip_is_identical_and_loads_in_transformers(tiny_moe_checkpoints, tmp_path):
    src = tiny_moe_checkpoints["unnormed_sparse_step"]
    model = convert.load_hf(src)
    out = convert.export_hf(model, tmp_path / "exported")
    with safe_open(src / "model.safetensors", framework="np") as a, safe_open(out / "model.safetensors", "np") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert np.array_equal(a.get_tensor(name), b.get_tensor(name)), name
    tokens = _tokens(2, 6)
    np.testing.assert_array_equal(hf_logits(out, tokens), hf_logits(src, tokens))


def test_fused_expert_layout_is_read(tiny_moe_checkpoints, tmp_path):
    """transformers' in-memory layout (gate_up_proj [E, 2F, D], down_proj [E, D, F]) loads to the same model."""
    from safetensors.numpy import save_file

    src = tiny_moe_checkpoints["normed_dense_layer"]
    folder = tmp_path / "fused"
    shutil.copytree(src, folder)
    with safe_open(src / "model.safetensors", framework="np") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    e = TINY_MOE_BASE["num_experts"]
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate = [tensors.pop(f"{prefix}.{j}.gate_proj.weight") for j in range(e)]
        up = [tensors.pop(f"{prefix}.{j}.up_proj.weight") for j in range(e)]
        down = [tensors.pop(f"{prefix}.{j}.down_proj.weight") for j in range(e)]
        tensors[f"{prefix}.gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
        tensors[f"{prefix}.down_proj"] = np.stack(down)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tokens = jnp.asarray(_tokens(2, 5))
    np.testing.assert_array_equal(np.asarray(convert.load_hf(folder)(tokens)), np.asarray(convert.load_hf(src)(tokens)))


def test_orbax_round_trip_keeps_the_model_family(tiny_moe_checkpoints, tmp_path):
    model = convert.load_hf(tiny_moe_checkpoints["normed_dense_layer"])
    convert.save_orbax(model, tmp_path / "orbax")
    restored = convert.load_orbax(tmp_path / "orbax")
    assert restored.cfg == model.cfg
    tokens = jnp.asarray(_tokens(1, 4))
    np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_experts_on_8_devices_equal_one_device(tiny_moe_checkpoints, mesh_shape):
    """Experts split over fsdp (and their width over tensor): the same logits as one device."""
    from distillspec_jax import sharding as shd

    path = tiny_moe_checkpoints["normed_dense_layer"]
    mesh = shd.make_mesh(*mesh_shape)
    sharded = convert.load_hf(path, mesh=mesh)
    spec = sharded.layers.mlp.gate_proj[...].sharding.spec
    assert spec[1] == "fsdp" and spec[3] == "tensor"  # [L, E, D, F]
    tokens = _tokens(4, 7, seed=2)
    want = np.asarray(convert.load_hf(path)(jnp.asarray(tokens)))
    batch = jax.device_put(jnp.asarray(tokens), shd.batch_sharding(mesh))
    for impl in ("ragged", "dense"):
        got = np.asarray(jax.jit(lambda m, t: m(t))(_with_impl(sharded, impl), batch))
        assert np.abs(got - want).max() <= 1e-5, impl


def test_expert_count_that_does_not_divide_the_expert_axis_is_refused():
    from flax import nnx

    from distillspec_jax import sharding as shd

    cfg = catalog.preset("Qwen3-30B-A3B", num_hidden_layers=1, num_experts=6, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="'expert' of size 6 does not divide over mesh axis 'fsdp' of size 4"):
        shd.state_shardings(nnx.state(qwen3.abstract_model(cfg)), shd.make_mesh(1, 4, 2))


def test_bad_moe_configs_are_refused():
    base = catalog.preset("Qwen3-30B-A3B")
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be in"):
        base.replace(num_experts=8, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        base.replace(mlp_only_layers=(48,))
    with pytest.raises(ValueError, match="unknown expert_impl"):
        base.replace(expert_impl="megablox")


def test_moe_checkpoint_labelled_dense_and_the_reverse_name_the_right_family(tiny_moe_checkpoints,
                                                                            tiny_checkpoints, tmp_path):
    moe = tmp_path / "moe_as_dense"
    shutil.copytree(tiny_moe_checkpoints["normed_dense_layer"], moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    with pytest.raises(ValueError, match="routed-expert weights.*model_type 'qwen3_moe'.*Qwen3-30B-A3B"):
        convert.load_hf(moe)
    dense = tmp_path / "dense_as_moe"
    shutil.copytree(tiny_checkpoints["untied_gqa"], dense)
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe", "num_experts": 4,
                                                   "num_experts_per_tok": 2, "moe_intermediate_size": 16}))
    with pytest.raises(ValueError, match="dense MLP weights.*model_type 'qwen3'.*Qwen3-0.6B"):
        convert.load_hf(dense)


def test_tiny_target_experts_builds_an_moe_target_and_leaves_dense_builds_as_they_were():
    """config.tiny.target_experts > 0 gives the :tiny target routed experts in every layer (the draft stays
    dense); at 0 the MoE fields do not enter the tiny cache key, so a dense build keeps its cached folder."""
    from configs import jsd
    from distillspec_jax import tiny

    c = jsd.get_config("tiny")
    dense_cfg = c.tiny.to_dict()
    assert not catalog.is_moe(tiny.model_config(dense_cfg, "target", 1024))
    before_fields = {k: v for k, v in dense_cfg.items() if k not in tiny.MOE_FIELDS}
    assert tiny.cache_key(dense_cfg, 0) == tiny.cache_key(before_fields, 0)
    moe_cfg = {**dense_cfg, "target_experts": 8}
    target = tiny.model_config(moe_cfg, "target", 1024)
    assert catalog.is_moe(target) and target.mlp_kinds() == ("moe",) * c.tiny.target_layers
    assert (target.num_experts, target.num_experts_per_tok, target.moe_intermediate_size) == (8, 2, 128)
    assert target.hidden_size == c.tiny.target_hidden and not catalog.is_moe(tiny.model_config(moe_cfg, "draft", 1024))
    assert tiny.cache_key(moe_cfg, 0) != tiny.cache_key(dense_cfg, 0)
