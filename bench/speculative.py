"""Speculative decoding costs for γ = 1..8: the verify call against a decode step, c, the loop's overhead over
γ·t_draft + t_verify, and measured against predicted speedup, on draft/target pairs with known acceptance.

    python -m bench.speculative                                          # CPU: 'small' target
    python -m bench.speculative --model=1.7b --draft_model=0.6b --dtype=bfloat16   # GPU

Drafts (--drafts), all with the target's vocabulary:
  copy       the target itself: every greedy proposal is accepted (τ = γ + 1), the upper bound; c ≈ 1.
  truncated  the target's first --truncated_layers layers with its embedding, final norm and head: a cheaper
             draft (c < 1) that agrees with the target part of the time (α is measured).
  random     an independent random model of shape --draft_model with an untied head, so its argmax is
             unrelated to the target's: the lower bound (τ ≈ 1). (With tied heads and random weights, very
             small models repeat their input token greedily, and then any two of them agree.)

Everything uses the evaluation's own helpers (`distillspec_jax.evaluate`): `decode_step_seconds` for one
decode step and the (γ + 1)-token verify call (tokens_per_step), `target_decode_seconds` for the
target-only baseline, `measure_speculative` for τ, α, the wall time and the measured and predicted speedups.
Per γ this script adds:
  blocks               loop iterations of the batched run (stats.batch_blocks).
  block_s              speculative wall time / blocks (the prefill of both models included).
  block_decode_s       (speculative wall time − prefill of both models) / blocks.
  ideal_block_s        γ·t_draft + t_verify(γ).
  loop_overhead        block_decode_s / ideal_block_s − 1 (the prefill-inclusive one is also given).
  loop_overhead_beyond_pair_step   the same against ideal + (t_draft(2 tokens) − t_draft): every block's first
                       draft step feeds two tokens by design, so this is the overhead the loop adds beyond it.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from bench import common
from distillspec_jax import decoding
from distillspec_jax import evaluate as ev
from distillspec_jax import speculative
from distillspec_jax.evaluate import median_seconds
from distillspec_jax.models import qwen3
from distillspec_jax.sampling import Sampler

GREEDY = Sampler(temperature=0.0)
DRAFT_KINDS = ("copy", "truncated", "random")


def truncated_draft(target: qwen3.Qwen3, layers: int) -> qwen3.Qwen3:
    """The target's first `layers` layers under its own embedding, final norm and LM head."""
    if not 1 <= layers < target.cfg.num_hidden_layers:
        raise ValueError(f"--truncated_layers must be in [1, {target.cfg.num_hidden_layers - 1}], got {layers}")
    draft = qwen3.init_model(target.cfg.replace(num_hidden_layers=layers))
    target_params = nnx.to_pure_dict(nnx.state(target, nnx.Param))
    params = dict(target_params, layers=jax.tree.map(lambda x: x[:layers], target_params["layers"]))
    state = nnx.state(draft, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(draft, state)
    return draft


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("cache_len",))
def _prefill(graphdef, state, prompts_bt, prompt_lens_b, *, cache_len: int):
    return decoding.prefill(nnx.merge(graphdef, state), prompts_bt, prompt_lens_b, cache_len)


def prefill_seconds(model: qwen3.Qwen3, prompts: np.ndarray, lens: np.ndarray, cache_len: int, runs: int) -> float:
    """Median time of the prefill the speculative loop runs for this model before its first block."""
    graphdef, state = nnx.split(model)
    seconds, _ = median_seconds(lambda: _prefill(graphdef, state, prompts, lens, cache_len=cache_len), runs=runs)
    return seconds


