"""HF safetensors <-> Flax NNX Qwen3 and Qwen3-MoE; Orbax save and restore; a CLI for both directions.

    python -m distillspec_jax.models.convert --hf=PATH_OR_HUB_ID --out=ORBAX_DIR [--dtype=bfloat16]
    python -m distillspec_jax.models.convert --to_hf --orbax=ORBAX_DIR --out=HF_DIR [--dtype=bfloat16]

The table `tensor_maps(cfg)` is the single place that knows HF names (and `from_hf_config` /
`to_hf_config` the one place that reads and writes config.json); every tensor's shape is
asserted on the way in. Weights are read with the safetensors package and each tensor goes
straight to its NamedSharding, so a large model never sits whole on one device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from distillspec_jax import files, hub
from distillspec_jax import sharding as shd
from distillspec_jax.models import catalog, qwen3, qwen3_moe

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
ORBAX_PARAMS = "params"
ORBAX_CONFIG = "qwen3_config.json"
TOKENIZER_DIR = "tokenizer"
# Files that make a folder loadable by AutoTokenizer; carried along through Orbax and back to HF.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HUB_PATTERNS = ["*.safetensors", INDEX_FILE, CONFIG_FILE, *TOKENIZER_FILES]
# transformers' default shard size: large exports are split with an index, as HF checkpoints are.
MAX_SHARD_BYTES = 5 * 1024**3
# Buffers that some older checkpoints carry and that are recomputed, not learnt.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
# A field that qwen3_config.json held before remat became an argument of the training step only.
LEGACY_CONFIG_FIELD_REMAT = "remat"


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the NNX parameter it becomes."""

    hf_name: str
    path: tuple[str | int, ...]  # path of the nnx.Param in the model's state
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # Where the tensor sits in the stacked parameter at `path`: (layer,) in a [L, ...] run of layers,
    # (layer, expert) in a run's [L, E, ...] experts; () for a parameter that is not stacked.
    index: tuple[int, ...] = ()


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _linear_in(out_heads: int, head_dim: int):
    """HF q/k/v weight [X*H, D] (out, in) <-> ours [D, X, H]."""
    return (lambda w: w.T.reshape(w.shape[1], out_heads, head_dim),
            lambda w: w.reshape(w.shape[0], out_heads * head_dim).T)


def _linear_out(in_heads: int, head_dim: int):
    """HF o weight [D, N*H] (out, in) <-> ours [N, H, D]."""
    return (lambda w: w.T.reshape(in_heads, head_dim, w.shape[0]),
            lambda w: w.reshape(in_heads * head_dim, w.shape[2]).T)


def _swap_last(x):
    return np.swapaxes(x, -1, -2)


def _fused_half(half: int, width: int):
    """transformers' in-memory expert layout gate_up_proj [E, 2F, D] -> our gate (half 0) or up (half 1) [E, D, F]."""
    return lambda w: _swap_last(w[:, half * width:(half + 1) * width, :])


def _no_export(w):
    raise AssertionError("the fused expert layout is read, never written: export writes one tensor per expert")


