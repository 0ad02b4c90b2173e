"""Stages `eval_before` and `eval_after`: the γ sweep of (target, draft) at every evaluation temperature,
with the undistilled draft and then the distilled one.

Owns config.eval. Writes `eval_before.json` and `eval_after.json`: one row per (temperature, γ). With an MoE
target, each also writes `expert_union.json` (the experts a step and a verify call read, per γ and batch size;
see `expert_union`; the same table both times, since it depends on the target alone), and every row with a
measured c gets the MoE prediction of the speedup beside the dense and measured-v ones. With eval.lenience,
each first writes `frontier_before.json` / `frontier_after.json`: the lossy quality–latency frontier at every
temperature > 0 (`evaluate.lenience_frontier`: one row per γ, form and ε, and the lossless run per γ).
"""

from __future__ import annotations

import jax
import numpy as np
from ml_collections import ConfigDict

from distillspec_jax import evaluate as ev
from distillspec_jax import expert_union
from distillspec_jax import generate as gen
from distillspec_jax import lenience
from distillspec_jax import sharding as shd
from distillspec_jax import workdir as wd
from distillspec_jax.data import answers, pipeline
from distillspec_jax.models import catalog, qwen3, qwen3_moe
from distillspec_jax.progress import Progress
from distillspec_jax.sampling import Sampler
from distillspec_jax.stages.data import DATA_DIR, EVAL_REFERENCES, load_data
from distillspec_jax.stages.distill import distilled_draft
from distillspec_jax.stages.prepare import Models

OUTPUTS = {"eval_before": "eval_before.json", "eval_after": "eval_after.json"}
FRONTIERS = {"eval_before": "frontier_before.json", "eval_after": "frontier_after.json"}
EXPERT_UNION = "expert_union.json"


def eval_samplers(c: ConfigDict) -> list[Sampler]:
    return [Sampler(temperature=float(t), top_k=c.eval.top_k, top_p=c.eval.top_p) for t in c.eval.temperatures]


def eval_batches(c: ConfigDict, workdir: str, mesh) -> list[ev.PromptBatch]:
    """The held-out prompts as global [B, T] batches of one static prompt length."""
    items = load_data(workdir, "eval")[: c.eval.num_prompts]
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in items), c.data.pad_multiple)
    local = shd.host_slice(c.eval.batch_size)
    batches = []
    for i in range(0, len(items), c.eval.batch_size):
        padded = pipeline.pad_prompts([it.prompt for it in items[i : i + c.eval.batch_size]], prompt_len, 0)
        batches.append((shd.global_batch(padded["prompts"][local], mesh),
                        shd.global_batch(padded["prompt_lens"][local], mesh)))
    return batches


def speculative_sweep(c: ConfigDict, workdir: str, models: Models, draft: qwen3.Qwen3, mesh,
                      stage: str) -> list[dict]:
    """γ sweep of (target, draft) at every evaluation temperature: one row per (temperature, γ)."""
    batches = eval_batches(c, workdir, mesh)
    samplers = eval_samplers(c)
    progress = Progress(stage, len(samplers) * len(c.eval.gammas), unit="γ")
    rows = []
    gammas = [int(g) for g in c.eval.gammas]
    measure_time = c.eval.timing_repeats > 0
    # Step costs (c, verify) do not depend on the sampler: measured once for every temperature.
    costs = ev.step_costs(models.target, draft, batches, gammas, c.eval.max_new_tokens,
                          c.eval.timing_repeats, c.eval.timing_steps) if measure_time else None
    for i, sampler in enumerate(samplers):
        rng = jax.random.fold_in(jax.random.key(c.seed), 100 + i)
        sweep = ev.gamma_sweep(models.target, draft, batches, gammas, c.eval.max_new_tokens,
                               sampler, rng, eos_ids=models.eos_ids, runs=c.eval.timing_repeats,
                               measure_time=measure_time, analytic=c.eval.analytic, costs=costs,
                               on_gamma=lambda g, t=sampler.temperature: progress.update(note=f"T={t} γ={g}"))
        rows += sweep
    progress.done()
    if catalog.is_moe(models.target.cfg):
        # Sampled text routes as a deployment's does; greedy text of a small model repeats itself.
        sampler = next((s for s in samplers if s.temperature > 0), samplers[0])
        table = expert_union_table(c, models, batches, sampler, jax.random.fold_in(jax.random.key(c.seed), 99))
        wd.write_json(wd.path(workdir, EXPERT_UNION), table)
        rows = [with_moe_prediction(row, table, int(np.shape(batches[0][0])[0])) for row in rows]
    return rows


