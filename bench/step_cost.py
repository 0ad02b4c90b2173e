"""What one cached decode step and one verify call cost by XLA's own compiled cost analysis, on this CPU and on a
TPU compiled ahead of time (no TPU needed: libtpu's topology), against the bytes a step must move.

    python -m bench.step_cost                               # 1.7B, bfloat16, B = 1 and 32, 128 + 256 tokens
    python -m bench.step_cost --models=1.7b,8b --batch_sizes=1,8 --verify_tokens=8 --platforms=tpu

Per model, platform and batch B, over the decode steps of a generation of N new tokens after T-token prompts in a
`--cache_len`-slot cache (contexts T − 1 .. T + N − 2, as `generate` runs them):
  * live: `Qwen3.step` with the windows of `qwen3.cache_windows`; each distinct window the generation uses is
    compiled once (`windows=(w,)`, the branch that runs while the rows fit in it), weighted by its steps.
  * whole: the same step reading every cache slot (`windows=(cache_len,)`): what attention read before.
  * live, resident weights (`--resident=1`): the live windows again with the weights in the compiler's layouts.
  * ideal bytes: every weight once (`costs.matmul_params`), each row's live keys and values, the new ones
    written, and the float32 logits. bytes_over_ideal = compiled bytes / ideal, summed over the steps.
  * verify: a (γ + 1)-token call over a 1-token step at the last context, by XLA's estimated seconds (TPU) and
    bytes and FLOPs (both platforms), twice: with the weights in their stored layout, and with the layouts the
    compiler picks (`resident_weights`). A lone program relayouts weights its matmuls want in another layout
    (on a v5p, the stacked q/k/v projections of an 8-token call: about 1 GB at 1.7B) on every call; inside the
    speculative loop those copies are loop-invariant and XLA hoists them out of the while loop, once per
    generation, so the resident figure is the per-call cost the loop pays.
  * --layers: override the layer count (e.g. 1,2): the difference of two counts is the bytes of one layer,
    free of what XLA does differently across a long unrolled program.
The layers are unrolled (`unroll=True`): XLA's cost analysis counts a loop's body once. Every figure is the
compiler's estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Format, Layout

from bench import common
from distillspec_jax import costs, tpu_topology
from distillspec_jax.models import qwen3


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compiled_cost(cfg: qwen3.Qwen3Config, batch: int, tokens: int, cache_len: int, window: int,
                  device: jax.Device, resident_weights: bool = False) -> dict[str, Any]:
    """XLA's cost analysis of one cached call of `tokens` tokens per row that reads `window` cache slots.
    resident_weights: the compiler picks the weights' layouts (`Layout.AUTO`), as for weights held in a loop."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    graphdef, state = nnx.split(qwen3.abstract_model(cfg))
    cache = jax.eval_shape(lambda: qwen3.KVCache.init(cfg, batch, cache_len))

    def step(state, tokens_bt, cache):
        logits_btv, cache = nnx.merge(graphdef, state).step(tokens_bt, cache, windows=(window,), unroll=True)
        return logits_btv, cache

    weights = jax.tree.map(lambda _: Format(Layout.AUTO, sharding) if resident_weights else sharding, state)
    in_shardings = (weights, sharding, jax.tree.map(lambda _: sharding, cache))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=2, in_shardings=in_shardings).lower(
        _abstract(state, sharding), jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=sharding),
        _abstract(cache, sharding)).compile()
    cost = compiled.cost_analysis() or {}
    return {"bytes": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0)),
            "estimated_s": cost.get("optimal_seconds"), "compile_s": time.perf_counter() - start}


def ideal_bytes(cfg: qwen3.Qwen3Config, batch: int, tokens: int, context: int) -> float:
    """Weights once, each row's `context` cached keys and values read and its `tokens` new ones written, the
    float32 logits written."""
    kv = costs.kv_bytes_per_token(cfg)
    return (costs.matmul_params(cfg) * costs.dtype_bytes(cfg.param_dtype) + batch * (context + tokens) * kv
            + batch * tokens * cfg.vocab_size * 4)


