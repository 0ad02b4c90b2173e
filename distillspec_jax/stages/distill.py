"""Stage `distill`: trains the draft on the target's distributions (resumable), then saves it as Orbax and
as HF safetensors.

Owns config.distill (with AdaSPEC's reference run) and config.serving (generator `serving`: online learning while
serving; its per-update figures go to `serving.jsonl`). Writes `checkpoints/` while training, `reference/` for
AdaSPEC's reference draft, and `distilled/` (`orbax/`, `hf/` and last `summary.json`, which marks the
stage done).
"""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from distillspec_jax import checkpoint, train
from distillspec_jax import workdir as wd
from distillspec_jax.data import generators, pipeline, serving, teacher_store
from distillspec_jax.data import source as data_source
from distillspec_jax.errors import Preempted
from distillspec_jax.models import convert, qwen3
from distillspec_jax.stages.data import DATA_DIR, check_logits_k, generator_spec, training_items
from distillspec_jax.stages.prepare import Models, load_draft

DISTILLED_DIR, REFERENCE_DIR = "distilled", "reference"
OUTPUT = f"{DISTILLED_DIR}/summary.json"


def train_config(c: ConfigDict) -> train.TrainConfig:
    """The distillation loop's settings: config.distill in one hop (validated by TrainConfig); the teacher is
    stored when the generator stores it."""
    return train.TrainConfig(**c.distill, seed=c.seed,
                             stored_teacher=generators.GENERATORS[c.generator.kind].stored_teacher)


def serving_spec(c: ConfigDict) -> serving.ServingSpec:
    """config.serving in one hop."""
    return serving.ServingSpec(**c.serving)


def _batch_source(c: ConfigDict, workdir: str, models: Models,
                  generation: generators.GeneratorSpec) -> data_source.BatchSource:
    if generation.generator.stores_logits:
        directory = wd.path(workdir, DATA_DIR, teacher_store.STORE_DIR)
        teacher_store.check_compatible(
            teacher_store.read_meta(directory), directory, k=generation.logits_k,
            real_vocab_size=models.draft.cfg.real_vocab_size,
            tokenizer=teacher_store.tokenizer_fingerprint(models.tokenizer), temperature=float(c.distill.temperature),
            hosts=jax.process_count())
        return teacher_store.make_source(directory, c.distill.batch_size, c.seed, models.pad_id, jax.process_index(),
                                         jax.process_count())
    items = training_items(c, workdir, generation)
    batcher = pipeline.Batcher(items, c.distill.batch_size, c.seed, models.pad_id, c.data.pad_multiple, c.data.bucket,
                               host_index=jax.process_index(), host_count=jax.process_count())
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in items), c.data.pad_multiple)
    if generation.generator.teacher == "serving":
        check_logits_k(generation.logits_k, models.target_cfg.real_vocab_size)
        return serving.make_source(serving_spec(c), models.target, batcher, prompt_len,
                                   max_new_tokens=generation.max_new_tokens, eos_ids=models.eos_ids,
                                   pad_id=models.pad_id, logits_k=generation.logits_k,
                                   loss_temperature=float(c.distill.temperature), seed=c.seed, log_dir=str(workdir))
    return generators.make_source(generation, batcher, prompt_len, c.seed)


def distill(c: ConfigDict, workdir: str, models: Models, mesh) -> bool:
    """Trains the draft; returns False when stopped by SIGTERM (rerun to resume), True when done."""
    cfg = train_config(c)
    generation = generator_spec(c, models.eos_ids, models.pad_id)
    source = _batch_source(c, workdir, models, generation)
    run_name = c.tracking.run_name or os.path.basename(os.path.normpath(str(workdir)))
    tracking_kwargs = dict(use_wandb=c.tracking.wandb, wandb_project=c.tracking.project, run_name=run_name,
                           tracking_options={"wandb_entity": c.tracking.entity, "wandb_tags": tuple(c.tracking.tags)})
    reference = None
    if cfg.uses_reference:
        # The selection's reference (AdaSPEC): the same initial draft distilled with FKL on the same data, frozen.
        ref_cfg = cfg.reference_config()
        ref_distiller = train.Distiller(ref_cfg, load_draft(c, models.draft_dir, mesh),
                                        models.target if ref_cfg.uses_target else None, mesh)
        print(f"[distill] {cfg.token_selection.title} reference draft: {ref_cfg.divergence.upper()} for "
              f"{ref_cfg.steps} steps", flush=True)
        ref = train.run(ref_distiller, source, wd.path(workdir, REFERENCE_DIR), stage="reference",
                        **{**tracking_kwargs, "use_wandb": False})
        if ref.preempted:
            return False
        reference = ref_distiller.draft_model(ref.state.params)
    distiller = train.Distiller(cfg, models.draft, models.target if cfg.uses_target else None, mesh,
                                reference=reference)
    try:
        result = train.run(distiller, source, wd.path(workdir), stage="distill", wandb_config=c.to_dict(),
                           **tracking_kwargs)
    except train.NonFiniteLossError as err:
        raise train.NonFiniteLossError(
            f"{err} To rerun with a lower learning rate on this workdir: --config.distill.learning_rate="
            f"{c.distill.learning_rate / 10:g} --config.resume_with_changes=distill.learning_rate") from None
    if result.preempted:
        return False
    distilled = distiller.draft_model(result.state.params)
    out = wd.path(workdir, DISTILLED_DIR)
    convert.save_orbax(distilled, out / "orbax")
    convert.export_hf(distilled, str(out / "hf"), tokenizer_from=models.tokenizer_dir)
    wd.write_json(wd.path(workdir, OUTPUT), {"steps": result.step, "data_position": result.data_position,
                                             "last_metrics": result.last_metrics})
    return True


def distilled_draft(c: ConfigDict, workdir: str, mesh) -> qwen3.Qwen3:
    """The distill stage's draft, from its Orbax folder."""
    directory = wd.path(workdir, DISTILLED_DIR, "orbax")
    if not directory.exists():
        raise FileNotFoundError(f"no distilled draft in {directory}; run the distill stage first")
    return load_draft(c, directory, mesh)


def run(state) -> None:
    if not distill(state.config, state.workdir, state.models, state.mesh):
        print("[run] stopped on request after saving a checkpoint; rerun the same command to resume", flush=True)
        raise Preempted(f"distillation stopped on request; its checkpoint is in "
                        f"{wd.path(state.workdir, checkpoint.CHECKPOINT_DIR)}")