def expert_union_table(c: ConfigDict, models: Models, batches: list[ev.PromptBatch], sampler: Sampler,
                       rng: jax.Array) -> list[dict]:
    """The expert-union counts on the target's own continuations of the first evaluation batch, for every γ
    of the sweep and batch sizes 1, 2, 4, ... up to the batch's."""
    prompts, lens = batches[0]
    out = gen.generate(models.target, prompts, lens, c.eval.max_new_tokens, sampler, rng, eos_ids=models.eos_ids,
                       return_sequences=True)
    experts_lbsa = shd.to_host(jax.jit(qwen3_moe.routed_experts)(models.target, out.sequences))
    rows = int(np.shape(prompts)[0])
    sizes = [2**i for i in range(rows.bit_length()) if 2**i <= rows]
    context = np.shape(prompts)[1] + c.eval.max_new_tokens / 2  # the mean cached length during decoding
    return expert_union.union_table(models.target.cfg, experts_lbsa, shd.to_host(lens), shd.to_host(out.lengths),
                                    [int(g) for g in c.eval.gammas], sizes, context)


def with_moe_prediction(row: dict, table: list[dict], batch: int) -> dict:
    """The sweep row with v_moe at its γ and the evaluation's batch size, and, where c was measured, the MoE
    prediction of the speedup τ / (γ·c + v_moe)."""
    size = max(r["batch"] for r in table if r["batch"] <= batch)
    entry = next(r for r in table if r["gamma"] == row["gamma"] and r["batch"] == size)
    if "verify_cost_ratio_moe" not in entry:
        return row
    row = {**row, "verify_cost_ratio_moe": entry["verify_cost_ratio_moe"]}
    if "cost_ratio" in row:
        row["predicted_speedup_moe"] = ev.predicted_speedup(row["block_efficiency"], row["gamma"], row["cost_ratio"],
                                                            entry["verify_cost_ratio_moe"])
    return row


def frontier(c: ConfigDict, workdir: str, models: Models, draft: qwen3.Qwen3, mesh, stage: str,
             sweep: list[dict]) -> list[dict]:
    """The lossy frontier at every evaluation temperature > 0, with the γ sweep's rows (`sweep`) as the source
    of the target-only time and the step costs; [] when eval.lenience is off."""
    forms = lenience.parse_forms(c.eval.lenience)
    samplers = [(i, s) for i, s in enumerate(eval_samplers(c)) if not s.greedy]
    if not forms or not samplers:
        return []
    batches = eval_batches(c, workdir, mesh)
    gammas = [int(g) for g in c.eval.gammas]
    progress = Progress(stage, len(samplers) * len(gammas) * (1 + len(forms) * len(c.eval.epsilons)), unit="run")
    score = answer_scorer(c, workdir, models)
    rows = []
    for i, sampler in samplers:
        rows += ev.lenience_frontier(
            models.target, draft, batches, gammas, c.eval.max_new_tokens, sampler,
            jax.random.fold_in(jax.random.key(c.seed), 100 + i),  # the γ sweep's key: the same continuations for α̂
            forms=forms, epsilons=[float(e) for e in c.eval.epsilons], eos_ids=models.eos_ids,
            runs=c.eval.timing_repeats, measure_time=c.eval.timing_repeats > 0,
            reference=[r for r in sweep if r["temperature"] == sampler.temperature], score=score,
            on_point=lambda g, form, eps, t=sampler.temperature: progress.update(note=f"T={t} γ={g} {form} ε={eps:g}"))
    progress.done()
    return rows


def answer_scorer(c: ConfigDict, workdir: str, models: Models):
    """score(batch_index, tokens_br, lengths_b) -> [correct per row] for a task with checkable answers (HumanEval
    only with eval.execute_code), from the data stage's references; None otherwise."""
    check = answers.check_for(c.data.task, c.eval.execute_code)
    references = wd.read_json(wd.path(workdir, DATA_DIR, EVAL_REFERENCES)) if check else None
    if references is None:
        return None
    eos = set(models.eos_ids)

    def score(batch_index: int, tokens_br, lengths_b) -> list[bool]:
        tokens, lengths = shd.to_host(tokens_br), shd.to_host(lengths_b)
        start = batch_index * c.eval.batch_size
        texts = [models.tokenizer.decode([int(t) for t in row[:n] if int(t) not in eos]) for row, n in zip(tokens, lengths)]
        return check.correct(texts, references[start : start + len(texts)])

    return score


def _evaluate(state, draft: qwen3.Qwen3, stage: str) -> None:
    c = state.config
    rows = speculative_sweep(c, state.workdir, state.models, draft, state.mesh, stage)
    lossy = frontier(c, state.workdir, state.models, draft, state.mesh, f"{stage}: lossy frontier", rows)
    if lossy:
        wd.write_json(wd.path(state.workdir, FRONTIERS[stage]), lossy)
    wd.write_json(wd.path(state.workdir, OUTPUTS[stage]), rows)  # last: it marks the stage done


def run_before(state) -> None:
    _evaluate(state, state.models.draft, "eval_before")


def run_after(state) -> None:
    _evaluate(state, distilled_draft(state.config, state.workdir, state.mesh), "eval_after")
