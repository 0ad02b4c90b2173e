"""What a run checks before any model is loaded or anything compiles (design §7).

    check_fields     every config field, whether or not its feature is on, in one message form:
                     `config.X = value: must be ...; fix: ...`
    check_positions  the longest sequence that training, data generation and evaluation can build
                     against the models' max_position_embeddings (RoPE runs past it without an error)
    load_examples    the raw data: an empty source, a row without the field its task reads (with its
                     file, row and line), and too few rows for the evaluation and one training batch

and, on the host before tracing, what the models are given (the model file checks nothing of this):

    check_same_vocabulary  draft and target (or reference) compare distributions id by id
    check_token_ids        ids outside the embedding table, which JAX would not report
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from distillspec_jax import hub
from distillspec_jax import workdir as wd
from distillspec_jax.data import pipeline, sources, tasks
from distillspec_jax.errors import field_error
from distillspec_jax.models import qwen3

TINY = "tiny"
DISTRIBUTED_MODES = ("auto", "on", "off")
BYTE_ALPHABET = 256  # a byte-level BPE holds every byte before any merge
HF_DEFAULT_MAX_POSITIONS = 40960  # what qwen3.Qwen3Config.from_hf assumes when config.json lacks the field


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class _Fields:
    """Reads config fields by dotted name, remembering which were checked (a test asserts: all)."""

    def __init__(self, c: ConfigDict):
        self.c = c
        self.checked: set[str] = set()

    def __call__(self, field: str) -> Any:
        self.checked.add(field)
        return functools.reduce(lambda node, key: node[key], field.split("."), self.c)

    def require(self, field: str, ok: Callable[[Any], bool], must: str, fix: str) -> Any:
        value = self(field)
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise field_error(field, value, must, fix)
        return value

    def boolean(self, field: str) -> bool:
        return self.require(field, lambda v: isinstance(v, bool), "True or False", f"--config.{field}=False")

    def text(self, field: str) -> str:
        return self.require(field, lambda v: isinstance(v, str), "a string", f"--config.{field}=''")

    def choice(self, field: str, choices: Sequence[str], what: str = "") -> str:
        prefix = f"{what}; " if what and self(field) not in choices else ""
        return self.require(field, lambda v: v in choices, f"{prefix}one of {', '.join(map(str, choices))}",
                            f"--config.{field}={choices[0]}")

    def integer(self, field: str, lo: int, fix_value: int | None = None, also: int | None = None) -> int:
        """An integer >= lo (or exactly `also`, e.g. -1 meaning 'all')."""
        must = f"an integer >= {lo}" + (f", or {also}" if also is not None else "")
        return self.require(field, lambda v: _is_int(v) and (v >= lo or v == also), must,
                            f"--config.{field}={lo if fix_value is None else fix_value}")

    def number(self, field: str, lo: float, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False, fix_value: float | None = None) -> float:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        must = f"a number in {left}{lo:g}, {'inf' if hi is None else f'{hi:g}'}{right if hi is not None else ')'}"

        def ok(v):
            return _is_number(v) and (v > lo if lo_open else v >= lo) and (
                hi is None or (v < hi if hi_open else v <= hi))

        return self.require(field, ok, must, f"--config.{field}={lo if fix_value is None else fix_value:g}")


def parse_stages(text: str) -> tuple[str, ...]:
    """The stages named in config.stages, in pipeline order (the table in distillspec_jax.stages)."""
    from distillspec_jax.stages import NAMES as STAGES  # the stages import this module

    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise field_error("stages", text, f"a comma-separated subset of {','.join(STAGES)} (unknown stages "
                          f"{unknown})", f"--config.stages={','.join(STAGES)}")
    return tuple(s for s in STAGES if s in stages)  # always in pipeline order


def _leaf_fields(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [f for k, v in obj.items() for f in _leaf_fields(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def all_fields(c: ConfigDict) -> list[str]:
    """Every leaf field of the config, dotted."""
    return _leaf_fields(c.to_dict())


def check_fields(c: ConfigDict) -> set[str]:
    """Checks every field of the config (features that are off included); returns the names checked."""
    f = _Fields(c)
    _check_run(f)
    _check_models(f)
    _check_data(f)
    _check_generator(f)
    _check_synthetic(f)
    _check_serving(f)
    _check_distill(f)
    _check_mesh_eval_tracking(f)
    _check_tiny(f)
    return f.checked


def _check_run(f: _Fields) -> None:
    f.integer("seed", 0)
    parse_stages(f.require("stages", lambda v: isinstance(v, str), "a comma-separated list of stages",
                           "--config.stages=prepare,data,eval_before,distill,eval_after,report"))
    f.boolean("overwrite")
    f.boolean("plots")
    f.text("compilation_cache")  # a folder, 'auto' or '' (off): any string
    f.choice("distributed", DISTRIBUTED_MODES)
    changes = f.text("resume_with_changes")
    known = set(all_fields(f.c))
    groups = {name.rsplit(".", i)[0] for name in known for i in range(1, name.count(".") + 1)}
    for name in (n.strip() for n in changes.split(",") if n.strip()):
        if name not in known | groups:
            raise field_error("resume_with_changes", changes, f"a comma-separated list of config fields ({name!r} "
                              "is none)", "--config.resume_with_changes=distill.learning_rate")
        if any(name == x or name.startswith(x + ".") or x.startswith(name + ".") for x in wd.RESUME_FIXED_FIELDS):
            raise field_error("resume_with_changes", changes,
                              f"free of {', '.join(wd.RESUME_FIXED_FIELDS)} ({name!r} is one: the workdir's models, "
                              "tokens and data were made with them)", "use a new --workdir for that change")


def _check_model_source(f: _Fields, which: str) -> None:
    field = f"{which}.model"
    source = f.text(field)
    if source == TINY:
        return
    if os.path.isdir(os.path.expanduser(source)):
        if not os.path.isfile(os.path.join(os.path.expanduser(source), "config.json")):
            raise field_error(field, source, "a HF Qwen3 checkpoint folder (this folder has no config.json)",
                              f"--config.{field}=<the folder holding config.json and *.safetensors>")
        return
    if not hub.looks_like_hub_id(source):
        raise field_error(field, source, "an existing checkpoint folder or a hub id such as Qwen/Qwen3-0.6B (it is "
                          "neither)", f"fix the path, or --config.{field}=Qwen/Qwen3-0.6B")


def _check_models(f: _Fields) -> None:
    from distillspec_jax.models import qwen3

    for which in ("target", "draft"):
        _check_model_source(f, which)
        f.choice(f"{which}.dtype", sorted(qwen3.DTYPES))
        f.choice(f"{which}.param_dtype", sorted(qwen3.DTYPES))
    target, draft = f("target.model"), f("draft.model")
    if (target == TINY) != (draft == TINY):
        raise field_error("draft.model", draft, f"'tiny' exactly when config.target.model is (it is {target!r}): "
                          "the offline pair is built together", "set both to 'tiny', or both to real checkpoints")
    tokenizer = f.text("tokenizer")
    if tokenizer == TINY and target != TINY:
        raise field_error("tokenizer", tokenizer, f"a tokenizer of {target!r}: the 'tiny' tokenizer belongs to the "
                          "'tiny' models", "--config.tokenizer='' (the target's own)")


def _check_data(f: _Fields) -> None:
    source = f.choice("data.source", sorted(sources.SOURCES), "unknown data source")
    name, split, eval_split = f.text("data.name"), f.text("data.split"), f.text("data.eval_split")
    f.text("data.config_name")
    f.text("data.data_dir")
    entry = sources.SOURCES[source]
    if entry.splitless and eval_split:
        raise field_error("data.eval_split", eval_split, f"'' for source {source!r}, which has no splits (evaluation "
                          "prompts are held out of its examples instead)", "--config.data.eval_split=''")
    if entry.needs_name and not name:
        raise field_error("data.name", name, f"a dataset id or file path for source {source!r}",
                          "--config.data.name=<hub id or path>")
    if source == "jsonl" and not os.path.isfile(os.path.expanduser(name)):
        raise field_error("data.name", name, "an existing JSONL file (it does not exist)", "fix the path")
    if not entry.splitless and not split:
        raise field_error("data.split", split, f"the split to train on (source {source!r} has splits)",
                          "--config.data.split=train")
    if source == "tfds":
        f.choice("data.name", sources.TFDS_NAMES, "unknown TFDS dataset")
        for field, value in (("data.split", split), ("data.eval_split", eval_split)):
            if value and value.split("[")[0] not in sources.TFDS_SPLITS[name]:
                raise field_error(field, value, f"a split of TFDS {name!r}: {', '.join(sources.TFDS_SPLITS[name])}",
                                  f"--config.{field}={sources.TFDS_SPLITS[name][0]}")
    f.choice("data.task", sorted(tasks.TASKS), "unknown task")
    for flag in ("chat", "enable_thinking", "bucket"):
        f.boolean(f"data.{flag}")
    for length in ("max_prompt_len", "max_response_len", "pad_multiple"):
        f.integer(f"data.{length}", 1)
    f.integer("data.num_train_examples", 1, fix_value=-1, also=-1)
    if source == "tfds":  # after the cheap checks: this one imports nothing but looks for tensorflow
        sources.check_source(source, name, split, eval_split)


def _check_generator(f: _Fields) -> None:
    from distillspec_jax.data import generators

    kind = f.choice("generator.kind", tuple(generators.GENERATORS), "unknown generator")
    f.number("generator.mix_lambda", 0.0, 1.0, fix_value=0.5)  # checked for every kind: a typo is a typo
    other = f.choice("generator.mix_other", generators.MIX_OTHERS)
    f.number("generator.temperature", 0.0, fix_value=1.0)
    f.integer("generator.top_k", 0)
    f.number("generator.top_p", 0.0, 1.0, lo_open=True, fix_value=1.0)
    f.integer("generator.max_new_tokens", 1, fix_value=64)
    f.integer("generator.regenerate_every", 1)
    f.integer("generator.logits_k", 1, fix_value=64)
    logits_of = f.choice("generator.logits_of", generators.LOGITS_OF)
    task = tasks.TASKS[f("data.task")]
    if generators.stored_responses(kind, other, logits_of) == "fixed" and not task.has_responses:
        raise field_error("generator.kind", kind, f"a generator that makes its responses: task {task.name!r} has no "
                          "fixed responses to train on", "--config.generator.kind=draft (or target)")


def _check_synthetic(f: _Fields) -> None:
    from distillspec_jax.data import generators

    count = f.integer("synthetic.num_prompts", 0)
    f.number("synthetic.temperature", 0.0, lo_open=True, fix_value=1.0)
    f.number("synthetic.top_p", 0.0, 1.0, lo_open=True, fix_value=1.0)
    longest = f.integer("synthetic.max_tokens", 1, fix_value=128)
    f.require("synthetic.min_tokens", lambda v: _is_int(v) and 1 <= v <= longest, f"an integer in [1, {longest}] "
              "(synthetic.max_tokens)", "--config.synthetic.min_tokens=8")
    f.integer("synthetic.max_rounds", 1, fix_value=8)
    g = f.c.generator
    if count and generators.stored_responses(g.kind, g.mix_other, g.logits_of) == "fixed":
        raise field_error("synthetic.num_prompts", count, "0 with a generator that trains on the dataset's responses: "
                          "target-written queries have none", "--config.generator.kind=target (or draft)")
    if count and count < f.c.distill.batch_size:
        raise field_error("synthetic.num_prompts", count, f"0, or at least distill.batch_size={f.c.distill.batch_size}",
                          f"--config.synthetic.num_prompts={f.c.distill.batch_size}")


def _check_serving(f: _Fields) -> None:
    gamma = f.integer("serving.gamma", 1, fix_value=4)
    f.number("serving.temperature", 0.0, fix_value=0.0)
    batch, serving = f.c.distill.batch_size, f.c.generator.kind == "serving"
    # A multiple of the batch only where it is used: a batch size change must not break runs that do not serve.
    f.require("serving.requests_per_update",
              lambda v: _is_int(v) and v >= 1 and (not serving or (_is_int(batch) and v % batch == 0)),
              f"a positive multiple of distill.batch_size={batch}", f"--config.serving.requests_per_update={batch}")
    f.integer("serving.steps_per_update", 1, fix_value=4)
    f.require("serving.buffer_tokens", lambda v: _is_int(v) and v >= gamma + 1,
              f"an integer >= one verify block (serving.gamma + 1 = {gamma + 1} tokens)",
              "--config.serving.buffer_tokens=16384")


def _check_lenience(f: _Fields) -> None:
    """The lossy frontier: known forms, ε in (0, 1], both or neither, and a temperature > 0 to relax."""
    from distillspec_jax import lenience

    text = f.text("eval.lenience")
    try:
        forms = lenience.parse_forms(text)
    except ValueError as e:
        raise field_error("eval.lenience", text, str(e), f"--config.eval.lenience={sorted(lenience.LENIENCE_FORMS)[0]}")
    epsilons = f.require("eval.epsilons", lambda v: all(_is_number(e) and 0 < e <= 1 for e in v),
                         "a tuple of ε in (0, 1] (1 = lossless)", "--config.eval.epsilons='(1.0, 0.5, 0.2, 0.1)'")
    if epsilons and not forms:
        raise field_error("eval.epsilons", epsilons, "empty unless eval.lenience names a form: an ε sweep needs the "
                          f"lenience function it relaxes ({', '.join(sorted(lenience.LENIENCE_FORMS))})",
                          "--config.eval.lenience=p_over_eps")
    if forms and not epsilons:
        raise field_error("eval.lenience", text, "'' unless eval.epsilons gives the ε to sweep",
                          "--config.eval.epsilons='(1.0, 0.5, 0.2, 0.1)'")
    if forms and not any(_is_number(t) and t > 0 for t in f.c.eval.temperatures):
        raise field_error("eval.lenience", text, "'' with only greedy evaluation: lenience relaxes the sampling test "
                          "and greedy decoding keeps its exact rule; add a temperature > 0",
                          "--config.eval.temperatures='(0.0, 1.0)'")


def _check_distill(f: _Fields) -> None:
    from distillspec_jax.divergences import DIVERGENCES
    from distillspec_jax.selection import SELECTIONS

    divergence = f.choice("distill.divergence", sorted(DIVERGENCES), "unknown divergence")
    f.number("distill.jsd_beta", 0.0, 1.0, fix_value=0.5)
    f.number("distill.temperature", 0.0, lo_open=True, fix_value=1.0)
    selection = f.choice("distill.selection", sorted(SELECTIONS), "unknown token selection")
    f.number("distill.adaspec_fraction", 0.0, 1.0, lo_open=True, fix_value=0.4)
    if SELECTIONS[selection].uses_reference and not DIVERGENCES[divergence].uses_target:
        raise field_error("distill.selection", selection, f"a selection that uses no target: {selection!r} compares "
                          f"the draft and its reference against the target, and divergence {divergence!r} has none",
                          "--config.distill.selection=all")
    f.integer("distill.reference_steps", 0)
    steps = f.integer("distill.steps", 1, fix_value=100)
    batch = f.integer("distill.batch_size", 1, fix_value=8)
    accum = f.integer("distill.grad_accum_steps", 1)
    if batch % accum:
        raise field_error("distill.grad_accum_steps", accum, f"a divisor of distill.batch_size={batch} (each "
                          "optimizer step splits its batch into this many micro-batches)",
                          "--config.distill.grad_accum_steps=1")
    f.number("distill.learning_rate", 0.0, lo_open=True, fix_value=3e-5)
    f.require("distill.warmup_steps", lambda v: _is_int(v) and 0 <= v <= steps, f"an integer in [0, distill.steps="
              f"{steps}]", f"--config.distill.warmup_steps={min(100, steps)}")
    f.number("distill.end_lr_fraction", 0.0, 1.0, fix_value=0.1)
    f.number("distill.weight_decay", 0.0)
    f.number("distill.b1", 0.0, 1.0, hi_open=True, fix_value=0.9)
    f.number("distill.b2", 0.0, 1.0, hi_open=True, fix_value=0.95)
    f.number("distill.grad_clip_norm", 0.0, fix_value=1.0)
    f.integer("distill.loss_chunk", 0, fix_value=128)
    f.boolean("distill.remat")
    f.boolean("distill.unroll_layers")
    for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
        f.integer(f"distill.{name}", 1)


def _check_mesh_eval_tracking(f: _Fields) -> None:
    f.integer("mesh.data", 1, fix_value=-1, also=-1)
    f.integer("mesh.fsdp", 1)
    f.integer("mesh.tensor", 1)
    f.require("eval.gammas", lambda v: len(v) > 0 and all(_is_int(g) and g >= 1 for g in v),
              "a non-empty tuple of integers >= 1 (draft tokens per block)", "--config.eval.gammas='(1, 2, 3)'")
    f.require("eval.temperatures", lambda v: len(v) > 0 and all(_is_number(t) and t >= 0 for t in v),
              "a non-empty tuple of decoding temperatures >= 0 (0 = greedy)", "--config.eval.temperatures='(0.0, 1.0)'")
    f.integer("eval.top_k", 0)
    f.number("eval.top_p", 0.0, 1.0, lo_open=True, fix_value=1.0)
    batch = f.integer("eval.batch_size", 1)
    f.require("eval.num_prompts", lambda v: _is_int(v) and v >= 1 and v % batch == 0,
              f"a positive multiple of eval.batch_size={batch} (every evaluation batch has one static shape)",
              f"--config.eval.num_prompts={batch * max(1, f('eval.num_prompts') // batch)}")
    f.integer("eval.max_new_tokens", 1, fix_value=128)
    f.integer("eval.timing_repeats", 0)
    f.integer("eval.timing_steps", 1)
    f.boolean("eval.analytic")
    f.boolean("eval.execute_code")
    _check_lenience(f)
    wandb = f.boolean("tracking.wandb")
    f.require("tracking.project", lambda v: isinstance(v, str) and (v or not wandb),
              "a W&B project name (tracking.wandb is on)", "--config.tracking.project=distillspec-jax")
    f.text("tracking.entity")
    f.require("tracking.tags", lambda v: isinstance(v, str) or all(isinstance(t, str) for t in v),
              "a tuple of strings (or one comma-separated string)", "--config.tracking.tags='(\"jsd\",)'")
    f.text("tracking.run_name")


def _check_tiny(f: _Fields) -> None:
    from distillspec_jax.tokenizer import SMALL_SPECIAL_TOKENS

    smallest = BYTE_ALPHABET + len(SMALL_SPECIAL_TOKENS)
    f.integer("tiny.vocab_size", smallest, fix_value=1024)
    f.integer("tiny.corpus_files", 1, fix_value=-1, also=-1)
    f.integer("tiny.seq_len", 2, fix_value=128)
    f.integer("tiny.batch_size", 1)
    f.number("tiny.learning_rate", 0.0, lo_open=True, fix_value=3e-3)
    for which in ("target", "draft"):
        for part in ("layers", "hidden", "heads", "kv_heads", "ffn", "steps"):
            f.integer(f"tiny.{which}_{part}", 1)
        hidden, heads, kv = f(f"tiny.{which}_hidden"), f(f"tiny.{which}_heads"), f(f"tiny.{which}_kv_heads")
        if hidden % heads:
            raise field_error(f"tiny.{which}_hidden", hidden, f"a multiple of tiny.{which}_heads={heads}",
                              f"--config.tiny.{which}_hidden={heads * max(1, hidden // heads)}")
        if heads % kv:
            raise field_error(f"tiny.{which}_kv_heads", kv, f"a divisor of tiny.{which}_heads={heads}",
                              f"--config.tiny.{which}_kv_heads=1")
    experts = f.integer("tiny.target_experts", 0, fix_value=8)
    active = f.integer("tiny.target_experts_per_tok", 1, fix_value=2)
    f.integer("tiny.target_expert_ffn", 1, fix_value=128)
    if experts and active > experts:
        raise field_error("tiny.target_experts_per_tok", active, f"at most tiny.target_experts={experts}: a token "
                          "cannot be routed to more experts than a layer has",
                          f"--config.tiny.target_experts_per_tok={min(2, experts)}")
    f.text("tiny.cache_dir")
    f.integer("tiny.model_seed", 0, fix_value=-1, also=-1)


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    what: str  # which sequences
    parts: tuple[tuple[str, int], ...]  # (config field, positions it adds), summed

    @property
    def positions(self) -> int:
        return sum(n for _, n in self.parts)


def sequence_budgets(c: ConfigDict) -> list[Budget]:
    """The longest sequences each stage can build from the config (their static shapes)."""
    d, g = c.data, c.generator
    prompt = ("data.max_prompt_len", pipeline.round_up(d.max_prompt_len, d.pad_multiple))  # padded as batches are
    # A batch holds prompt + the longer of the generation budget and the fixed responses (make_source).
    response = (("data.max_response_len", d.max_response_len)
                if tasks.TASKS[d.task].has_responses and d.max_response_len > g.max_new_tokens
                else ("generator.max_new_tokens", g.max_new_tokens))
    # Speculative decoding verifies γ drafts past the last emitted token (decoding.required_cache_len).
    evaluation = (prompt, ("eval.max_new_tokens", c.eval.max_new_tokens), ("eval.gammas", max(c.eval.gammas) - 1))
    return [Budget("training and data-generation sequences", (prompt, response)), Budget("evaluation", evaluation)]


def check_positions(c: ConfigDict, max_positions: int, models: str) -> None:
    """Refuses sequences longer than the models' max_position_embeddings, naming the fields to lower."""
    for budget in sequence_budgets(c):
        if budget.positions > max_positions:
            field, value = max(budget.parts, key=lambda p: p[1])
            padded = {"data.max_prompt_len": ", padded to data.pad_multiple"}
            breakdown = " + ".join(f"{n} ({name}{padded.get(name, '')})" for name, n in budget.parts if n)
            names = " or ".join(name for name, _ in budget.parts)
            raise field_error(field, c[field.split(".")[0]][field.split(".")[1]],
                              f"small enough that {budget.what} fit the models' max_position_embeddings="
                              f"{max_positions} ({models}); they reach {budget.positions} positions = {breakdown}",
                              f"lower {names}")


