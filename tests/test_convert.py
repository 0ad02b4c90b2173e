"""Conversion round trips (HF <-> Flax, Orbax, sharded loading) and the loader's errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distillspec_jax import sharding as shd
from distillspec_jax.models import convert, qwen3
from tests.tiny import TINY_BASE, hf_logits, hf_qwen3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(folder) -> dict[str, np.ndarray]:
    located = convert._open_weights(folder)
    return {name: st.get_tensor(name) for name, st in located.items()}


def _flat_params(model) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("case", ["tied_gqa", "untied_mha"])
def test_hf_to_flax_to_hf_gives_identical_tensors(tiny_checkpoints, tmp_path, case):
    src = tiny_checkpoints[case]
    out = convert.export_hf(convert.load_hf(src), tmp_path / "export")
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert "lm_head.weight" in a or case.startswith("tied")


def test_export_loads_in_transformers_sharded_and_bfloat16(tiny_checkpoints, tmp_path):
    """A sharded (index.json) bfloat16 export loads in transformers and matches the bf16-rounded model."""
    src = tiny_checkpoints["untied_gqa"]
    model = convert.load_hf(src)
    out = convert.export_hf(model, tmp_path / "export", dtype="bfloat16", max_shard_bytes=40_000)
    assert (out / convert.INDEX_FILE).is_file() and len(list(out.glob("*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["torch_dtype"] == "bfloat16"
    # Our loader reads the sharded export back; its float32 upcast must equal HF's.
    tokens = np.random.RandomState(0).randint(0, TINY_BASE["vocab_size"], (2, 9))
    ours = np.asarray(convert.load_hf(out, dtype="float32")(jnp.asarray(tokens)))
    import torch
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert np.abs(ours - hf_logits(hf, tokens)).max() <= 1e-4


def test_reads_sharded_hf_checkpoint(tmp_path):
    model = hf_qwen3(seed=4, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / convert.INDEX_FILE).is_file()
    tokens = np.random.RandomState(1).randint(0, TINY_BASE["vocab_size"], (2, 5))
    ours = np.asarray(convert.load_hf(tmp_path)(jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits(model, tokens)).max() <= 1e-4


def test_orbax_save_restore_gives_identical_tensors(tiny_checkpoints, tmp_path):
    model = convert.load_hf(tiny_checkpoints["untied_gqa"], dtype="bfloat16")
    convert.save_orbax(model, tmp_path / "ckpt")
    restored = convert.load_orbax(tmp_path / "ckpt")
    assert restored.cfg == model.cfg
    a, b = _flat_params(model), _flat_params(restored)
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_load_on_8_devices_equals_one_device(tiny_checkpoints, tmp_path, mesh_shape):
    assert jax.device_count() == 8
    src = tiny_checkpoints["untied_gqa"]
    mesh = shd.make_mesh(*mesh_shape)
    sharded = convert.load_hf(src, mesh=mesh)
    gate = sharded.layers.mlp.gate_proj[...]
    assert gate.sharding.spec == shd.logical_to_spec(("layers", "embed", "mlp"), gate.shape, mesh)
    assert len(gate.sharding.device_set) == 8
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, TINY_BASE["vocab_size"], (8, 7)))
    single = np.asarray(convert.load_hf(src)(tokens))
    graphdef, state = nnx.split(sharded)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    out = np.asarray(forward(state, jax.device_put(tokens, shd.batch_sharding(mesh))))
    assert np.abs(out - single).max() <= 1e-5
    # Orbax restore straight onto the same mesh keeps the shardings.
    convert.save_orbax(sharded, tmp_path / "ckpt")
    restored = convert.load_orbax(tmp_path / "ckpt", mesh=mesh)
    assert restored.layers.mlp.gate_proj[...].sharding == gate.sharding


def test_cli_converts_both_directions(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["tied_gqa"]
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "distillspec_jax.models.convert"]
    subprocess.run([*cmd, f"--hf={src}", f"--out={tmp_path / 'orbax'}"], check=True, env=env, cwd=REPO)
    subprocess.run([*cmd, "--to_hf", f"--orbax={tmp_path / 'orbax'}", f"--out={tmp_path / 'hf'}"],
                   check=True, env=env, cwd=REPO)
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "hf" / "generation_config.json").is_file()  # carried along with the tokenizer files


# -------------------------------------------------------------------------------------------
# Bad input: clear errors that name the fix, before any heavy work
# -------------------------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.*does not exist"):
        convert.load_hf(tmp_path / "does_not_exist")


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="pass its local folder"):
        convert.load_hf("Qwen/Qwen3-0.6B-not-cached-here")


def test_other_model_type_is_refused(tiny_checkpoints, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["tied_gqa"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        convert.load_hf(folder)


def test_tensor_shape_mismatch_names_tensor_and_shapes(tiny_checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["untied_gqa"], folder)
    tensors = _tensors(folder)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    convert.write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(100, 64\).*\(128, 64\)"):
        convert.load_hf(folder)


def test_pickle_only_checkpoint_is_refused_never_unpickled(tiny_checkpoints, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_checkpoints["tied_gqa"] / "config.json", folder)
    # Not a valid pickle either: any attempt to unpickle would raise a different error.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 this must never be unpickled")
    with pytest.raises(ValueError, match="only pickle weights.*never unpickles"):
        convert.load_hf(folder)


def test_unknown_dtype_fails_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        convert.load_hf(tmp_path / "not_even_read", dtype="float8")


def test_tied_checkpoint_with_different_head_is_refused(tiny_checkpoints, tmp_path):
    folder = tmp_path / "tied_bad"
    shutil.copytree(tiny_checkpoints["tied_gqa"], folder)
    tensors = _tensors(folder)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    convert.write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        convert.load_hf(folder)


def test_mesh_that_does_not_divide_a_parameter_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="does not divide over mesh axis 'tensor'"):
        convert.load_hf(tiny_checkpoints["untied_gqa"], mesh=shd.make_mesh(1, 1, 8))  # 2 kv heads over 8


def test_safetensors_reader_handles_bfloat16(tmp_path):
    """The safetensors package's NumPy backend, which convert reads and writes with, keeps bfloat16 (whole
    tensors and slices), so no hand-written reader is needed."""
    import ml_dtypes

    arr = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    convert.write_safetensors(tmp_path / "x.safetensors", {"x": arr, "y": np.ones((2,), np.int64)})
    st = convert._open_weights(tmp_path)["x"]
    assert st.get_tensor("x").dtype == ml_dtypes.bfloat16 and np.array_equal(st.get_tensor("x"), arr)
    assert convert.tensor_shape(st, "x") == (3, 4) and np.array_equal(st.get_slice("x")[1:, 2:], arr[1:, 2:])
    assert st.metadata() == {"format": "pt"}  # what transformers requires of the files it loads
    assert np.array_equal(st.get_tensor("y"), np.ones((2,), np.int64))
    assert qwen3.resolve_dtype("bfloat16") == jnp.bfloat16


def test_orbax_folder_written_before_layers_were_stacked_still_loads(tiny_checkpoints, tmp_path):
    """Converted folders in users' model caches hold one parameter subtree per layer and a `remat` config
    field; they load into the stacked model with the same logits."""
    import dataclasses

    import orbax.checkpoint as ocp

    model = convert.load_hf(tiny_checkpoints["untied_gqa"])
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    num_layers = model.cfg.num_hidden_layers
    pure["layers"] = {str(i): jax.tree.map(lambda x, i=i: np.asarray(x[i]), pure["layers"]) for i in range(num_layers)}
    old = tmp_path / "old"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(old / convert.ORBAX_PARAMS, pure)
    (old / convert.ORBAX_CONFIG).write_text(json.dumps({**dataclasses.asdict(model.cfg), "remat": True}))
    restored = convert.load_orbax(old)
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, TINY_BASE["vocab_size"], (2, 9)))
    np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))


def test_from_hf_config_reads_both_rope_layouts_and_rejects_other_models(tmp_path):
    base = {**TINY_BASE, "model_type": "qwen3", "num_attention_heads": 4, "num_key_value_heads": 2}
    old = {**base, "rope_theta": 5000.0}
    new = {**{k: v for k, v in base.items() if k != "rope_theta"},
           "rope_parameters": {"rope_theta": 7000.0, "rope_type": "default"}}
    assert convert.from_hf_config(old).rope_theta == 5000.0
    assert convert.from_hf_config(new).rope_theta == 7000.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert convert.from_hf_config(str(path)).hidden_size == TINY_BASE["hidden_size"]
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        convert.from_hf_config({**old, "model_type": "llama"})
    with pytest.raises(ValueError, match="RoPE scaling"):
        convert.from_hf_config({**old, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        convert.from_hf_config(old, dtype="fp8")
