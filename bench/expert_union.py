"""Distinct experts per layer that a decode step and a verify call read, against γ and the batch size, for the
MoE target of a finished run and for a randomly initialised model of the same shape (random routing), on the
run's evaluation prompts. The run is a `:tiny` one with an MoE target, e.g.

    python main.py --config=configs/jsd.py:tiny --config.tiny.target_experts=8 --workdir=/tmp/tiny_moe
    python -m bench.expert_union --workdir=/tmp/tiny_moe

Each table row (see `expert_union.union_table`): γ, batch B, the measured experts per layer of a step (B
tokens) and of a verify call (B·(γ + 1) tokens; per row and per batch), the uniform-routing estimate, and
v_moe = verify bytes / step bytes.
"""

from __future__ import annotations

import argparse
import json

import jax
from ml_collections import ConfigDict

from bench import common
from distillspec_jax import generate as gen
from distillspec_jax import sharding as shd
from distillspec_jax.expert_union import union_table
from distillspec_jax.models import catalog, convert, qwen3, qwen3_moe
from distillspec_jax.sampling import Sampler
from distillspec_jax.stages import evaluation
from distillspec_jax.stages.prepare import tiny_models


def table(model: qwen3.Qwen3, batch, sampler: Sampler, new_tokens: int, gammas, seed: int) -> list[dict]:
    prompts, lens = batch
    out = gen.generate(model, prompts, lens, new_tokens, sampler, jax.random.key(seed), return_sequences=True)
    experts_lbsa = shd.to_host(jax.jit(qwen3_moe.routed_experts)(model, out.sequences))
    rows = prompts.shape[0]
    sizes = [2**i for i in range(rows.bit_length()) if 2**i <= rows]
    return union_table(model.cfg, experts_lbsa, shd.to_host(lens), shd.to_host(out.lengths), gammas, sizes,
                       prompts.shape[1] + new_tokens / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished run whose target is Qwen3-MoE")
    parser.add_argument("--gammas", default="1,2,3,4,5,6,7")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    with open(f"{args.workdir}/config.json") as f:
        c = ConfigDict(json.load(f))
    mesh = shd.single_device_mesh()
    if c.target.model != "tiny":
        raise SystemExit(f"{args.workdir}: not a :tiny run; this benchmark reads the tiny MoE target it built")
    trained = convert.load_orbax(tiny_models(c, args.workdir).target, mesh)
    if not catalog.is_moe(trained.cfg):
        raise SystemExit(f"{args.workdir}: the target is dense; run with an MoE target (tiny.target_experts > 0)")
    batch = evaluation.eval_batches(c, args.workdir, mesh)[0]
    gammas = [int(g) for g in args.gammas.split(",")]
    sampler = Sampler(temperature=args.temperature)
    common.print_json({
        "benchmark": "expert_union", "machine": common.machine_info(), "workdir": args.workdir, "temperature": args.temperature,
        "model": {"num_experts": trained.cfg.num_experts, "num_experts_per_tok": trained.cfg.num_experts_per_tok,
                  "layers": list(trained.cfg.mlp_kinds())},
        "trained": table(trained, batch, sampler, c.eval.max_new_tokens, gammas, c.seed),
        "random_routing": table(qwen3.init_model(trained.cfg, seed=c.seed + 7), batch, sampler,
                                c.eval.max_new_tokens, gammas, c.seed),
    })


if __name__ == "__main__":
    main()