def known_max_positions(c: ConfigDict) -> tuple[int, str] | None:
    """The models' max_position_embeddings where it is known without loading or converting anything:
    the tiny models, or local checkpoint folders (their config.json). None for hub ids."""
    if c.target.model == TINY:
        from distillspec_jax import tiny

        return tiny.TINY_MAX_POSITIONS, "the tiny models"
    found = []
    for which in ("target", "draft"):
        config = os.path.join(os.path.expanduser(c[which].model), "config.json")
        if not os.path.isfile(config):
            return None
        found.append(int(json.loads(open(config).read()).get("max_position_embeddings", HF_DEFAULT_MAX_POSITIONS)))
    return min(found), f"target {found[0]}, draft {found[1]}"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _where(c: ConfigDict, split: str) -> str:
    d = c.data
    if d.source == "jsonl" or (d.source == "hf" and pathlib.Path(d.name.replace("*", "x")).suffix
                                in sources.LOCAL_FILE_FORMATS):
        return str(d.name)
    return {"hf": f"dataset {d.name!r} split {split!r}", "tfds": f"TFDS {d.name!r} split {split!r}",
            "humaneval": "the HumanEval problems", "stdlib": "the standard-library corpus",
            "stdlib_docstrings": "the standard-library docstrings"}.get(d.source, d.source)


