"""Stage `data`: the tokenised training and evaluation prompts, and the target's responses when the
generator trains on them.

Owns config.data, config.generator and config.synthetic. Writes `data/synthetic_queries.json` (when the
target writes the training prompts), `data/eval.json`, `data/target_responses.json` (when the generator needs them), `data/target_logits/` (generator target_logits: the target's top-k at every response
position, `teacher_store`), `data/eval_references.json` (for a task with checkable answers, `answers`: what
each evaluation prompt's answer is checked against) and last `data/train.json`, whose existence marks the stage
done.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from distillspec_jax import checks
from distillspec_jax import sharding as shd
from distillspec_jax import workdir as wd
from distillspec_jax.data import answers, generators, pipeline, synthetic, tasks, teacher_store
from distillspec_jax.sampling import Sampler
from distillspec_jax.stages.prepare import Models

DATA_DIR = "data"
OUTPUT = f"{DATA_DIR}/train.json"
TARGET_RESPONSES = "target_responses.json"
SYNTHETIC_QUERIES = "synthetic_queries.json"
EVAL_REFERENCES = "eval_references.json"


def synthetic_spec(c: ConfigDict) -> synthetic.SyntheticQueries:
    """config.synthetic in one hop."""
    return synthetic.SyntheticQueries(**c.synthetic)


def generator_spec(c: ConfigDict, eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> generators.GeneratorSpec:
    """config.generator as the data generator's GeneratorSpec (the run's EOS and pad ids added)."""
    g = c.generator
    return generators.GeneratorSpec(
        kind=g.kind, sampler=Sampler(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p),
        max_new_tokens=g.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, mix_lambda=g.mix_lambda,
        mix_other=g.mix_other, regenerate_every=g.regenerate_every, logits_k=g.logits_k, logits_of=g.logits_of)


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
    data_dir = wd.path(workdir, DATA_DIR)
    queries = synthetic_spec(c)
    if queries.enabled:  # the target writes the training prompts; evaluation stays on the dataset's
        written = synthetic.write_queries(models.target, models.tokenizer, queries, chat=d.chat, eos_ids=models.eos_ids,
                                          pad_id=models.pad_id, batch_rows=c.distill.batch_size,
                                          rng=jax.random.fold_in(jax.random.key(c.seed), 2), mesh=mesh)
        wd.write_json(data_dir / SYNTHETIC_QUERIES, written)
        train_items = pipeline.tokenize(synthetic.query_examples(written), synthetic.QUERY_TASK, models.tokenizer,
                                        **kwargs)
    else:
        train_items = pipeline.tokenize(examples, task, models.tokenizer, **kwargs)
    eval_items = pipeline.tokenize(eval_examples, task, models.tokenizer, **kwargs)
    generation = generator_spec(c, models.eos_ids, models.pad_id)
    if generation.stored_responses == "fixed" and any(it.response is None for it in train_items):
        raise ValueError(f"generator {generation.kind!r} trains on the dataset's responses, but task {d.task!r} on "
                         "this source has none; use generator.kind=target or draft")
    if len(train_items) < c.distill.batch_size:
        raise ValueError(f"{len(train_items)} training examples cannot fill config.distill.batch_size="
                         f"{c.distill.batch_size}")
    origin = f"{d.source}:{d.name or d.task}"
    if queries.enabled:
        origin = f"training prompts written by the target, evaluation {origin}"
    print(f"[data] {len(train_items)} training and {len(eval_items)} evaluation prompts ({origin})", flush=True)
    if generation.generator.stores_logits:
        check_logits_k(generation.logits_k, models.target_cfg.real_vocab_size)  # before the target generates
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in train_items), d.pad_multiple)
    responses = [it.response for it in train_items]
    if generation.needs_target_responses:
        responses = generators.generate_responses(
            models.target, [it.prompt for it in train_items], generation, c.distill.batch_size, prompt_len,
            jax.random.fold_in(jax.random.key(c.seed), 1), mesh, stage="data: target responses")
        wd.write_json(data_dir / TARGET_RESPONSES, [r.tolist() for r in responses])
    if generation.generator.stores_logits:
        meta = teacher_store.StoreMeta(
            k=generation.logits_k, real_vocab_size=models.target_cfg.real_vocab_size,
            tokenizer=teacher_store.tokenizer_fingerprint(models.tokenizer), temperature=float(c.distill.temperature),
            hosts=jax.process_count(), length=generators.batch_length(prompt_len, generation, responses))
        teacher_store.store_teacher_outputs(models.target, [it.prompt for it in train_items], responses,
                                            data_dir / teacher_store.STORE_DIR, meta, batch_rows=c.distill.batch_size,
                                            pad_id=models.pad_id, mesh=mesh, chunk=c.distill.loss_chunk)
    if d.task in answers.ANSWER_CHECKS:  # in the order of eval.json
        wd.write_json(data_dir / EVAL_REFERENCES, [answers.ANSWER_CHECKS[d.task].reference(ex) for ex in eval_examples])
    wd.write_json(data_dir / "eval.json", _items_to_json(eval_items))
    wd.write_json(wd.path(workdir, OUTPUT), _items_to_json(train_items))  # last: it marks the stage done


def check_logits_k(k: int, real_vocab_size: int) -> None:
    """generator.logits_k against the models' vocabulary: 1 <= k < V (k = V would store the whole distribution;
    train against the target itself then, with generator.kind=target)."""
    if not 1 <= k < real_vocab_size:
        raise ValueError(f"generator.logits_k={k} must be in [1, {real_vocab_size}): the models' vocabulary has "
                         f"{real_vocab_size} ids; storing every one is the full distribution, for which "
                         "generator.kind=target trains against the target directly. Set e.g. "
                         "--config.generator.logits_k=64")


def load_data(workdir: str, which: str) -> list[pipeline.Tokenized]:
    """The data stage's 'train' or 'eval' items."""
    obj = wd.read_json(wd.path(workdir, DATA_DIR, f"{which}.json"))
    if obj is None:
        raise FileNotFoundError(f"{wd.path(workdir, DATA_DIR)} has no {which}.json; run the data stage first "
                                "(--config.stages=data, or include it)")
    return _items_from_json(obj)


def training_items(c: ConfigDict, workdir: str, generation: generators.GeneratorSpec) -> list[pipeline.Tokenized]:
    """The training items, with the target's responses in place of the dataset's when the generator needs them."""
    items = load_data(workdir, "train")
    if generation.needs_target_responses:
        responses = wd.read_json(wd.path(workdir, DATA_DIR, TARGET_RESPONSES))
        if responses is None:
            raise FileNotFoundError("the target-generated responses are missing; rerun the data stage")
        items = [pipeline.Tokenized(it.prompt, np.asarray(r, np.int32)) for it, r in zip(items, responses)]
    return items


def run(state) -> None:
    build_data(state.config, state.workdir, state.models, state.mesh, state.examples)
    shd.barrier("distillspec:data")  # every host reads what process 0 wrote
