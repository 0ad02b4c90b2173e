"""One DistillSpec experiment, stage by stage (design §7): what `main.py` runs.

    prepare      convert the HF checkpoints to Orbax once (or build the `:tiny` models), load them on the mesh
    data         load and tokenise the prompts; sample target responses when the generator needs them
    eval_before  γ sweep of the undistilled draft at every evaluation temperature
    distill      train the draft (resumable); save it as Orbax and as HF safetensors
    eval_after   the same sweep with the distilled draft
    report       results.json, plots, and a printed table

Each stage leaves a file in the workdir; a rerun skips stages whose file exists and resumes training
from its last checkpoint, so an interrupted run (crash, SIGTERM) continues where it stopped. Everything
the config can get wrong is checked by `validate` before any model is loaded or anything compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from distillspec_jax import evaluate as ev
from distillspec_jax import checks, files, lease, model_sources, tracking
from distillspec_jax import sharding as shd
from distillspec_jax import train
from distillspec_jax import workdir as wd
from distillspec_jax.data import generators, pipeline, tasks
from distillspec_jax.errors import Preempted
from distillspec_jax.models import convert, qwen3
from distillspec_jax.progress import Progress
from distillspec_jax.sampling import Sampler

STAGES = checks.STAGES
TINY = checks.TINY  # model source / tokenizer name of the embedded offline default
OFFLINE_QWEN3_TOKENIZER = "qwen3_offline"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end a chat turn / a document; both end a generated response
DATA_DIR, MODELS_DIR, DISTILLED_DIR, REFERENCE_DIR = "data", "models", "distilled", "reference"
XLA_CACHE_DIR = "xla_cache"  # JAX's persistent compilation cache, beside the cached models
STAGE_FILES = {"data": f"{DATA_DIR}/train.json", "eval_before": "eval_before.json",
               "distill": f"{DISTILLED_DIR}/summary.json", "eval_after": "eval_after.json", "report": "results.json"}
RESULTS_SCHEMA = 1
# Every name a run writes at the top of its workdir: overwrite=True deletes these (but the model cache and
# the marker) and nothing else, and a folder holding other names is not taken for a workdir (workdir.py).
OWNED = (wd.MARKER_FILE, lease.LOCK_FILE, wd.CONFIG_FILE, tracking.METRICS_FILE, tracking.WANDB_ID_FILE, "wandb",
         train.CHECKPOINT_DIR, DATA_DIR, MODELS_DIR, DISTILLED_DIR, REFERENCE_DIR, "plots", "logs",
         *(f for f in STAGE_FILES.values() if "/" not in f))


# ----------------------------------------------------------------------------------------------
# Validation (no model, no compile)
# ----------------------------------------------------------------------------------------------


parse_stages = checks.parse_stages


def train_config(c: ConfigDict) -> train.TrainConfig:
    """The distillation loop's settings from config.distill (validated by TrainConfig)."""
    d = c.distill
    return train.TrainConfig(
        divergence=d.divergence, jsd_beta=d.jsd_beta, temperature=d.temperature,
        adaspec_fraction=d.adaspec_fraction or None, loss_chunk=d.loss_chunk, learning_rate=d.learning_rate,
        warmup_steps=d.warmup_steps, total_steps=d.steps, end_lr_fraction=d.end_lr_fraction,
        weight_decay=d.weight_decay, b1=d.b1, b2=d.b2, grad_clip_norm=d.grad_clip_norm,
        grad_accum_steps=d.grad_accum_steps, checkpoint_every=d.checkpoint_every, keep_checkpoints=d.keep_checkpoints,
        log_every=d.log_every, remat=d.remat, seed=c.seed)


def eval_samplers(c: ConfigDict) -> list[Sampler]:
    return [Sampler(temperature=float(t), top_k=c.eval.top_k, top_p=c.eval.top_p) for t in c.eval.temperatures]