def tensor_maps(cfg: qwen3.Qwen3Config, fused_layers: frozenset[int] = frozenset()) -> list[TensorMap]:
    """Every tensor of a HF Qwen3 or Qwen3-MoE checkpoint, in HF's naming, with its shape and transforms.

    The experts of a sparse layer are one tensor per expert on the Hub and in what transformers 5.x saves
    (`mlp.experts.N.{gate,up,down}_proj.weight`), stacked here into [E, ...]. `fused_layers` names the
    layers stored instead in transformers' in-memory layout (`mlp.experts.gate_up_proj [E, 2F, D]`,
    `mlp.experts.down_proj [E, D, F]`), which is read but never written.
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    maps = [TensorMap("model.embed_tokens.weight", ("embed",), (v, d), _identity, _identity),
            TensorMap("model.norm.weight", ("norm", "weight"), (d,), _identity, _identity)]
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), _transpose, _transpose))
    q_in, k_in, o_out = _linear_in(n, h), _linear_in(k, h), _linear_out(n, h)
    attention = [  # (HF name within layer i, our path within the stacked layer, HF shape, to_ours, to_hf)
        ("input_layernorm.weight", ("attn_norm", "weight"), (d,), _identity, _identity),
        ("self_attn.q_proj.weight", ("attn", "q_proj"), (n * h, d), *q_in),
        ("self_attn.k_proj.weight", ("attn", "k_proj"), (k * h, d), *k_in),
        ("self_attn.v_proj.weight", ("attn", "v_proj"), (k * h, d), *k_in),
        ("self_attn.o_proj.weight", ("attn", "o_proj"), (d, n * h), *o_out),
        ("self_attn.q_norm.weight", ("attn", "q_norm", "weight"), (h,), _identity, _identity),
        ("self_attn.k_norm.weight", ("attn", "k_norm", "weight"), (h,), _identity, _identity),
        ("post_attention_layernorm.weight", ("mlp_norm", "weight"), (d,), _identity, _identity),
    ]
    f = cfg.intermediate_size
    dense_mlp = [
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), (f, d), _transpose, _transpose),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), (f, d), _transpose, _transpose),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), (d, f), _transpose, _transpose),
    ]
    for start, kinds in qwen3.layer_runs(cfg):
        run = qwen3.run_name(start)
        for offset, kind in enumerate(kinds):
            i = start + offset
            per_layer = attention + (dense_mlp if kind == qwen3.DENSE_MLP else [])
            maps += [TensorMap(f"model.layers.{i}.{name}", (run, *path), shape, to_ours, to_hf, index=(offset,))
                     for name, path, shape, to_ours, to_hf in per_layer]
            if kind == qwen3_moe.MOE_MLP:
                maps += _expert_maps(cfg, f"model.layers.{i}.mlp", run, offset, fused=i in fused_layers)
    return maps


def _expert_maps(cfg: qwen3_moe.Qwen3MoeConfig, prefix: str, run: str, offset: int, fused: bool) -> list[TensorMap]:
    """The router [E, D] and the experts of one sparse layer (per expert, or transformers' fused layout)."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    mlp = (run, "mlp")
    maps = [TensorMap(f"{prefix}.gate.weight", (*mlp, "router"), (e, d), _transpose, _transpose, index=(offset,))]
    if fused:
        return maps + [
            TensorMap(f"{prefix}.experts.gate_up_proj", (*mlp, "gate_proj"), (e, 2 * f, d), _fused_half(0, f),
                      _no_export, index=(offset,)),
            TensorMap(f"{prefix}.experts.gate_up_proj", (*mlp, "up_proj"), (e, 2 * f, d), _fused_half(1, f),
                      _no_export, index=(offset,)),
            TensorMap(f"{prefix}.experts.down_proj", (*mlp, "down_proj"), (e, d, f), _swap_last, _no_export,
                      index=(offset,)),
        ]
    for j in range(e):
        maps += [TensorMap(f"{prefix}.experts.{j}.{proj}.weight", (*mlp, proj), shape, _transpose, _transpose,
                           index=(offset, j))
                 for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))]
    return maps


# ----------------------------------------------------------------------------------------------
# config.json <-> Qwen3Config
# ----------------------------------------------------------------------------------------------


