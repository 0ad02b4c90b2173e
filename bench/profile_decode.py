"""Where a decode step's time goes: a `jax.profiler` trace of one `generate` call, its per-op device times
grouped by what the op does, per decode step.

    python -m bench.profile_decode --batch=8                  # CPU: the 'small' shape
    python -m bench.profile_decode --model=1.7b --dtype=bfloat16 --batch=1   # GPU

Ops are named by the compiled HLO (fusions keep the op_name of the jaxpr equation they came from), so the
groups are: the LM head (the matmul whose output has V columns), the other matmuls, KV-cache writes and any
relayout of the cache (ops from the per-row scatter), and the rest. Only ops that run at least once per step
count; the prefill's ops run once and are left out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from distillspec_jax import decoding
from distillspec_jax import generate as gen
from distillspec_jax.sampling import Sampler

GROUPS = ("lm_head", "matmuls", "kv_cache_write_and_relayout", "other")


def hlo_ops(compiled_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (result shape, the jaxpr op_name it came from)."""
    ops = {}
    for line in compiled_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            op_name = re.search(r"op_name=\"([^\"]*)\"", line)
            ops[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return ops


def group_of(name: str, shape: str, op_name: str, vocab: int) -> str:
    if "dot_general" in op_name or name.startswith(("dot", "ynn_fusion", "cublas", "gemm")):
        return "lm_head" if re.search(rf"[\[,]{vocab}\]", shape) else "matmuls"
    if "scatter" in op_name or "dynamic_update_slice" in op_name:
        return "kv_cache_write_and_relayout"
    return "other"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=1, help="rows B")
    parser.add_argument("--prompt_len", type=int, default=128, help="prompt tokens T")
    parser.add_argument("--new_tokens", type=int, default=64, help="new tokens N (decode steps traced)")
    parser.add_argument("--top", type=int, default=12, help="most expensive ops listed")
    args = parser.parse_args(argv)

    cfg = common.config_from_flags(args)
    model = common.build_model(cfg, args.seed)
    prompts, lens = common.random_prompts(args.batch, args.prompt_len, cfg, args.seed)
    n = args.new_tokens
    cache_len = decoding.required_cache_len(args.prompt_len, n)

    def call():
        return jax.block_until_ready(gen.generate(model, prompts, lens, n, eos_ids=(), cache_len=cache_len))

    call()
    graphdef, state = nnx.split(model)
    compiled = gen._generate_jit.lower(  # the same executable generate runs (same static arguments)
        graphdef, state, jnp.asarray(prompts), jnp.asarray(lens), jax.random.key(0), max_new_tokens=n,
        sampler=Sampler(temperature=0.0), eos_ids=(), pad_id=decoding.DEFAULT_PAD_ID, cache_len=cache_len,
        return_sequences=False).compile()
    ops = hlo_ops(compiled.as_text())
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            call()
        trace_file = glob.glob(f"{folder}/**/*.json.gz", recursive=True)[0]
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]

    micros, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            micros[e["name"]] += e.get("dur", 0)
            counts[e["name"]] += 1
    groups = collections.Counter()
    top = []
    for name, us in micros.most_common():
        if counts[name] < n - 1:  # prefill-only ops
            continue
        shape, op_name = ops[name]
        group = group_of(name, shape, op_name, cfg.vocab_size)
        groups[group] += us
        if len(top) < args.top:
            top.append({"op": name, "shape": shape, "from": op_name.split("/")[-1], "group": group,
                        "ms_per_step": us / 1e3 / n, "calls_per_step": counts[name] / n})
    total = sum(groups.values())
    return {
        "benchmark": "profile_decode",
        "machine": common.machine_info(),
        "model": args.model, "shape": common.describe(cfg),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": n, "cache_len": cache_len,
        "op_ms_per_step": total / 1e3 / n,
        "groups_ms_per_step": {g: groups[g] / 1e3 / n for g in GROUPS},
        "groups_fraction": {g: groups[g] / total for g in GROUPS} if total else {},
        "top_ops": top,
    }


if __name__ == "__main__":
    common.print_json(main())
