"""Pieces every benchmark shares: the machine description, JSON output, model shapes, the measured memory
bandwidth and peak FLOP/s that the rooflines divide by, and byte/FLOP counts of a Qwen3 step.

Timing itself is `distillspec_jax.evaluate.median_seconds` (warm-up calls, then the median of timed calls, each
waited for with `jax.block_until_ready`), so the benchmarks and the evaluation measure time the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax import costs
from distillspec_jax.costs import (attention_flops_per_token, decode_step_bytes, dtype_bytes,  # noqa: F401
                                   forward_flops_per_token, kv_bytes_per_token, matmul_params)
from distillspec_jax.evaluate import median_seconds
from distillspec_jax.models import catalog, qwen3

# Shapes a benchmark can name with --model. The Qwen3 presets are the published shapes; 'small' is the CPU
# shape of issue 7's CPU target (4 layers, hidden 512) and 'tiny' the test size (seconds on a 2-core CPU).
# The small shapes default to a smaller vocabulary than Qwen3's 151936: with D = 512 the [V, D] LM head would
# otherwise be 6x the rest of the model and every figure would measure one GEMV. --vocab_size overrides it.
SMALL_SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "small-draft": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "tiny-draft": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16),
}
PRESET_ALIASES = {"0.6b": "Qwen3-0.6B", "1.7b": "Qwen3-1.7B", "4b": "Qwen3-4B", "8b": "Qwen3-8B",
                  "14b": "Qwen3-14B", "32b": "Qwen3-32B"}
MODEL_CHOICES = (*SMALL_SHAPES, *PRESET_ALIASES)

# Dense peak FLOP/s of known accelerators in bfloat16 (distillspec_jax.costs.CHIPS, vendor datasheets), matched
# against `device.device_kind` by substring, longest key first. Anything else (a CPU) is measured.
PEAK_BF16_FLOPS: dict[str, float] = {
    **{kind: c.peak_flops for kind, c in costs.CHIPS.items()},
    "A100": 312e12,
    "TPU v5e": costs.CHIPS["TPU v5 lite"].peak_flops,  # runtimes spell device kinds differently
    "TPU v5p": costs.CHIPS["TPU v5"].peak_flops,
}


# ----------------------------------------------------------------------------------------------
# Flags and output
# ----------------------------------------------------------------------------------------------


def _ints(text: str, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32], each >= 1 (an argparse type)."""
    return _ints(text, 1)


def int_list_or_zero(text: str) -> list[int]:
    """'128,0' -> [128, 0], each >= 0 (an argparse type)."""
    return _ints(text, 0)


def add_model_flags(parser: argparse.ArgumentParser, default_model: str = "small") -> None:
    parser.add_argument("--model", default=default_model, choices=MODEL_CHOICES,
                        help="shape: a Qwen3 preset (0.6b ... 32b) or a small CPU/test shape")
    parser.add_argument("--dtype", default="float32", choices=sorted(qwen3.DTYPES),
                        help="parameter and compute dtype (bfloat16 on accelerators)")
    parser.add_argument("--vocab_size", type=int, default=None, help="override the shape's vocabulary size V")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure (the median is reported)")


def print_json(result: dict[str, Any]) -> None:
    """The benchmark's one JSON object on stdout (everything else a benchmark says goes to stderr)."""
    json.dump(result, sys.stdout, indent=1, sort_keys=False, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an optional reference library that is not installed
        return None


def machine_info() -> dict[str, Any]:
    """Where the figures come from (no host name): OS, CPU, core count, load, accelerator, library versions."""
    device = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": None if load is None else [round(x, 2) for x in load],
        "jax_backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")},
        # Thread settings that change CPU figures (OpenMP spin-waiting collapses under oversubscription).
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS", "JAX_PLATFORMS",
                                              "XLA_PYTHON_CLIENT_PREALLOCATE")},
    }


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_config(name: str, dtype: str = "float32", vocab_size: int | None = None,
                 layers: int | None = None) -> qwen3.Qwen3Config:
    """The config of a named shape with parameters and compute both in `dtype`."""
    overrides: dict[str, Any] = dict(param_dtype=dtype, dtype=dtype)
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    if name in PRESET_ALIASES:
        if vocab_size is not None:
            overrides.update(vocab_size=vocab_size, num_real_tokens=min(vocab_size, qwen3.QWEN3_NUM_REAL_TOKENS))
        return catalog.preset(PRESET_ALIASES[name], **overrides)
    if name not in SMALL_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_CHOICES}")
    fields = dict(SMALL_SHAPES[name], tie_word_embeddings=True, max_position_embeddings=40960)
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    fields.update(overrides)
    return qwen3.Qwen3Config(**fields)