def generation_cost(cfg, batch: int, prompt_len: int, new_tokens: int, cache_len: int, device,
                    resident: bool) -> dict[str, Any]:
    """Compiled bytes per decode step over a generation, live windows against the whole cache; with `resident`,
    the live windows again with the weights in the compiler's layouts."""
    windows = qwen3.cache_windows(cache_len)
    contexts = range(prompt_len - 1, prompt_len + new_tokens - 1)
    steps = collections.Counter(windows[bisect.bisect_left(windows, c + 1)] for c in contexts)
    ideal = sum(ideal_bytes(cfg, batch, 1, c) for c in contexts) / new_tokens

    def live(resident_weights: bool) -> dict[str, Any]:
        per_window = {w: compiled_cost(cfg, batch, 1, cache_len, w, device, resident_weights) for w in sorted(steps)}
        per_step = sum(n * per_window[w]["bytes"] for w, n in steps.items()) / new_tokens
        return {"bytes_per_step": per_step, "bytes_over_ideal": per_step / ideal, "per_window": per_window}

    whole = compiled_cost(cfg, batch, 1, cache_len, cache_len, device)
    out = {
        "steps_per_window": dict(steps), "ideal_bytes_per_step": ideal, "live": live(False),
        "whole_cache": {"bytes_per_step": whole["bytes"], "bytes_over_ideal": whole["bytes"] / ideal, **whole},
    }
    if resident:
        out["live_resident_weights"] = live(True)
    return out


def verify_cost(cfg, batch: int, tokens: int, context: int, cache_len: int, device, resident: bool
                ) -> dict[str, Any]:
    """A `tokens`-token call against a 1-token step, both at `context`, in the window that holds the call, with
    the weights in their stored layouts and, with `resident`, in the compiler's."""
    windows = qwen3.cache_windows(cache_len)
    window = windows[bisect.bisect_left(windows, context + tokens)]
    out: dict[str, Any] = {"tokens": tokens, "context": context, "window": window}
    layouts = {"stored_layouts": False, "resident_weights": True} if resident else {"stored_layouts": False}
    for key, auto in layouts.items():
        one = compiled_cost(cfg, batch, 1, cache_len, window, device, auto)
        many = compiled_cost(cfg, batch, tokens, cache_len, window, device, auto)
        entry = {"step": one, "verify": many, "bytes_ratio": many["bytes"] / one["bytes"],
                 "flops_ratio": many["flops"] / one["flops"]}
        if one["estimated_s"] and many["estimated_s"]:
            entry["estimated_s_ratio"] = many["estimated_s"] / one["estimated_s"]
        out[key] = entry
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.7b", help=f"comma-separated shapes from {common.MODEL_CHOICES}")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(qwen3.DTYPES))
    parser.add_argument("--batch_sizes", type=common.int_list, default=[1, 32])
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--cache_len", type=int, default=4096)
    parser.add_argument("--verify_tokens", type=int, default=0, help="γ + 1 of the verify call (0: no verify)")
    parser.add_argument("--generation", type=int, default=1, help="1: the generation's bytes per step; 0: skip")
    parser.add_argument("--platforms", default="cpu,tpu", help="cpu and/or tpu (ahead of time)")
    parser.add_argument("--topology", default="v5p-8", help="the TPU slice whose chip is compiled for")
    parser.add_argument("--resident", type=int, default=1,
                        help="1: also compile with the weights in the compiler's layouts (as held in a loop); 0: skip")
    parser.add_argument("--layers", type=common.int_list, default=[], help="layer counts to compile ([]: the model's)")
    args = parser.parse_args(argv)
    devices = {}
    for platform in args.platforms.split(","):
        if platform == "cpu":
            devices["cpu"] = jax.devices("cpu")[0]
        elif platform == "tpu":
            devices["tpu"] = tpu_topology.topology_devices(args.topology)[0]
        else:
            parser.error(f"--platforms: unknown platform {platform!r}; use cpu and/or tpu")
    results = []
    shapes = [(name, layers) for name in args.models.split(",") for layers in args.layers or [None]]
    for name, layers in shapes:
        cfg = common.model_config(name, args.dtype)
        if layers is not None:
            cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
        for platform, device in devices.items():
            for batch in args.batch_sizes:
                common.log(f"{name} L={cfg.num_hidden_layers} {platform} B={batch}")
                entry: dict[str, Any] = {"model": name, "layers": cfg.num_hidden_layers, "platform": platform,
                                         "device_kind": device.device_kind, "batch": batch}
                if args.generation:
                    entry["generation"] = generation_cost(cfg, batch, args.prompt_len, args.new_tokens,
                                                          args.cache_len, device, bool(args.resident))
                if args.verify_tokens:
                    entry["verify"] = verify_cost(cfg, batch, args.verify_tokens, args.prompt_len + args.new_tokens
                                                  - args.verify_tokens, args.cache_len, device,
                                                  bool(args.resident))
                results.append(entry)
    return {"benchmark": "step_cost", "machine": common.machine_info(), "dtype": args.dtype,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "cache_len": args.cache_len,
            "topology": args.topology if "tpu" in devices else None, "estimates": "XLA compiled cost analysis",
            "results": results}


if __name__ == "__main__":
    common.print_json(main())