def check_rows(rows: Sequence[dict], task: tasks.Task, where: str, chat: bool, need_response: bool,
               jsonl_path: str | None = None) -> None:
    """Every row has the text its task reads (and a fixed response when training needs one)."""
    for i, row in enumerate(rows):
        try:
            tasks.prompt_text(task, row, chat)
            if need_response and tasks.response_text(task, row, chat) is None:
                raise tasks.FieldError("no fixed response", (), sorted(row))
            continue
        except tasks.FieldError as err:
            problem, found = err.problem, err.found
        except (KeyError, TypeError, AttributeError) as err:  # templates that index nested fields
            problem, found = f"{type(err).__name__}: {err}", sorted(row) if isinstance(row, dict) else []
        line = sources.jsonl_line_number(jsonl_path, i) if jsonl_path else None
        at = f"row {i + 1}" + (f" (line {line})" if line else "")
        raise sources.DataSourceError(
            f"{where}, {at}: {problem} (found fields: {', '.join(map(str, found)) or 'none'}); task {task.name!r} "
            f"reads {'its prompt and fixed response' if need_response else 'its prompt'} from each row; fix: "
            "correct that row, or pick the task that fits the data (config.data.task)")


def _load(c: ConfigDict, split: str, limit: int | None) -> list[dict]:
    d = c.data
    rows = sources.load(d.source, d.name, d.config_name, split, d.data_dir, limit)
    if not rows:
        raise sources.DataSourceError(f"{_where(c, split)} is empty (0 rows); fix: point config.data.name at a "
                                      "file or dataset with examples")
    return rows