def from_hf_config(hf: dict[str, Any] | str, **overrides: Any) -> qwen3.Qwen3Config:
    """Builds a Qwen3Config (model_type 'qwen3') or a Qwen3MoeConfig ('qwen3_moe') from a HF config.json
    (a dict, or the path of the file).

    Accepts both the transformers 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x layout
    (`rope_parameters`; `num_local_experts` for `num_experts`). Anything this implementation would silently
    compute differently is refused: another model_type, attention biases, sliding windows, RoPE scaling.
    """
    if isinstance(hf, str):
        with open(hf) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in catalog.CONFIG_CLASSES:
        raise ValueError(
            f"model_type is {model_type!r}, but this loader implements Qwen3 dense ('qwen3') and Qwen3-MoE "
            f"('qwen3_moe') models only; pass a checkpoint of one of those (presets: {sorted(catalog.PRESETS)})"
        )
    if hf.get("attention_bias", False):
        raise ValueError("attention_bias=true is not part of Qwen3; this checkpoint is not supported")
    if hf.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported: Qwen3 dense models use full attention")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    scaling = hf.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ValueError(f"RoPE scaling {scaling or rope} is not supported; use a checkpoint with default RoPE")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
    vocab = hf["vocab_size"]
    fields = dict(
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=float(rope_theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        num_real_tokens=qwen3.QWEN3_NUM_REAL_TOKENS if vocab == qwen3.QWEN3_VOCAB_SIZE else None,
    )
    if model_type == qwen3_moe.Qwen3MoeConfig.model_type:
        fields.update(
            num_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False),  # transformers' default when the key is absent
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        )
    fields.update(overrides)
    return catalog.CONFIG_CLASSES[model_type](**fields)


def to_hf_config(cfg: qwen3.Qwen3Config) -> dict[str, Any]:
    """The config.json that transformers' Qwen3ForCausalLM or Qwen3MoeForCausalLM (and vLLM) read."""
    moe = {}
    if catalog.is_moe(cfg):
        moe = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": cfg.num_experts,
               "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
               "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.decoder_sparse_step,
               "mlp_only_layers": list(cfg.mlp_only_layers), "output_router_logits": False,
               "router_aux_loss_coef": 0.001}
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": qwen3.INIT_STDDEV,
        "torch_dtype": cfg.param_dtype,
        **moe,
    }


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint
# ----------------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
    """A local folder holding config.json and safetensors; hub ids are fetched with huggingface_hub.

    Errors say what to do: a missing folder, an unreachable hub (pass a local folder), a checkpoint
    that only has pickle weights (convert it to safetensors first; this project never unpickles).
    """
    local = pathlib.Path(path_or_hub_id).expanduser()
    if local.is_dir():
        folder = local
    elif hub.looks_like_hub_id(str(path_or_hub_id)):
        folder = _download(str(path_or_hub_id))
    else:
        raise FileNotFoundError(
            f"checkpoint folder {str(local)!r} does not exist; pass a folder holding config.json and "
            "*.safetensors, or a hub id such as 'Qwen/Qwen3-0.6B'"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; pass the folder of a HF checkpoint")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)]
        if pickles:
            raise ValueError(
                f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); this project loads "
                "safetensors only and never unpickles. Convert them with a tool you trust, e.g. "
                "transformers' model.save_pretrained(dir, safe_serialization=True)"
            )
        raise FileNotFoundError(f"{folder} has no *.safetensors weight files")
    return folder


_CHECKPOINT_FIXES = ("download the checkpoint on a machine with Hub access and pass its local folder instead "
                     "(a folder with config.json and *.safetensors), or use the offline ':tiny' preset")


def missing_checkpoint_files(folder: pathlib.Path) -> list[str]:
    """What a folder lacks to be a loadable checkpoint: config.json, and every weight file (each shard that
    model.safetensors.index.json names, or at least one *.safetensors when there is no index)."""
    missing = [] if (folder / CONFIG_FILE).is_file() else [CONFIG_FILE]
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [name for name in shards if not (folder / name).is_file()]
    elif not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


def _download(hub_id: str) -> pathlib.Path:
    import huggingface_hub

    fixes = _CHECKPOINT_FIXES
    try:  # the local HF cache first: it works offline
        folder = pathlib.Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS,
                                                                local_files_only=True))
        # A snapshot folder also exists when only some files were fetched: AutoTokenizer.from_pretrained(id)
        # leaves config.json and the tokenizer files, an interrupted download leaves some of the shards.
        missing = missing_checkpoint_files(folder)
        if not missing:
            return folder
        fixes = (f"the cached snapshot {folder} lacks {', '.join(missing)} (only part of the repo was downloaded, "
                 f"e.g. just its tokenizer); {_CHECKPOINT_FIXES}")
    except (OSError, ValueError):
        pass
    hub.require_hub("the checkpoint", hub_id, fixes)
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except OSError as err:
        if hub.caused_by_connection_failure(err):
            raise hub.HubUnreachableError(hub.unreachable_message("the checkpoint", hub_id, str(err),
                                                                  fixes)) from err
        raise