def config_from_flags(args: argparse.Namespace) -> qwen3.Qwen3Config:
    return model_config(args.model, args.dtype, args.vocab_size, args.layers)


def build_model(cfg: qwen3.Qwen3Config, seed: int = 0) -> qwen3.Qwen3:
    """Random weights (normal(0, 0.02), unit norms): speed does not depend on weight values."""
    return qwen3.init_model(cfg, seed)


def describe(cfg: qwen3.Qwen3Config) -> dict[str, Any]:
    """The shape fields a reader needs to reproduce a figure, and the parameter count."""
    return {
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size, "tied": cfg.tie_word_embeddings, "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.dtype, "params": cfg.num_params(),
    }


def random_prompts(batch: int, prompt_len: int, cfg: qwen3.Qwen3Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Full-length prompts of real-token ids: (prompts [B, T] int32, prompt_lens [B] = T)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.real_vocab_size, size=(batch, prompt_len), dtype=np.int32)
    return prompts, np.full((batch,), prompt_len, np.int32)


# ----------------------------------------------------------------------------------------------
# Counting bytes and FLOPs
# ----------------------------------------------------------------------------------------------


# dtype_bytes, matmul_params, kv_bytes_per_token, decode_step_bytes, attention_flops_per_token and
# forward_flops_per_token live in distillspec_jax.costs (the pre-flight uses them too), imported above.


# ----------------------------------------------------------------------------------------------
# Hardware limits, measured on the device the benchmark runs on
# ----------------------------------------------------------------------------------------------


def memory_bandwidth(size_mib: int | None = None, runs: int = 5) -> dict[str, Any]:
    """Achievable memory bandwidth of the default device, from two jitted kernels over a float32 array larger
    than the last-level cache: an in-place scaled copy (the array donated, so no fresh output is paged in;
    it reads and writes the array: 2x its bytes) and a row-wise sum (reads it once). The larger of the two is
    what a roofline divides by: it is a rate XLA demonstrably reaches on this device."""
    if size_mib is None:
        size_mib = 512 if jax.default_backend() == "cpu" else 4096
    n = size_mib * 2**20 // 4
    nbytes = n * 4
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    reduce = jax.jit(lambda a: jnp.sum(a.reshape(256, -1), axis=1))  # rows can run on several threads
    holder = {"x": jnp.ones((n,), jnp.float32)}

    def copy_in_place():
        holder["x"] = scale(holder["x"])
        return holder["x"]

    copy_s, _ = median_seconds(copy_in_place, runs=runs, warmup=2)
    reduce_s, _ = median_seconds(lambda: reduce(holder["x"]), runs=runs, warmup=2)
    del holder["x"]
    copy_bw, reduce_bw = 2 * nbytes / copy_s, nbytes / reduce_s
    return {"array_mib": size_mib, "copy_gb_s": copy_bw / 1e9, "read_reduce_gb_s": reduce_bw / 1e9,
            "bandwidth_gb_s": max(copy_bw, reduce_bw) / 1e9}


def peak_flops(dtype: str = "bfloat16", runs: int = 5, size: int | None = None) -> dict[str, Any]:
    """Peak FLOP/s for MFU: the datasheet figure of a known accelerator (bfloat16 dense), otherwise measured
    with a jitted square matmul in `dtype` (reported as measured: a CPU has no single datasheet figure)."""
    kind = jax.devices()[0].device_kind
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return {"peak_flops": PEAK_BF16_FLOPS[key], "source": f"datasheet bf16 dense ({key})", "dtype": "bfloat16"}
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    dt = qwen3.resolve_dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dt)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds, _ = median_seconds(lambda: matmul(a, b), runs=runs, warmup=2)
    return {"peak_flops": 2.0 * size**3 / seconds, "source": f"measured: jitted {size}x{size} {dtype} matmul on "
            f"{kind}", "dtype": dtype}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or not math.isfinite(denominator):
        return None
    return float(numerator / denominator)


# ----------------------------------------------------------------------------------------------
# Timing (on top of evaluate.median_seconds)
# ----------------------------------------------------------------------------------------------


def first_and_median(fn, runs: int) -> tuple[float, float, Any]:
    """(seconds of the first call, which compiles; median seconds of `runs` further calls; the last output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    median, out = median_seconds(fn, runs=runs, warmup=0)
    return first, median, out