def load_examples(c: ConfigDict) -> tuple[list[dict], list[dict]]:
    """(training, evaluation) examples, checked, before any model is loaded.

    Evaluation prompts come from data.eval_split, or are eval.num_prompts examples held out of the
    training split, chosen by the seed. A hold-out is drawn from the whole split and data.num_train_examples
    then counts the training rows left (the first ones, in the split's order), so the evaluation prompts do
    not change with the amount of training data, and smaller training sets are subsets of larger ones.
    """
    from distillspec_jax.data import generators  # generators -> generate -> checks: imported at call time

    d = c.data
    task = tasks.TASKS[d.task]
    fixed = generators.stored_responses(c.generator.kind, c.generator.mix_other, c.generator.logits_of) == "fixed"
    jsonl_path = d.name if d.source == "jsonl" else None
    limit = None if d.num_train_examples < 0 else d.num_train_examples
    examples = _load(c, d.split, limit if d.eval_split else None)
    check_rows(examples, task, _where(c, d.split), d.chat, fixed, jsonl_path)
    if d.eval_split:
        eval_examples = _load(c, d.eval_split, c.eval.num_prompts)
        check_rows(eval_examples, task, _where(c, d.eval_split), d.chat, False)
    else:  # hold out eval.num_prompts examples of the training split, chosen by the seed
        needed = c.eval.num_prompts + c.distill.batch_size
        if len(examples) < needed:
            raise sources.DataSourceError(
                f"{_where(c, d.split)} has {len(examples)} rows, fewer than the eval.num_prompts={c.eval.num_prompts} "
                f"held out for evaluation plus the distill.batch_size={c.distill.batch_size} of one training batch; "
                "fix: more data (data.num_train_examples=-1 uses all), or lower eval.num_prompts or distill.batch_size")
        order = np.random.default_rng([c.seed, 1]).permutation(len(examples))
        held = set(order[: c.eval.num_prompts].tolist())
        eval_examples = [examples[i] for i in sorted(held)]
        examples = [ex for i, ex in enumerate(examples) if i not in held][:limit]
    if len(eval_examples) < c.eval.num_prompts:
        raise sources.DataSourceError(f"{_where(c, d.eval_split)} has {len(eval_examples)} rows, fewer than "
                                      f"eval.num_prompts={c.eval.num_prompts}; fix: lower eval.num_prompts")
    if len(examples) < c.distill.batch_size:
        raise sources.DataSourceError(f"{_where(c, d.split)} has {len(examples)} training rows, fewer than one batch "
                                      f"of distill.batch_size={c.distill.batch_size}; fix: lower distill.batch_size")
    return examples, eval_examples