def generator_spec(c: ConfigDict, eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> generators.GeneratorSpec:
    g = c.generator
    return generators.GeneratorSpec(
        kind=g.kind, sampler=Sampler(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p),
        max_new_tokens=g.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, mix_lambda=g.mix_lambda,
        mix_other=g.mix_other, regenerate_every=g.regenerate_every)


def validate(c: ConfigDict) -> tuple[str, ...]:
    """Checks every setting that can be checked without models; returns the stages to run."""
    checks.check_fields(c)  # every field, in one message form
    # The objects built from the config check themselves too: a backstop for whatever the above misses.
    train_config(c), generator_spec(c), eval_samplers(c)
    positions = checks.known_max_positions(c)  # hub ids: checked in prepare, once converted
    if positions is not None:
        checks.check_positions(c, *positions)
    return parse_stages(c.stages)


def check_memory(c: ConfigDict, devices: Sequence[Any]) -> None:
    """Refuses a run whose weights, optimizer state and gradients do not fit its chips' memory on its mesh,
    naming a mesh that fits (aot.check_fits: shapes only, no weights, no compile). Host RAM is no chip
    memory: on CPU devices, and for the offline tiny models, there is nothing to check."""
    from distillspec_jax import aot

    if c.target.model != TINY:  # check_fits itself passes over CPUs and shapes unknown offline
        aot.check_fits(c, devices)


def check_mesh(c: ConfigDict, mesh) -> None:
    """Batch sizes against the mesh, before anything compiles."""
    accum = c.distill.grad_accum_steps
    if c.distill.batch_size % accum:
        raise ValueError(f"config.distill.batch_size={c.distill.batch_size} does not split into "
                         f"grad_accum_steps={accum} micro-batches")
    shd.check_batch_divides(c.distill.batch_size // accum, mesh, "config.distill.batch_size (per micro-batch)")
    shd.check_batch_divides(c.eval.batch_size, mesh, "config.eval.batch_size")
    shd.host_slice(c.distill.batch_size), shd.host_slice(c.eval.batch_size)


# ----------------------------------------------------------------------------------------------
# prepare: models and tokenizer
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    target: qwen3.Qwen3
    draft: qwen3.Qwen3  # the initial (undistilled) draft
    tokenizer: Any
    draft_dir: str  # the draft's Orbax folder (reloaded for a fresh copy, e.g. AdaSPEC's reference)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in EOS_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)


def _cache_name(source: str, param_dtype: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", source.strip("/")) + f"-{param_dtype}"


def _converted(source: str, param_dtype: str, cache: wd.epath.Path, mesh) -> str:
    """Orbax folder of a HF checkpoint (with its tokenizer files), converted on first use and again
    whenever its source changed (model_sources: hub revision, or the local folder's fingerprint)."""
    return model_sources.converted(source, param_dtype, cache / _cache_name(source, param_dtype), mesh)


def _load_tokenizer(c: ConfigDict, target_dir: str, tiny_tokenizer: str | None):
    from distillspec_jax import tokenizer as tok

    if c.tokenizer == TINY or (not c.tokenizer and tiny_tokenizer):
        return tok.load_tokenizer(tiny_tokenizer)
    if c.tokenizer == OFFLINE_QWEN3_TOKENIZER:
        return tok.offline_qwen3_tokenizer()
    if c.tokenizer:
        return tok.load_tokenizer(c.tokenizer)
    local = os.path.join(target_dir, convert.TOKENIZER_DIR)
    return tok.load_tokenizer(local if os.path.isdir(local) else c.target.model)


def model_cache(c: ConfigDict, workdir: str) -> wd.epath.Path:
    """Where converted (or built) models are cached: config.tiny.cache_dir, else <workdir>/models; the
    tiny models of a gs:// workdir are built with local files, so they go to the local cache root."""
    if c.tiny.cache_dir:
        return wd.path(c.tiny.cache_dir)
    if c.target.model == TINY and files.is_remote(workdir):
        from distillspec_jax import tokenizer as tok

        return wd.path(str(tok.cache_root() / "tiny"))
    return wd.path(workdir, MODELS_DIR)


def enable_compilation_cache(c: ConfigDict, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache, so a rerun (or another run sharing the model cache)
    loads compiled decode loops and train steps instead of compiling them again."""
    if not c.compilation_cache:
        return None
    folder = str(model_cache(c, workdir) / XLA_CACHE_DIR) if c.compilation_cache == "auto" else c.compilation_cache
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def prepare(c: ConfigDict, workdir: str, mesh) -> Models:
    """Converts (once) and loads both models on the mesh; checks they share a vocabulary before loading."""
    cache = model_cache(c, workdir)
    tiny_tokenizer = None
    if c.target.model == TINY:
        from distillspec_jax import tiny

        build_cfg = {k: v for k, v in c.tiny.to_dict().items() if k not in ("cache_dir", "model_seed")}
        built = tiny.build(build_cfg, c.seed if c.tiny.model_seed < 0 else c.tiny.model_seed, str(cache))
        target_dir, draft_dir, tiny_tokenizer = str(built.target), str(built.draft), str(built.tokenizer)
    else:
        target_dir = _converted(c.target.model, c.target.param_dtype, cache, mesh)
        draft_dir = _converted(c.draft.model, c.draft.param_dtype, cache, mesh)
    target_cfg, draft_cfg = (json.loads(wd.path(d, convert.ORBAX_CONFIG).read_text()) for d in (target_dir, draft_dir))
    positions = [cfg.get("max_position_embeddings", qwen3.Qwen3Config.max_position_embeddings)
                 for cfg in (target_cfg, draft_cfg)]
    checks.check_positions(c, min(positions), f"target {positions[0]}, draft {positions[1]}")  # before loading
    checks.check_same_vocabulary(draft_cfg, target_cfg, "target", "DistillSpec")  # before loading
    target = convert.load_orbax(target_dir, mesh, dtype=c.target.dtype, param_dtype=c.target.param_dtype)
    draft = load_draft(c, draft_dir, mesh)
    tokenizer = _load_tokenizer(c, target_dir, tiny_tokenizer)
    if len(tokenizer) > target.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {target.cfg.vocab_size} "
                         "rows; config.tokenizer does not belong to these models")
    print(f"[prepare] target {describe_model(target.cfg)}, draft {describe_model(draft.cfg)}, vocab "
          f"{target.cfg.vocab_size}", flush=True)
    return Models(target, draft, tokenizer, draft_dir)


def describe_model(cfg: qwen3.Qwen3Config) -> str:
    """'596.05M params (float32 parameters, bfloat16 compute)': both dtypes, since a draft's float32 master
    weights and its bfloat16 arithmetic differ."""
    return f"{cfg.num_params() / 1e6:.2f}M params ({cfg.param_dtype} parameters, {cfg.dtype} compute)"


def load_draft(c: ConfigDict, directory: str, mesh) -> qwen3.Qwen3:
    return convert.load_orbax(directory, mesh, dtype=c.draft.dtype, param_dtype=c.draft.param_dtype)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _items_to_json(items: Sequence[pipeline.Tokenized]) -> dict:
    return {"prompts": [it.prompt.tolist() for it in items],
            "responses": [None if it.response is None else it.response.tolist() for it in items]}


def _items_from_json(obj: dict) -> list[pipeline.Tokenized]:
    return [pipeline.Tokenized(np.asarray(p, np.int32), None if r is None else np.asarray(r, np.int32))
            for p, r in zip(obj["prompts"], obj["responses"])]


def build_data(c: ConfigDict, workdir: str, models: Models, mesh,
               examples: tuple[list[dict], list[dict]] | None = None) -> None:
    """Tokenised train and eval data, and target-generated responses when the generator needs them.
    `examples`: the (training, evaluation) rows of checks.load_examples, loaded and checked before the
    models (loaded here when not given)."""
    d = c.data
    task = tasks.get_task(d.task)
    examples, eval_examples = examples or checks.load_examples(c)
    kwargs = dict(max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len, chat=d.chat,
                  enable_thinking=d.enable_thinking)
    train_items = pipeline.tokenize(examples, task, models.tokenizer, **kwargs)
    eval_items = pipeline.tokenize(eval_examples, task, models.tokenizer, **kwargs)
    spec = generator_spec(c, models.eos_ids, models.pad_id)
    if (spec.kind == "fixed" or (spec.kind == "mix" and spec.mix_other == "fixed")) and \
            any(it.response is None for it in train_items):
        raise ValueError(f"generator {spec.kind!r} trains on the dataset's responses, but task {d.task!r} on this "
                         "source has none; use generator.kind=target or draft")
    if len(train_items) < c.distill.batch_size:
        raise ValueError(f"{len(train_items)} training examples cannot fill config.distill.batch_size="
                         f"{c.distill.batch_size}")
    print(f"[data] {len(train_items)} training and {len(eval_items)} evaluation prompts ({d.source}:{d.name or d.task})",
          flush=True)
    data_dir = wd.path(workdir, DATA_DIR)
    if spec.needs_target_responses:
        prompt_len = pipeline.round_up(max(len(it.prompt) for it in train_items), d.pad_multiple)
        responses = generators.generate_responses(
            models.target, [it.prompt for it in train_items], spec, c.distill.batch_size, prompt_len,
            jax.random.fold_in(jax.random.key(c.seed), 1), mesh, stage="data: target responses")
        wd.write_json(data_dir / "target_responses.json", [r.tolist() for r in responses])
    wd.write_json(data_dir / "eval.json", _items_to_json(eval_items))
    wd.write_json(data_dir / "train.json", _items_to_json(train_items))  # last: it marks the stage done


def load_data(workdir: str, which: str) -> list[pipeline.Tokenized]:
    obj = wd.read_json(wd.path(workdir, DATA_DIR, f"{which}.json"))
    if obj is None:
        raise FileNotFoundError(f"{wd.path(workdir, DATA_DIR)} has no {which}.json; run the data stage first "
                                "(--config.stages=data, or include it)")
    return _items_from_json(obj)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


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


def evaluate(c: ConfigDict, workdir: str, models: Models, draft: qwen3.Qwen3, mesh, stage: str) -> list[dict]:
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
    return rows


# ----------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------


def _batch_source(c: ConfigDict, workdir: str, models: Models, spec: generators.GeneratorSpec) -> train.BatchSource:
    items = load_data(workdir, "train")
    if spec.needs_target_responses:
        responses = wd.read_json(wd.path(workdir, DATA_DIR, "target_responses.json"))
        if responses is None:
            raise FileNotFoundError("the target-generated responses are missing; rerun the data stage")
        items = [pipeline.Tokenized(it.prompt, np.asarray(r, np.int32)) for it, r in zip(items, responses)]
    batcher = pipeline.Batcher(items, c.distill.batch_size, c.seed, models.pad_id, c.data.pad_multiple, c.data.bucket,
                               host_index=jax.process_index(), host_count=jax.process_count())
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in items), c.data.pad_multiple)
    return generators.make_source(spec, batcher, prompt_len, c.seed)


def distill(c: ConfigDict, workdir: str, models: Models, mesh) -> bool:
    """Trains the draft; returns False when stopped by SIGTERM (rerun to resume), True when done."""
    cfg = train_config(c)
    spec = generator_spec(c, models.eos_ids, models.pad_id)
    source = _batch_source(c, workdir, models, spec)
    run_name = c.tracking.run_name or os.path.basename(os.path.normpath(str(workdir)))
    tracking = dict(use_wandb=c.tracking.wandb, wandb_project=c.tracking.project, run_name=run_name,
                    tracking_options={"wandb_entity": c.tracking.entity, "wandb_tags": tuple(c.tracking.tags)})
    reference = None
    if cfg.adaspec_fraction is not None:
        # AdaSPEC's reference: the same initial draft distilled with FKL on the same data, then frozen.
        ref_cfg = dataclasses.replace(cfg, divergence="fkl", adaspec_fraction=None,
                                      total_steps=c.distill.adaspec_reference_steps or cfg.total_steps)
        ref_cfg = dataclasses.replace(ref_cfg, warmup_steps=min(ref_cfg.warmup_steps, ref_cfg.total_steps))
        ref_distiller = train.Distiller(ref_cfg, load_draft(c, models.draft_dir, mesh), models.target, mesh)
        print(f"[distill] AdaSPEC reference draft: FKL for {ref_cfg.total_steps} steps", flush=True)
        ref = train.run(ref_cfg, ref_distiller, source, wd.path(workdir, REFERENCE_DIR), stage="reference",
                        **{**tracking, "use_wandb": False})
        if ref.preempted:
            return False
        reference = ref_distiller.draft_model(ref.state.params)
    distiller = train.Distiller(cfg, models.draft, models.target if cfg.loss_spec().uses_target else None, mesh,
                                reference=reference)
    try:
        result = train.run(cfg, distiller, source, wd.path(workdir), stage="distill", wandb_config=c.to_dict(),
                           **tracking)
    except train.NonFiniteLossError as err:
        raise train.NonFiniteLossError(
            f"{err} To rerun with a lower learning rate on this workdir: --config.distill.learning_rate="
            f"{c.distill.learning_rate / 10:g} --config.resume_with_changes=distill.learning_rate") from None
    if result.preempted:
        return False
    distilled = distiller.draft_model(result.state.params)
    out = wd.path(workdir, DISTILLED_DIR)
    convert.save_orbax(distilled, out / "orbax")
    convert.export_hf(distilled, str(out / "hf"), tokenizer_from=_tokenizer_dir(models))
    wd.write_json(out / "summary.json", {"steps": result.step, "data_position": result.data_position,
                                         "last_metrics": result.last_metrics})
    return True


def _tokenizer_dir(models: Models):
    path = models.tokenizer.name_or_path
    return path if path and os.path.isdir(path) else None


def distilled_draft(c: ConfigDict, workdir: str, mesh) -> qwen3.Qwen3:
    directory = wd.path(workdir, DISTILLED_DIR, "orbax")
    if not directory.exists():
        raise FileNotFoundError(f"no distilled draft in {directory}; run the distill stage first")
    return convert.load_orbax(str(directory), mesh, dtype=c.draft.dtype, param_dtype=c.draft.param_dtype)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def tau_checks(before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Whether distillation raised τ: per temperature and γ, and over every γ >= 2 (the `:tiny` criterion)."""
    tau_before = {(r["temperature"], r["gamma"]): r["block_efficiency"] for r in before}
    improved = {}
    for r in after:
        key = (r["temperature"], r["gamma"])
        if key in tau_before:
            improved[key] = r["block_efficiency"] > tau_before[key]
    by_temperature: dict[str, dict[str, bool]] = {}
    for (temperature, gamma), up in sorted(improved.items()):
        by_temperature.setdefault(f"{temperature:g}", {})[str(gamma)] = up
    return {"tau_after_exceeds_before": by_temperature,
            "every_gamma_ge_2": bool(improved) and all(up for (_, g), up in improved.items() if g >= 2)}


def results(c: ConfigDict, workdir: str) -> dict[str, Any]:
    """results.json: the run's identity, both evaluations (one row per temperature and γ), training, checks."""
    before = wd.read_json(wd.path(workdir, STAGE_FILES["eval_before"])) or []
    after = wd.read_json(wd.path(workdir, STAGE_FILES["eval_after"])) or []
    return {
        "schema": RESULTS_SCHEMA,
        "run": {"name": os.path.basename(os.path.normpath(str(workdir))), "divergence": c.distill.divergence,
                "jsd_beta": c.distill.jsd_beta, "adaspec_fraction": c.distill.adaspec_fraction,
                "generator": c.generator.kind, "mix_lambda": c.generator.mix_lambda, "seed": c.seed,
                "target": c.target.model, "draft": c.draft.model, "task": c.data.task, "steps": c.distill.steps},
        "before": before,
        "after": after,
        "training": wd.read_json(wd.path(workdir, STAGE_FILES["distill"])) or {},
        "checks": tau_checks(before, after),
    }


def format_table(res: dict[str, Any]) -> str:
    """γ against τ before/after, α before/after, α̂ after, measured and predicted speedup after; per temperature."""
    before = {(r["temperature"], r["gamma"]): r for r in res["before"]}
    after = {(r["temperature"], r["gamma"]): r for r in res["after"]}
    keys = sorted(set(before) | set(after))
    fmt = lambda row, k, spec=".2f": "-" if row is None or k not in row else format(row[k], spec)  # noqa: E731
    lines = []
    for temperature in sorted({k[0] for k in keys}):
        lines += [f"temperature {temperature:g}",
                  " γ | τ before | τ after | α before | α after | τ̂ after | speedup measured | predicted",
                  "---|----------|---------|----------|---------|----------|------------------|----------"]
        for key in [k for k in keys if k[0] == temperature]:
            b, a = before.get(key), after.get(key)
            lines.append(f"{key[1]:2d} | {fmt(b, 'block_efficiency'):>8} | {fmt(a, 'block_efficiency'):>7} | "
                         f"{fmt(b, 'acceptance_rate', '.3f'):>8} | {fmt(a, 'acceptance_rate', '.3f'):>7} | "
                         f"{fmt(a, 'expected_block_efficiency'):>8} | {fmt(a, 'measured_speedup'):>16} | "
                         f"{fmt(a, 'predicted_speedup'):>8}")
        lines.append("")
    return "\n".join(lines)


def report(c: ConfigDict, workdir: str) -> dict[str, Any]:
    res = results(c, workdir)
    wd.write_json(wd.path(workdir, STAGE_FILES["report"]), res)
    if c.tracking.wandb:
        tracking.upload_files(str(wd.path(workdir)), [STAGE_FILES["report"], "metrics.jsonl", wd.CONFIG_FILE],
                              project=c.tracking.project, run_name=c.tracking.run_name or res["run"]["name"],
                              config=c.to_dict(), entity=c.tracking.entity, tags=tuple(c.tracking.tags))
    if jax.process_index() == 0:
        try:
            from analysis import plots
        except ImportError:  # the library installed without the repository's analysis/ folder
            plots = None
            logging.warning("analysis.plots is not importable; skipping plots (run from the repository root)")
        if c.plots and plots is not None:
            plots.write_all([str(wd.path(workdir))], str(wd.path(workdir, "plots")))
        print(format_table(res), flush=True)
    return res


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(c: ConfigDict, workdir: str, observe: Callable[[str], AbstractContextManager] | None = None
        ) -> dict[str, Any] | None:
    """Runs the configured stages in order; returns results.json's content (None when the report stage is
    not among them). Raises errors.Preempted when stopped on request (rerun to resume).

    observe(stage), when given, is a context manager entered around each stage that runs (benchmarks time
    and measure stages with it: bench/rehearsal.py).
    """
    stages = validate(c)
    wd.check_writable(workdir)  # a file in the way, permissions, a read-only or virtual filesystem
    wd.check_ours(workdir, OWNED, c.overwrite)  # before anything is written or deleted
    shd.maybe_initialize_distributed(c.distributed)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    check_mesh(c, mesh)
    check_memory(c, jax.devices())  # before any download or conversion
    with lease.WorkdirLock(str(wd.path(workdir))):  # one run at a time (process 0 holds it)
        return _run_stages(c, workdir, stages, mesh, observe or (lambda stage: contextlib.nullcontext()))


def _run_stages(c: ConfigDict, workdir: str, stages: tuple[str, ...], mesh,
                observe: Callable[[str], AbstractContextManager]) -> dict[str, Any] | None:
    config = wd.redact(c.to_dict())
    wd.write_marker(workdir)
    # Data errors come before any model loads, and before config.json: a run refused for its data can be
    # rerun with the data fixed, without the config guard objecting to the changed data fields.
    examples = None
    if "data" in stages and not wd.path(workdir, STAGE_FILES["data"]).exists():
        examples = checks.load_examples(c)
    allowed = [f.strip() for f in c.resume_with_changes.split(",") if f.strip()]
    if wd.check_config(workdir, config, c.overwrite, allowed):
        print(f"[run] config changed and overwrite=True: discarding the earlier outputs in {workdir}", flush=True)
        wd.discard_outputs(workdir, OWNED, keep=(MODELS_DIR, wd.MARKER_FILE, lease.LOCK_FILE))
    wd.write_json(wd.path(workdir, wd.CONFIG_FILE), config)
    # Process 0 discards and writes; every host then decides which stages are done from the same files
    # (the workdir must be shared: gs:// or a shared filesystem).
    shd.barrier("distillspec:config")
    enable_compilation_cache(c, workdir)
    done = {s for s, f in STAGE_FILES.items() if wd.path(workdir, f).exists()}
    todo = [s for s in stages if s == "prepare" or s == "report" or s not in done]
    print(f"[run] workdir {wd.path(workdir)}; stages {','.join(stages)}; already done: "
          f"{','.join(sorted(done & set(stages))) or 'none'}", flush=True)
    needs_models = any(s in todo for s in ("prepare", "data", "eval_before", "distill", "eval_after"))
    models = None
    if needs_models:
        with observe("prepare"):
            models = prepare(c, workdir, mesh)
    if "data" in todo:
        with observe("data"):
            build_data(c, workdir, models, mesh, examples)
        shd.barrier("distillspec:data")  # every host reads what process 0 wrote
    if "eval_before" in todo:
        with observe("eval_before"):
            wd.write_json(wd.path(workdir, STAGE_FILES["eval_before"]),
                          evaluate(c, workdir, models, models.draft, mesh, "eval_before"))
    if "distill" in todo:
        with observe("distill"):
            finished = distill(c, workdir, models, mesh)
        if not finished:
            print("[run] stopped on request after saving a checkpoint; rerun the same command to resume", flush=True)
            raise Preempted("distillation stopped on request; its checkpoint is in "
                            f"{wd.path(workdir, train.CHECKPOINT_DIR)}")
    if "eval_after" in todo:
        with observe("eval_after"):
            wd.write_json(wd.path(workdir, STAGE_FILES["eval_after"]),
                          evaluate(c, workdir, models, distilled_draft(c, workdir, mesh), mesh, "eval_after"))
    if "report" in todo:
        with observe("report"):
            return report(c, workdir)
    return None
