"""Qwen3 (dense) in Flax NNX: the config with presets for every dense size, the decoder, and its KV cache.

Dimension letters (see style.md): B batch, T query positions, S key/cache positions, D model width,
N query heads, K kv heads, G = N // K query heads per kv head, H head width, F MLP width, V vocabulary.

This file knows nothing about HF names or config.json; `convert.py` owns both. How a distribution is
formed from logits (vocabulary padding mask, temperature, filters) belongs to `sampling.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# The Qwen3 tokenizer has 151669 real ids (the last is `</think>` = 151668); the embedding has
# 151936 rows so that V is a multiple of 128. The extra rows are never produced by the tokenizer.
QWEN3_VOCAB_SIZE = 151936
QWEN3_NUM_REAL_TOKENS = 151669

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# A finite "minus infinity": exp() underflows to exactly 0, and 0 * (this - this) stays 0, whereas
# -inf would turn p * (log p - log q) into NaN for masked entries.
MASK_VALUE = -1e30

INIT_STDDEV = 0.02  # HF Qwen3 `initializer_range`: normal(0, 0.02) for every linear and the embedding

DENSE_MLP = "dense"  # the kind of a layer whose MLP is the SwiGLU of width intermediate_size


def resolve_dtype(name: str) -> jnp.dtype:
    """Maps a dtype name from a config to the JAX dtype, with an error that lists the choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture and numerics of one Qwen3 dense model. Field names follow HF's config.json.

    The decoder asks its config what each layer's MLP is (`mlp_kinds`, `make_mlp`): here always the dense
    SwiGLU; `qwen3_moe.Qwen3MoeConfig` answers with routed experts for its sparse layers.
    """

    model_type: ClassVar[str] = "qwen3"  # HF config.json's model_type; also written with converted models

    vocab_size: int  # V: rows of the embedding and the LM head, padding rows included
    hidden_size: int  # D
    intermediate_size: int  # F: SwiGLU width
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K (GQA when K < N)
    head_dim: int = 128  # H
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    rope_theta: float = 1_000_000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    max_position_embeddings: int = 40960  # longest position the model was trained for
    num_real_tokens: int | None = None  # ids >= this are vocabulary padding; None means all V are real
    param_dtype: str = "float32"  # storage dtype of the parameters: float32 | bfloat16
    dtype: str = "float32"  # compute dtype of activations and the KV cache: float32 | bfloat16

    def __post_init__(self):
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_real_tokens is not None and not 0 < self.num_real_tokens <= self.vocab_size:
            raise ValueError(f"num_real_tokens={self.num_real_tokens} must be in (0, vocab_size={self.vocab_size}]")

    @property
    def real_vocab_size(self) -> int:
        """Number of ids that are real tokens; logits beyond it are masked in every distribution."""
        return self.vocab_size if self.num_real_tokens is None else self.num_real_tokens

    def replace(self, **changes: Any) -> Qwen3Config:
        return dataclasses.replace(self, **changes)

    def mlp_kinds(self) -> tuple[str, ...]:
        """The kind of MLP of each layer, in order; every layer of a dense model has the SwiGLU MLP."""
        return (DENSE_MLP,) * self.num_hidden_layers

    def make_mlp(self, kind: str, rngs: nnx.Rngs) -> nnx.Module:
        """The MLP module of one layer of the given kind (see `mlp_kinds`)."""
        if kind != DENSE_MLP:
            raise ValueError(f"a dense Qwen3 layer has no {kind!r} MLP")
        return MLP(self.hidden_size, self.intermediate_size, resolve_dtype(self.param_dtype), rngs)

    def mlp_params(self, kind: str) -> int:
        """Parameters of one MLP of the given kind."""
        return 3 * self.hidden_size * self.intermediate_size

    def active_params(self) -> int:
        """Parameters one token reads: all of them in a dense model."""
        return self.num_params()

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h = self.hidden_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        per_layer = d * n * h * 2 + d * k * h * 2 + 2 * d + 2 * h
        mlps = sum(self.mlp_params(kind) for kind in self.mlp_kinds())
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * per_layer + mlps + d + head



def published_shape(hidden: int, ffn: int, layers: int, heads: int, tied: bool, kv_heads: int = 8) -> Qwen3Config:
    """A released Qwen3 checkpoint's config: its shape, with the values every Qwen3 release shares (vocabulary,
    head width 128, RoPE, norms)."""
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        num_real_tokens=QWEN3_NUM_REAL_TOKENS,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128,
        tie_word_embeddings=tied,
    )


# The published config.json of each dense Qwen3 checkpoint (all: head_dim 128, 8 kv heads,
# rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 40960, vocab 151936).
PRESETS: dict[str, Qwen3Config] = {
    "Qwen3-0.6B": published_shape(1024, 3072, 28, 16, tied=True),
    "Qwen3-1.7B": published_shape(2048, 6144, 28, 16, tied=True),
    "Qwen3-4B": published_shape(2560, 9728, 36, 32, tied=True),
    "Qwen3-8B": published_shape(4096, 12288, 36, 32, tied=False),
    "Qwen3-14B": published_shape(5120, 17408, 40, 40, tied=False),
    "Qwen3-32B": published_shape(5120, 25600, 64, 64, tied=False),
}


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values of every layer, stacked, plus the number of valid entries of each row.

    k, v: [L, B, K, S, H] in the compute dtype. lengths: [B] int32, tokens already cached per row.
    A step of T tokens writes them at slots lengths[b] .. lengths[b] + T - 1 of row b, in every layer.
    Rolling back rejected draft tokens only lowers `lengths`: stale slots are masked and later overwritten.
    One stacked array per kind (not one per layer) is what the scan over layers carries and updates in place.
    S is next to H, the order both attention products read (keys contract H, values contract S), so that no
    step relays out the cache (on CPU the [L, B, S, K, H] order cost a copy of every layer's cache per step).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dtype = resolve_dtype(cfg.dtype)
        # Two distinct buffers so that donation and in-place updates never alias.
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        return self._replace(lengths=lengths.astype(jnp.int32))


UNROLLED_WRITE_ROWS = 64  # batches up to this many rows write the cache row by row; larger ones by one scatter


def _write_rows(cache_lbksh: jax.Array, layer: jax.Array, new_btkh: jax.Array, start_b: jax.Array) -> jax.Array:
    """Writes each row's T new entries of one layer at the row's own start slot, in place on the scan's carry.

    Up to UNROLLED_WRITE_ROWS rows: one dynamic_update_slice per row, which XLA's cost analysis counts at the bytes
    written. Beyond (thousands of rows, as in sampling tests), one scatter, which is also in place but which the cost
    analysis counts at its whole operand; an unrolled row loop would make the program grow with the batch. (A vmap
    of per-row updates moved the batch axis first, and XLA then transposed every layer's whole cache twice a step.)
    """
    b, t = new_btkh.shape[:2]
    new_btkh = new_btkh.astype(cache_lbksh.dtype)
    if b > UNROLLED_WRITE_ROWS:
        rows_b1, slots_bt = jnp.arange(b)[:, None], start_b[:, None] + jnp.arange(t)[None, :]
        # The advanced indices (layer, rows, slots) broadcast to [B, T] and lead the indexed shape: [B, T, K, H].
        return cache_lbksh.at[layer, rows_b1, :, slots_bt, :].set(new_btkh, indices_are_sorted=True,
                                                                   unique_indices=True)
    new_bksh = jnp.swapaxes(new_btkh, 1, 2)
    zero = jnp.zeros((), jnp.int32)
    for row in range(b):
        cache_lbksh = jax.lax.dynamic_update_slice(cache_lbksh, new_bksh[row][None, None],
                                                   (layer, jnp.int32(row), zero, start_b[row], zero))
    return cache_lbksh


ATTENTION_BLOCK = 128  # cache slots per block of the windows a cached step's attention may read (`cache_windows`)
WINDOW_OVERHEAD = 1 / 8  # the most a window's spacing adds to the slots it must read, as a fraction of the window


def cache_windows(max_len: int, block: int = ATTENTION_BLOCK, overhead: float = WINDOW_OVERHEAD) -> tuple[int, ...]:
    """The numbers of leading cache slots a cached step's attention may read, ascending, ending at `max_len`.

    A step reads the smallest window that holds its longest row (`window_index`), so its attention costs the live
    context plus at most max(block, overhead · window) slots per row, whatever the cache's capacity. Windows are
    multiples of `block` spaced by the largest multiple of it within `overhead` of the window, so there are
    O(log(max_len / block) / overhead) of them: each is one branch of a small `lax.switch`, compiled once.
    """
    if block < 1 or max_len < 1:
        raise ValueError(f"block={block} and max_len={max_len} must be >= 1")
    windows, window = [], block
    while window < max_len:
        windows.append(window)
        window += block * max(1, int(window * overhead) // block)
    return (*windows, max_len)


def window_index(windows: tuple[int, ...], lengths_b: jax.Array, new_tokens: int) -> jax.Array:
    """Index of the smallest of `windows` that holds every row after it writes `new_tokens` more (the last window,
    the whole cache, if none does: callers guarantee it fits)."""
    needed = jnp.max(lengths_b) + new_tokens
    index = jnp.searchsorted(jnp.asarray(windows, jnp.int32), needed.astype(jnp.int32), side="left")
    return jnp.minimum(index, len(windows) - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return (INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistics in float32 as HF does."""

    def __init__(self, dim: int, eps: float, param_dtype, axis_name: str):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, H] in float32 (HF rotate-half layout: the H/2 frequencies appear twice).

    Positions reach tens of thousands, where bfloat16 cannot even represent consecutive integers,
    so the angles are always formed in float32.
    """
    inv_freq_h2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_bth2 = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h2
    angles_bth = jnp.concatenate([angles_bth2, angles_bth2], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
    return out.astype(x_btnh.dtype)


def attend(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """Grouped-query softmax attention with scores and softmax in float32. Returns o: [B, T, N, H].

    The definition every attention path is tested against. Query head n reads kv head n // G, the same grouping
    as HF's repeat_kv.
    """
    b, t, n, h = q_btnh.shape
    k = k_bksh.shape[1]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores_bkgts = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, k_bksh, preferred_element_type=jnp.float32)
    scores_bkgts = scores_bkgts * (h**-0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts, MASK_VALUE)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bksh.dtype)
    o_btkgh = jnp.einsum("bkgts,bksh->btkgh", probs_bkgts, v_bksh)
    return o_btkgh.reshape(b, t, n, h)


def attend_positions(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """`attend` of the queries at `positions_bt` over keys whose slot s holds position s: one rule covers
    causality, stale cache slots beyond a row's length and right padding."""
    key_positions_s = jnp.arange(k_bksh.shape[2])
    mask_bts = key_positions_s[None, None, :] <= positions_bt[:, :, None]
    return attend(q_btnh, k_bksh.astype(q_btnh.dtype), v_bksh.astype(q_btnh.dtype), mask_bts)