# The safetensors package's NumPy backend (>= 0.8, requirements.txt) reads and writes bfloat16 through
# ml_dtypes, the dtype every Qwen3 checkpoint ships in, and reads slices of a tensor (`get_slice`).
SafetensorsFile = Any  # a `safetensors.safe_open(path, framework="np")` handle


def _open_weights(folder: pathlib.Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the open safetensors file that holds it (single file or sharded with an index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shard_files = {name: safe_open(folder / name, framework="np") for name in sorted(set(weight_map.values()))}
        return {tensor: shard_files[file] for tensor, file in weight_map.items()}
    located = {}
    for path in sorted(folder.glob("*.safetensors")):
        st = safe_open(path, framework="np")
        located.update({tensor: st for tensor in st.keys()})
    return located


def tensor_shape(st: SafetensorsFile, name: str) -> tuple[int, ...]:
    """The stored shape of tensor `name`, read from the header without reading its data."""
    return tuple(st.get_slice(name).get_shape())


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` to a safetensors file atomically (temporary file, then rename). The "pt" format tag
    is what transformers requires of the files it loads."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# HF -> NNX
# ----------------------------------------------------------------------------------------------


def _assemble(cfg: qwen3.Qwen3Config, arrays: dict[tuple, jax.Array]) -> qwen3.Qwen3:
    graphdef, state = nnx.split(qwen3.abstract_model(cfg))
    pure = nnx.to_pure_dict(state)
    for path, array in arrays.items():
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = array
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _target_shardings(cfg: qwen3.Qwen3Config, mesh: Mesh | None) -> dict[tuple, jax.sharding.Sharding]:
    # Without a mesh, the one-device mesh: the same NamedShardings as load_orbax, so a model loaded either
    # way hits the same compiled functions (jit caches on the sharding).
    abstract_state = nnx.state(qwen3.abstract_model(cfg))
    shardings = shd.state_shardings(abstract_state, mesh if mesh is not None else shd.single_device_mesh())
    return dict(nnx.to_flat_state(shardings))


def _place_tensors(group: list[TensorMap], located: dict[str, SafetensorsFile], np_dtype: np.dtype,
                   sharding: jax.sharding.Sharding) -> jax.Array:
    """One parameter on its sharding, straight from the checkpoint files: a single tensor, or the tensors of a
    stacked [L, ...] (or [L, E, ...]) parameter. Each device's slice is read from the files as it is placed, so
    a host holds one tensor read from the files at a time (and the first one, for a stacked parameter)."""
    def read(m: TensorMap) -> np.ndarray:
        return np.asarray(m.to_ours(located[m.hf_name].get_tensor(m.hf_name)), dtype=np_dtype)

    if not group[0].index:
        (m,) = group
        return shd.place(read(m), sharding)
    by_index = {m.index: m for m in group}
    first_map = by_index[min(by_index)]
    first = read(first_map)
    stacked = tuple(max(i[dim] for i in by_index) + 1 for dim in range(len(first_map.index)))
    if len(by_index) != int(np.prod(stacked)):
        raise AssertionError(f"{first_map.path}: the tensor table does not fill the stacked shape {stacked}")

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        outer = [range(size)[sl] for size, sl in zip(stacked, index)]
        inner = index[len(stacked):]
        block = np.empty((*(len(r) for r in outer), *first[inner].shape), np_dtype)
        for position in np.ndindex(*block.shape[:len(stacked)]):
            m = by_index[tuple(r[p] for r, p in zip(outer, position))]
            block[position] = (first if m is first_map else read(m))[inner]
        return block

    return jax.make_array_from_callback((*stacked, *first.shape), sharding, shard)


def _fused_expert_layers(located: dict[str, SafetensorsFile]) -> frozenset[int]:
    """Layers whose experts a checkpoint stores in transformers' in-memory fused layout."""
    found = (re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj", name) for name in located)
    return frozenset(int(match.group(1)) for match in found if match)


def _family_mismatch(cfg: qwen3.Qwen3Config, unexpected: list[str]) -> str:
    """What an unexpected tensor says about a checkpoint whose config.json names the wrong model family."""
    routed = [n for n in unexpected if ".mlp.experts." in n or n.endswith(".mlp.gate.weight")]
    if routed and not catalog.is_moe(cfg):
        return (f"; these are routed-expert weights ({routed[0]}, ...): the checkpoint is a Qwen3-MoE model, so its "
                f"config.json must say model_type 'qwen3_moe' (presets: {sorted(qwen3_moe.PRESETS)})")
    dense = [n for n in unexpected if re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", n)]
    if dense and catalog.is_moe(cfg):
        return (f"; these are dense MLP weights ({dense[0]}, ...): the checkpoint is a dense Qwen3 model (model_type "
                f"'qwen3', presets: {sorted(qwen3.PRESETS)}), or its mlp_only_layers / decoder_sparse_step are wrong")
    return ""


def load_hf(
    path_or_hub_id: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    param_dtype: str | None = None,
) -> qwen3.Qwen3:
    """Loads a HF Qwen3 or Qwen3-MoE checkpoint (local folder or hub id; config.json's model_type says which)
    into the NNX model.

    dtype is the compute dtype; param_dtype (default: dtype) the storage dtype. With a mesh, every
    tensor is placed directly on its NamedSharding from `sharding.LOGICAL_RULES`.
    """
    param_dtype = param_dtype or dtype
    qwen3.resolve_dtype(dtype), qwen3.resolve_dtype(param_dtype)  # bad names fail before any I/O
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = from_hf_config(str(folder / CONFIG_FILE), dtype=dtype, param_dtype=param_dtype)
    located = _open_weights(folder)
    maps = tensor_maps(cfg, _fused_expert_layers(located))
    expected = {m.hf_name for m in maps}
    if cfg.tie_word_embeddings and "lm_head.weight" in located:
        embed, head = located["model.embed_tokens.weight"], located["lm_head.weight"]
        if not np.array_equal(embed.get_tensor("model.embed_tokens.weight"), head.get_tensor("lm_head.weight")):
            raise ValueError(
                "config says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
                "set tie_word_embeddings=false in config.json if the head is meant to be separate"
            )
        expected.add("lm_head.weight")
    unexpected = sorted(n for n in located if n not in expected and not IGNORED_TENSORS.match(n))
    if unexpected:
        raise ValueError(f"{folder}: tensors that a {type(cfg).__name__} with this config.json does not have: "
                         f"{unexpected[:8]}{_family_mismatch(cfg, unexpected)}")
    np_dtype = np.dtype(qwen3.resolve_dtype(param_dtype))
    shardings = _target_shardings(cfg, mesh)
    missing = [m.hf_name for m in maps if m.hf_name not in located]
    if missing:
        raise ValueError(f"{folder}: tensor {missing[0]} is missing from the checkpoint "
                         f"({len(missing)} missing in all){_family_mismatch(cfg, sorted(located))}")
    for m in maps:
        if tensor_shape(located[m.hf_name], m.hf_name) != m.hf_shape:
            raise ValueError(
                f"tensor {m.hf_name} has shape {tensor_shape(located[m.hf_name], m.hf_name)} in the checkpoint, but "
                f"config.json implies {m.hf_shape}; the config and the weights disagree"
            )
    by_path: dict[tuple, list[TensorMap]] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    arrays = {path: _place_tensors(group, located, np_dtype, shardings[path]) for path, group in by_path.items()}
    logging.info("loaded %s: %d tensors, %.1fM parameters, %s", folder, len(maps), cfg.num_params() / 1e6, param_dtype)
    return _assemble(cfg, arrays)


# ----------------------------------------------------------------------------------------------
# NNX -> HF
# ----------------------------------------------------------------------------------------------


def export_hf(model: qwen3.Qwen3, out_dir: str | os.PathLike, dtype: str | None = None,
              tokenizer_from: str | os.PathLike | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> pathlib.Path | epath.Path:
    """Writes config.json and safetensors (sharded with an index when large) that transformers and vLLM load.

    dtype defaults to the model's parameter dtype. Tokenizer files found in `tokenizer_from` are copied.
    Every process must call this (sharded arrays are gathered); process 0 writes. A gs:// out_dir is
    written locally first (the safetensors writer needs a local file) and then uploaded file by file.
    """
    if files.is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="distillspec-export-") as staging:
            export_hf(model, staging, dtype, tokenizer_from, max_shard_bytes)
            remote = epath.Path(out_dir)
            if jax.process_index() == 0:
                remote.mkdir(parents=True, exist_ok=True)
                for local in sorted(pathlib.Path(staging).iterdir()):
                    (remote / local.name).write_bytes(local.read_bytes())
        return remote
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(qwen3.resolve_dtype(dtype))
    flat = {path: shd.to_host(var[...]).astype(np_dtype)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {m.hf_name: np.ascontiguousarray(m.to_hf(flat[m.path][m.index])) for m in tensor_maps(cfg)}
    out = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / file, shard)
            weight_map.update({name: file for name in shard})
        total = sum(a.nbytes for a in tensors.values())
        files.write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map},
                         sort_keys=True)
    hf_config = to_hf_config(cfg)
    hf_config["torch_dtype"] = dtype
    files.write_json(out / CONFIG_FILE, hf_config, sort_keys=True)
    if tokenizer_from is not None:
        _copy_tokenizer_files(pathlib.Path(tokenizer_from), out)
    return out


def _copy_tokenizer_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ----------------------------------------------------------------------------------------------
# Orbax
# ----------------------------------------------------------------------------------------------


def save_orbax(model: qwen3.Qwen3, directory: str | os.PathLike) -> epath.Path:
    """Saves the parameters (Orbax, sharded arrays written by their owners) and the model config.

    The directory may be local or gs://. An existing checkpoint there is replaced.
    """
    import orbax.checkpoint as ocp

    directory = epath.Path(directory)
    if not files.is_remote(directory):
        directory = epath.Path(os.path.abspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / ORBAX_PARAMS, pure, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        files.write_json(directory / ORBAX_CONFIG, catalog.config_to_dict(model.cfg), sort_keys=True)
    return directory


def load_orbax(directory: str | os.PathLike, mesh: Mesh | None = None, **cfg_overrides) -> qwen3.Qwen3:
    """Restores a model saved by `save_orbax`, straight onto the mesh's shardings when one is given.

    cfg_overrides may change numerics that do not alter shapes (dtype); the stored param_dtype is what
    the arrays are restored as unless overridden.
    """
    import orbax.checkpoint as ocp

    directory = epath.Path(directory)
    if not files.is_remote(directory):
        directory = epath.Path(os.path.abspath(directory))
    if not (directory / ORBAX_CONFIG).exists():
        raise FileNotFoundError(f"{directory} holds no converted model ({ORBAX_CONFIG} missing); convert one first "
                                "with `python -m distillspec_jax.models.convert --hf=... --out=...`")
    stored = json.loads((directory / ORBAX_CONFIG).read_text())
    # Folders converted before rematerialisation moved to the training step carry a `remat` field.
    stored.pop(LEGACY_CONFIG_FIELD_REMAT, None)
    cfg = catalog.config_from_dict(stored, **cfg_overrides)
    graphdef, state = nnx.split(qwen3.abstract_model(cfg))
    if mesh is None:
        mesh = shd.single_device_mesh()
    target = shd.abstract_params(state, mesh)
    with ocp.StandardCheckpointer() as ckptr:
        stored_layers = ckptr.metadata(directory / ORBAX_PARAMS).item_metadata["layers"]
        if _unstacked(stored_layers):
            restored = _restore_unstacked(ckptr, directory / ORBAX_PARAMS, target, stored_layers)
        else:
            restored = ckptr.restore(directory / ORBAX_PARAMS, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def _unstacked(layers_metadata) -> bool:
    """Whether a saved parameter tree holds one subtree per layer ('0', '1', ...), the layout written
    before the layers were stacked for the scan."""
    return all(str(key).isdigit() for key in layers_metadata.keys())


def _restore_unstacked(ckptr, path: epath.Path, target: dict, layers_metadata) -> dict:
    """Restores a per-layer checkpoint into the stacked layout: each layer on the host, then stacked and
    placed on the target's sharding (once per folder; re-save it with `save_orbax` to skip this)."""
    logging.warning("%s holds per-layer parameters (written before layers were stacked); stacking them on load",
                    path)
    num_layers = len(layers_metadata.keys())
    layer_target = jax.tree.map(lambda t: np.empty(t.shape[1:], t.dtype), target["layers"])
    host_target = {**jax.tree.map(lambda t: np.empty(t.shape, t.dtype), {k: v for k, v in target.items()
                                                                         if k != "layers"}),
                   "layers": {str(i): layer_target for i in range(num_layers)}}
    restored = ckptr.restore(path, host_target)
    layers = jax.tree.map(lambda *xs: np.stack(xs), *(restored["layers"][str(i)] for i in range(num_layers)))
    restored = {**restored, "layers": layers}
    return jax.tree.map(lambda x, t: shd.place(np.asarray(x), t.sharding), restored, target)


def convert_hf_to_orbax(path_or_hub_id: str, out_dir: str, dtype: str = "float32", mesh: Mesh | None = None) -> epath.Path:
    """Loads a HF checkpoint and saves it as Orbax, with its tokenizer files under out_dir/tokenizer."""
    model = load_hf(path_or_hub_id, dtype=dtype, mesh=mesh)
    out = save_orbax(model, out_dir)
    src = resolve_checkpoint(path_or_hub_id)
    if jax.process_index() == 0 and not files.is_remote(out):
        tok = pathlib.Path(str(out)) / TOKENIZER_DIR
        tok.mkdir(exist_ok=True)
        _copy_tokenizer_files(src, tok)
    return out


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.to_hf:
        if not f.orbax or not f.out:
            raise flags.IllegalFlagValueError("--to_hf needs --orbax=CONVERTED_DIR and --out=HF_DIR")
        model = load_orbax(f.orbax)
        tok = pathlib.Path(f.orbax) / TOKENIZER_DIR
        out = export_hf(model, f.out, dtype=f.dtype, tokenizer_from=tok if tok.is_dir() else None)
    else:
        if not f.hf or not f.out:
            raise flags.IllegalFlagValueError("give --hf=PATH_OR_HUB_ID and --out=DIR (or --to_hf --orbax=DIR --out=DIR)")
        out = convert_hf_to_orbax(f.hf, f.out, dtype=f.dtype or "float32")
    print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("hf", None, "HF checkpoint: a local folder or a hub id such as Qwen/Qwen3-0.6B")
    flags.DEFINE_string("out", None, "output folder: Orbax (default direction) or HF safetensors (--to_hf)")
    flags.DEFINE_string("dtype", None, "parameter dtype of the output: float32 | bfloat16 (default: float32 from HF, "
                        "which holds bfloat16 weights exactly; with --to_hf, the model's parameter dtype)")
    flags.DEFINE_bool("to_hf", False, "convert an Orbax folder written by this tool back to HF safetensors")
    flags.DEFINE_string("orbax", None, "with --to_hf: the converted Orbax folder to export")
    app.run(main)