def sweep(target: qwen3.Qwen3, draft: qwen3.Qwen3, prompts: np.ndarray, lens: np.ndarray, gammas: list[int],
          new_tokens: int, runs: int, target_time_s: float, target_step_s: float, verify_s: dict[int, float],
          step_cache_len: int) -> dict[str, Any]:
    """One draft: its step cost c, prefill, and per γ the measured statistics, times and overheads."""
    batch, prompt_len = prompts.shape
    rng = jax.random.key(0)
    draft_step_s = ev.decode_step_seconds(draft, batch, step_cache_len, runs)
    # Each block's first draft step feeds two tokens, [prev, last] (see speculative.py): its extra cost over a
    # one-token step is part of the measured block but not of the ideal γ·t_draft + t_verify.
    draft_pair_step_s = ev.decode_step_seconds(draft, batch, step_cache_len, runs, tokens_per_step=2)
    c = draft_step_s / target_step_s
    # Both models prefill into a cache of the largest γ's length (the length barely changes the prefill cost).
    cache_len = decoding.required_cache_len(prompt_len, new_tokens, max(gammas))
    prefill_s = prefill_seconds(target, prompts, lens, cache_len, runs) + prefill_seconds(draft, prompts, lens,
                                                                                         cache_len, runs)
    rows = []
    for g in gammas:
        common.log(f"  gamma={g}")
        compiled = speculative.compiled_cache_size()
        start = time.perf_counter()
        jax.block_until_ready(speculative.speculative_generate(target, draft, prompts, lens, g, new_tokens, GREEDY, rng,
                                                        eos_ids=()))
        first_call_s = time.perf_counter() - start
        entry = ev.measure_speculative(target, draft, prompts, lens, g, new_tokens, GREEDY, rng, eos_ids=(),
                                       runs=runs, target_time_s=target_time_s, cost=c,
                                       verify_ratio=verify_s[g] / target_step_s)
        recompiles = speculative.compiled_cache_size() - compiled - 1  # the first call compiles once, nothing after
        # Σ batch_blocks over rows = rows · blocks (every row of a batch counts every iteration).
        blocks = round(entry["emitted_tokens"] / (entry["batch_block_efficiency"] * entry["rows"]))
        wall = entry["speculative_time_s"]
        ideal = g * draft_step_s + verify_s[g]
        ideal_with_pair = ideal + draft_pair_step_s - draft_step_s
        block_s, block_decode_s = wall / blocks, (wall - prefill_s) / blocks
        entry.pop("per_position_acceptance")
        entry.update(
            blocks=blocks, first_call_s=first_call_s, recompiles_after_first_call=recompiles,
            block_s=block_s, block_decode_s=block_decode_s, ideal_block_s=ideal,
            loop_overhead=block_decode_s / ideal - 1, loop_overhead_incl_prefill=block_s / ideal - 1,
            ideal_block_with_pair_step_s=ideal_with_pair,
            loop_overhead_beyond_pair_step=block_decode_s / ideal_with_pair - 1,
            speedup_measured_over_predicted=common.ratio(entry.get("measured_speedup"),
                                                         entry.get("predicted_speedup_with_verify_cost")),
        )
        rows.append(entry)
    return {"shape": common.describe(draft.cfg), "draft_step_s": draft_step_s, "draft_pair_step_s": draft_pair_step_s,
            "cost_ratio": c,
            "prefill_both_s": prefill_s, "gammas": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--drafts", default=",".join(DRAFT_KINDS), help=f"comma-separated drafts from {DRAFT_KINDS}")
    parser.add_argument("--draft_model", default="small-draft", choices=common.MODEL_CHOICES,
                        help="shape of the 'random' draft (the target's vocabulary is kept)")
    parser.add_argument("--truncated_layers", type=int, default=1, help="layers of the 'truncated' draft")
    parser.add_argument("--gammas", type=common.int_list, default=list(range(1, 9)), help="comma-separated γ values")
    parser.add_argument("--batch", type=int, default=1, help="rows B decoded together")
    parser.add_argument("--prompt_len", type=int, default=128, help="prompt tokens T per row")
    parser.add_argument("--new_tokens", type=int, default=256, help="new tokens N per row")
    args = parser.parse_args(argv)
    drafts = args.drafts.split(",")
    for kind in drafts:
        if kind not in DRAFT_KINDS:
            parser.error(f"--drafts: unknown draft {kind!r}; choose from {DRAFT_KINDS}")

    cfg = common.config_from_flags(args)
    common.log(f"target {args.model} ({cfg.num_params() / 1e6:.1f}M parameters, {args.dtype})")
    target = common.build_model(cfg, args.seed)
    prompts, lens = common.random_prompts(args.batch, args.prompt_len, cfg, args.seed)
    step_cache_len = args.prompt_len + args.new_tokens  # as evaluate.gamma_sweep: a step at the longest context

    common.log("target-only baseline, decode step and verify calls")
    baseline = ev.target_decode_seconds(target, prompts, lens, args.new_tokens, GREEDY, jax.random.key(0),
                                        eos_ids=(), runs=args.runs)
    target_step_s = ev.decode_step_seconds(target, args.batch, step_cache_len, args.runs)
    verify_s = {g: ev.decode_step_seconds(target, args.batch, step_cache_len, args.runs, tokens_per_step=g + 1)
                for g in args.gammas}

    results = {}
    for kind in drafts:
        common.log(f"draft {kind}")
        if kind == "copy":
            draft = target
        elif kind == "truncated":
            draft = truncated_draft(target, args.truncated_layers)
        else:
            draft_cfg = common.model_config(args.draft_model, args.dtype, vocab_size=cfg.vocab_size).replace(
                num_real_tokens=cfg.num_real_tokens, tie_word_embeddings=False)
            draft = common.build_model(draft_cfg, args.seed + 1)
        results[kind] = sweep(target, draft, prompts, lens, args.gammas, args.new_tokens, args.runs,
                              baseline["target_time_s"], target_step_s, verify_s, step_cache_len)

    return {
        "benchmark": "speculative",
        "machine": common.machine_info(),
        "model": args.model, "shape": common.describe(cfg),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "sampler": "greedy", "eos": "none", "runs": args.runs,
        "timing": "median of runs after a compiling call; block_until_ready (evaluate.median_seconds)",
        "step_cache_len": step_cache_len,
        "target_time_s": baseline["target_time_s"],
        "target_step_s": target_step_s,
        "verify": [{"gamma": g, "tokens": g + 1, "verify_s": verify_s[g],
                    "verify_over_step": verify_s[g] / target_step_s} for g in args.gammas],
        "drafts": results,
    }


if __name__ == "__main__":
    common.print_json(main())