def attend_cache(q_btnh: jax.Array, k_lbksh: jax.Array, v_lbksh: jax.Array, layer: jax.Array,
                 positions_bt: jax.Array, windows: tuple[int, ...], index: jax.Array) -> jax.Array:
    """`attend_positions` over layer `layer` of the stacked cache, reading only its first windows[index] slots.

    Slots past a row's position are masked in any window, so every window that holds the longest row gives the
    same result as the whole cache (the tested definition); the switch picks the smallest, which bounds a step's
    cache reads by the live rows rather than the capacity.
    """
    _, b, k, _, h = k_lbksh.shape

    def read(window: int, q_btnh, k_lbksh, v_lbksh):
        keys_bksh = jax.lax.dynamic_slice(k_lbksh, (layer, 0, 0, 0, 0), (1, b, k, window, h))[0]
        values_bksh = jax.lax.dynamic_slice(v_lbksh, (layer, 0, 0, 0, 0), (1, b, k, window, h))[0]
        return attend_positions(q_btnh, keys_bksh, values_bksh, positions_bt)

    branches = [functools.partial(read, window) for window in windows]
    if len(branches) == 1:
        return branches[0](q_btnh, k_lbksh, v_lbksh)
    return jax.lax.switch(index, branches, q_btnh, k_lbksh, v_lbksh)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        pdt = resolve_dtype(cfg.param_dtype)
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nnx.Param(normal_init(rngs, (d, n, h), pdt), axes=("embed", "q_heads", "head_dim"))
        self.k_proj = nnx.Param(normal_init(rngs, (d, k, h), pdt), axes=("embed", "kv_heads", "head_dim"))
        self.v_proj = nnx.Param(normal_init(rngs, (d, k, h), pdt), axes=("embed", "kv_heads", "head_dim"))
        self.o_proj = nnx.Param(normal_init(rngs, (n, h, d), pdt), axes=("q_heads", "head_dim", "embed"))
        # Qwen3's per-head norms on q and k, applied before RoPE.
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pdt, "head_dim")
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pdt, "head_dim")

    def project(self, x_btd: jax.Array, rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, N, H], k and v [B, T, K, H] of the new tokens, with Qwen3's q/k norms before RoPE."""
        dt = x_btd.dtype
        q_btnh = self.q_norm(jnp.einsum("btd,dnh->btnh", x_btd, self.q_proj[...].astype(dt)))
        k_btkh = self.k_norm(jnp.einsum("btd,dkh->btkh", x_btd, self.k_proj[...].astype(dt)))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.v_proj[...].astype(dt))
        cos_bth, sin_bth = rope
        return apply_rope(q_btnh, cos_bth, sin_bth), apply_rope(k_btkh, cos_bth, sin_bth), v_btkh

    def out_proj(self, o_btnh: jax.Array) -> jax.Array:
        """o_proj over the heads, as one [N·H, D] matrix (E = N·H; the reshape is free) so that no step relays out
        the weight to contract two axes."""
        n, h, d = self.o_proj.shape
        w_ed = self.o_proj[...].reshape(n * h, d).astype(o_btnh.dtype)
        return jnp.einsum("bte,ed->btd", o_btnh.reshape(*o_btnh.shape[:2], n * h), w_ed)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)), of width f."""

    def __init__(self, d: int, f: int, pdt, rngs: nnx.Rngs):
        self.gate_proj = nnx.Param(normal_init(rngs, (d, f), pdt), axes=("embed", "mlp"))
        self.up_proj = nnx.Param(normal_init(rngs, (d, f), pdt), axes=("embed", "mlp"))
        self.down_proj = nnx.Param(normal_init(rngs, (f, d), pdt), axes=("mlp", "embed"))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = x_btd.dtype
        gate_btf = jnp.einsum("btd,df->btf", x_btd, self.gate_proj[...].astype(dt))
        up_btf = jnp.einsum("btd,df->btf", x_btd, self.up_proj[...].astype(dt))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    """Attention and an MLP of the given kind (the dense SwiGLU, or routed experts), each after an RMSNorm
    and around a residual add."""

    def __init__(self, cfg: Qwen3Config, kind: str, rngs: nnx.Rngs):
        pdt = resolve_dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, "norm")
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, "norm")
        self.mlp = cfg.make_mlp(kind, rngs)

    def __call__(self, x_btd, positions_bt, rope, cache: KVCache | None, layer: jax.Array | None,
                 windows: tuple[int, ...] = (), window: jax.Array | None = None):
        """One layer. With a cache, the new keys and values are written into layer `layer` of the stacked
        cache before attention reads its first windows[window] slots (`attend_cache`); returns (x_btd, (k, v) of
        the updated stacked cache or None, the normed input of the MLP [B, T, D], which analyses of the routing
        read and everything else drops)."""
        q_btnh, k_btkh, v_btkh = self.attn.project(self.attn_norm(x_btd), rope)
        if cache is None:
            new_kv = None
            o_btnh = attend_positions(q_btnh, jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt)
        else:
            k_lbksh = _write_rows(cache.k, layer, k_btkh, cache.lengths)
            v_lbksh = _write_rows(cache.v, layer, v_btkh, cache.lengths)
            new_kv = (k_lbksh, v_lbksh)
            o_btnh = attend_cache(q_btnh, k_lbksh, v_lbksh, layer, positions_bt, windows, window)
        x_btd = x_btd + self.attn.out_proj(o_btnh)
        mlp_in_btd = self.mlp_norm(x_btd)
        return x_btd + self.mlp(mlp_in_btd), new_kv, mlp_in_btd


LAYERS_AXIS = "layers"  # logical axis of the stacked layer dimension L (never sharded: the scan walks it)


def layer_runs(cfg: Qwen3Config) -> list[tuple[int, tuple[str, ...]]]:
    """(index of the first layer, kinds of its layers) for each run of consecutive layers whose MLPs are of
    one kind: each run is one stacked module and one scan. A dense model, and an MoE model whose every
    layer is routed (Qwen3-30B-A3B, Qwen3-235B-A22B), are a single run."""
    runs, start = [], 0
    for _, group in itertools.groupby(cfg.mlp_kinds()):
        kinds = tuple(group)
        runs.append((start, kinds))
        start += len(kinds)
    return runs


def run_name(start: int) -> str:
    """The model attribute of the run of layers that begins at layer `start`: `layers` for the first run (the
    only one of most models), `layers_<start>` for later ones."""
    return LAYERS_AXIS if start == 0 else f"{LAYERS_AXIS}_{start}"


def is_run_name(key: Any) -> bool:
    """Whether a state key names a run of stacked layers (see `run_name`)."""
    name = str(key)
    return name == LAYERS_AXIS or (name.startswith(f"{LAYERS_AXIS}_") and name[len(LAYERS_AXIS) + 1:].isdigit())


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose every parameter is the stack [L, ...] of the given layers' parameters, with
    the logical axis `layers` in front. The decoder scans over it: one layer's program is compiled once,
    whatever the depth, and rematerialisation applies per scan step (an unrolled stack of remat'd layers
    lets XLA schedule every recomputation early, which on CPU kept all activations alive: measured)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata()["axes"]
        return variables[0].replace(jnp.stack([v[...] for v in variables]), axes=(LAYERS_AXIS, *axes))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Qwen3(nnx.Module):
    """The Qwen3 decoder with its LM head.

    model(tokens_bt) -> float32 logits [B, T, V] (one causal pass, no cache).
    model.step(tokens_bt, cache) -> (float32 logits [B, T, V], cache advanced by T per row).
    """

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        pdt = resolve_dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), pdt), axes=("vocab", "embed"))
        # Initialised layer by layer (the same random stream as separate layers), then stacked: one stack per
        # run of consecutive layers with the same kind of MLP (a single run, `layers`, unless the config mixes
        # dense and routed MLPs).
        for start, kinds in layer_runs(cfg):
            setattr(self, run_name(start), stack_layers([DecoderLayer(cfg, kind, rngs) for kind in kinds]))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, "norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(normal_init(rngs, (cfg.hidden_size, cfg.vocab_size), pdt), axes=("embed", "vocab"))

    def _decoder(self, tokens_bt, positions_bt, cache: KVCache | None, remat: bool = False,
                 mlp_inputs: bool = False, windows: tuple[int, ...] | None = None, unroll: bool = False):
        """(final-norm hidden states, the advanced cache or None, per run of layers its MLPs' inputs
        [L_run, B, T, D] when `mlp_inputs`, else None). With a cache, attention reads the smallest of `windows`
        (default: `cache_windows` of the cache) that holds the longest row. `unroll` lays the layers out one
        after another instead of a loop."""
        dt = resolve_dtype(self.cfg.dtype)
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        rope = rope_tables(positions_bt, self.cfg.head_dim, self.cfg.rope_theta)
        kv = None if cache is None else (cache.k, cache.v)
        if cache is not None:
            windows = cache_windows(cache.max_len) if windows is None else windows
            window = window_index(windows, cache.lengths, tokens_bt.shape[1])
        else:
            windows, window = (), None
        runs_mlp_in = []
        for start, kinds in layer_runs(self.cfg):
            layer_graphdef, layer_state = nnx.split(getattr(self, run_name(start)))

            def one_layer(carry, xs, layer_graphdef=layer_graphdef):
                x_btd, kv = carry
                state_l, layer = xs
                layer_cache = None if kv is None else KVCache(kv[0], kv[1], cache.lengths)
                x_btd, kv, mlp_in_btd = nnx.merge(layer_graphdef, state_l)(x_btd, positions_bt, rope, layer_cache,
                                                                           layer, windows, window)
                return (x_btd, kv), (mlp_in_btd if mlp_inputs else None)

            if remat:  # training only: keep one [B, T, D] residual per layer, recompute the rest backwards
                one_layer = jax.checkpoint(one_layer, prevent_cse=False)  # inside scan, CSE cannot undo it
            # The global index of each layer of the run: its slot in the stacked [L, ...] cache.
            layers_l = jnp.arange(start, start + len(kinds), dtype=jnp.int32)
            (x_btd, kv), mlp_in_lbtd = jax.lax.scan(one_layer, (x_btd, kv), (layer_state, layers_l), unroll=unroll)
            runs_mlp_in.append(mlp_in_lbtd)
        h_btd = self.norm(x_btd)
        runs_mlp_in = runs_mlp_in if mlp_inputs else None
        if cache is None:
            return h_btd, None, runs_mlp_in
        return h_btd, KVCache(k=kv[0], v=kv[1], lengths=cache.lengths + tokens_bt.shape[1]), runs_mlp_in

    def hidden_states(self, tokens_bt: jax.Array, *, remat: bool = False, unroll: bool = False) -> jax.Array:
        """Final-norm hidden states [B, T, D] of a causal pass from position 0 (right padding is safe).

        remat=True recomputes each layer in the backward pass. Only the training step asks for it
        (design §9): rematerialisation is a property of a backward pass, and a decode, a generation or
        an evaluation has none, so the cached `step` never takes the flag. `unroll` lays the layers out one after
        another instead of a loop (see `step`).
        """
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        return self._decoder(tokens_bt, positions_bt, None, remat=remat, unroll=unroll)[0]

    def mlp_inputs(self, tokens_bt: jax.Array) -> list[jax.Array]:
        """The normed input of every layer's MLP in a causal pass from position 0: one [L_run, B, T, D] array per
        run of layers (`layer_runs`). What an analysis of the routing reads (`qwen3_moe.routed_experts`)."""
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        return self._decoder(tokens_bt, positions_bt, None, mlp_inputs=True)[2]

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """LM head: [B, T, D] -> float32 [B, T, V], accumulated in float32 whatever the compute dtype."""
        if self.cfg.tie_word_embeddings:
            w_vd = self.embed[...].astype(h_btd.dtype)
            return jnp.einsum("btd,vd->btv", h_btd, w_vd, preferred_element_type=jnp.float32)
        w_dv = self.lm_head[...].astype(h_btd.dtype)
        return jnp.einsum("btd,dv->btv", h_btd, w_dv, preferred_element_type=jnp.float32)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        return self.logits(self.hidden_states(tokens_bt))

    def step(self, tokens_bt: jax.Array, cache: KVCache, *, windows: tuple[int, ...] | None = None,
             unroll: bool = False) -> tuple[jax.Array, KVCache]:
        """Feeds T new tokens per row at positions lengths[b] .. lengths[b] + T - 1.

        Returns float32 logits [B, T, V] and the cache with every row's length advanced by T; callers
        that fed padding (ragged prefill) or rejected drafts set the true lengths with `with_lengths`.
        The caller guarantees lengths[b] + T <= cache.max_len (checked before jit by the engines).

        Attention reads only the smallest of `windows` (static; default `cache_windows(cache.max_len)`) that holds
        the longest row, so a step costs what its live rows need. `windows=(cache.max_len,)` reads the whole
        cache, the plain definition; `windows=(w,)` compiles only the program that runs while rows fit in w
        slots (what a per-step cost analysis measures; then every row must fit in w). `unroll` lays out the
        layers one after another instead of a loop: XLA's cost analysis counts a loop's body once, so a per-step
        figure needs it; longer to compile.
        """
        positions_bt = cache.lengths[:, None] + jnp.arange(tokens_bt.shape[1])[None, :]
        h_btd, cache, _ = self._decoder(tokens_bt, positions_bt, cache, windows=windows, unroll=unroll)
        return self.logits(h_btd), cache


def init_model(cfg: Qwen3Config, seed: int = 0) -> Qwen3:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms), as HF initialises Qwen3."""
    return Qwen3(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: Qwen3Config) -> Qwen3:
    """The model with ShapeDtypeStruct leaves: shapes for loading and restoring without allocating."""
    return nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(params=0)))