# ----------------------------------------------------------------------------------------------
# What the models are given (host side, before anything is traced)
# ----------------------------------------------------------------------------------------------


ModelConfig = qwen3.Qwen3Config | Mapping[str, Any]  # a config, or its fields as stored with a converted model


def check_same_vocabulary(draft: ModelConfig, other: ModelConfig, other_name: str, needed_for: str) -> None:
    """Draft and target (or reference) must share one vocabulary: same rows and same real tokens, because
    `needed_for` compares their distributions id by id. Each is a Qwen3Config, or its fields as a dict (the
    converted models' stored config, read before any weights load)."""
    (draft_v, draft_real), (other_v, other_real) = _vocabulary(draft), _vocabulary(other)
    if (draft_v, draft_real) != (other_v, other_real):
        raise ValueError(
            f"draft and {other_name} vocabularies differ: draft vocab_size={draft_v} (real {draft_real}), "
            f"{other_name} vocab_size={other_v} (real {other_real}); {needed_for} compares their distributions "
            "id by id, so pick models with the same tokenizer")


def _vocabulary(cfg: ModelConfig) -> tuple[int, int]:
    """(vocab_size, real_vocab_size): rows, and ids that are real tokens (num_real_tokens None = all rows)."""
    if isinstance(cfg, qwen3.Qwen3Config):
        return cfg.vocab_size, cfg.real_vocab_size
    return cfg["vocab_size"], cfg.get("num_real_tokens") or cfg["vocab_size"]


def concrete(x) -> np.ndarray | None:
    """`x` as a host array when its values are known outside jit on this process, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def check_token_ids(cfg: qwen3.Qwen3Config, tokens, what: str) -> None:
    """Ids outside [0, vocab_size) would index past the embedding table, which JAX answers with NaN rows
    (or, for a negative id, a wrapped-around row) instead of an error; caught here on the host."""
    ids = concrete(tokens)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"{what} holds token ids in [{ids.min()}, {ids.max()}], outside the model's vocabulary "
                         f"[0, {cfg.vocab_size}); tokenize with the model's own tokenizer")
