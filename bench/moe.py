"""One routed MLP (router, top-A, experts) computed both ways: the grouped matmul over the assignments sorted
by expert (`ragged`) and every expert on every token with a one-hot combine (`dense`), per token count. The
crossover is what `qwen3_moe.DENSE_MAX_TOKENS` sets for `expert_impl='auto'`.

    python -m bench.moe                                   # CPU, a Qwen3-30B-A3B layer at reduced width
    python -m bench.moe --hidden=2048 --width=768         # the real 30B-A3B layer
    python -m bench.moe --tpu=v5p-8                   # adds XLA's TPU cost analysis of each (an estimate)
    python -m bench.moe --tokens= --cost_model=Qwen3-30B-A3B --chip=v5p   # only the analytic MoE cost model

Per token count M = B * T: the median wall time of each implementation on this machine, and the compiled
program's FLOPs and bytes accessed from XLA's cost analysis (CPU, and the TPU topology when given: compiled
ahead of time, never run, so labelled an estimate).

With --cost_model, the analytic MoE cost model of that preset (`costs`): per batch size B and γ, the experts
per layer a step and a verify call read under uniform routing, v_moe = verify bytes / step bytes, the step
time at the chip's HBM bandwidth, c (draft step / target step, by bytes, with the 0.6B draft), and the
speedup τ̂ / (γ·c + v_moe) against the dense formula's τ̂ / (γ·c + 1) for τ̂ at α = 0.6 and 0.8. Every figure
of this section is an estimate from shapes, not a measurement.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench import common
from distillspec_jax import costs
from distillspec_jax import evaluate as ev
from distillspec_jax.models import catalog, qwen3_moe


def layer_inputs(tokens: int, hidden: int, experts: int, width: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x_btd = jax.random.normal(keys[0], (1, tokens, hidden), jnp.float32).astype(dtype)
    router_de = (0.5 * jax.random.normal(keys[1], (hidden, experts), jnp.float32)).astype(dtype)
    gate_edf, up_edf = ((0.02 * jax.random.normal(k, (experts, hidden, width), jnp.float32)).astype(dtype)
                        for k in keys[2:4])
    down_efd = (0.02 * jax.random.normal(keys[4], (experts, width, hidden), jnp.float32)).astype(dtype)
    return x_btd, router_de, gate_edf, up_edf, down_efd


def moe_function(impl: str, active: int):
    experts = qwen3_moe.EXPERT_FUNCTIONS[impl]

    def mlp(x_btd, router_de, gate_edf, up_edf, down_efd):
        weights_bta, experts_bta = qwen3_moe.route(x_btd, router_de, active, True)
        return experts(x_btd, weights_bta, experts_bta, gate_edf, up_edf, down_efd)

    return mlp


def cost(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


def cost_model(preset: str, chip: str, context: int, gammas=range(1, 8), batches=(1, 8, 32)) -> dict:
    """The analytic MoE cost model of a preset in bfloat16 on one chip (estimates from shapes)."""
    target = catalog.preset(preset, param_dtype="bfloat16", dtype="bfloat16")
    draft = catalog.preset("Qwen3-0.6B", param_dtype="bfloat16", dtype="bfloat16")
    hw = costs.chip(chip)
    rows = []
    for batch in batches:
        step_bytes = costs.decode_step_bytes(target, batch, context)
        c = costs.decode_step_bytes(draft, batch, context) / step_bytes
        for gamma in gammas:
            v = costs.verify_cost_ratio(target, batch, gamma, context)
            row = {"batch": batch, "gamma": gamma, "experts_per_step": costs.expected_experts_read(target, batch),
                   "experts_per_verify": costs.expected_experts_read(target, batch * (gamma + 1)),
                   "step_bytes": step_bytes, "step_s_at_hbm_bandwidth": step_bytes / hw.hbm_bytes_per_s,
                   "c": c, "v_moe": v}
            for alpha in (0.6, 0.8):
                tau = ev.expected_block_efficiency(alpha, gamma)
                row[f"speedup_dense_formula_alpha{alpha}"] = ev.predicted_speedup(tau, gamma, c)
                row[f"speedup_moe_alpha{alpha}"] = ev.predicted_speedup(tau, gamma, c, v)
            rows.append(row)
    return {"label": "analytic estimate from the published shapes and the chip's HBM bandwidth (uniform routing), "
                     "not a measurement", "preset": preset, "chip": hw.name, "context": context, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="D (30B-A3B: 2048)")
    parser.add_argument("--experts", type=int, default=128, help="E")
    parser.add_argument("--active", type=int, default=8, help="A, experts per token")
    parser.add_argument("--width", type=int, default=384, help="F of one expert (30B-A3B: 768)")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,256,1024", help="token counts M = B * T")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tpu", default="", help="a TPU topology (a slice name, e.g. v5p-8) for XLA's cost estimate")
    parser.add_argument("--cost_model", default="", help="a Qwen3-MoE preset for the analytic cost model section")
    parser.add_argument("--chip", default="v5p", help="with --cost_model: the chip whose HBM bandwidth is used")
    parser.add_argument("--context", type=int, default=384, help="with --cost_model: cached positions per row")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    tpu_device = None
    if args.tpu:
        from distillspec_jax import tpu_topology

        tpu_device = tpu_topology.topology_devices(args.tpu)[0]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",") if t):
        inputs = layer_inputs(tokens, args.hidden, args.experts, args.width, dtype)
        row: dict = {"tokens": tokens}
        outputs = {}
        for impl in ("ragged", "dense"):
            fn = jax.jit(moe_function(impl, args.active))
            compiled = fn.lower(*inputs).compile()
            _, seconds, outputs[impl] = common.first_and_median(lambda: jax.block_until_ready(compiled(*inputs)),
                                                                args.runs)
            row[impl] = {"seconds": seconds, "cpu_cost": cost(compiled)}
            if tpu_device is not None:
                shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(tpu_device)) for x in inputs]
                row[impl]["tpu_cost_estimate"] = cost(jax.jit(moe_function(impl, args.active)).lower(*shapes).compile())
        row["max_abs_difference"] = float(jnp.max(jnp.abs(outputs["ragged"].astype(jnp.float32)
                                                          - outputs["dense"].astype(jnp.float32))))
        row["faster"] = min(("ragged", "dense"), key=lambda impl: row[impl]["seconds"])
        rows.append(row)
    common.print_json({"benchmark": "moe", "machine": common.machine_info(), "tpu": args.tpu or None, "rows": rows,
                       "shape": {k: getattr(args, k) for k in ("hidden", "experts", "active", "width", "dtype")},
                       "cost_model": cost_model(args.cost_model, args.chip, args.context) if args.cost_model else None})


if __name__ == "__main__":
    main()
