"""Pre-flight without the hardware (design §9): will this run fit the chips it is about to rent?

    JAX_PLATFORMS=cpu python -m distillspec_jax.aot --config=configs/jsd.py --topology=v5p-8
    JAX_PLATFORMS=cpu python -m distillspec_jax.aot --config=configs/jsd.py:0.6b-4b --topology=v5e-16 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1

Two checks, both from the config alone: no weights, no network, no accelerator.

  `check_fits` (cheap, no compile; for `experiment.run` before any download or conversion): the bytes per
      chip of what a run keeps resident (target, draft, optimizer state, AdaSPEC's reference, the step's
      gradients), from the parameters' shapes, dtypes and shardings on the config's mesh. A lower bound:
      activations, KV caches and logits come on top. Refuses a config that cannot fit, naming a mesh that can.
  `preflight` (the CLI): builds the config's real mesh over the devices of a TPU topology (libtpu compiles
      for them on a CPU host) and compiles, ahead of time, every program the run executes at its real
      shapes: the distillation step (and AdaSPEC's reference step), the optimizer's initialisation, target
      and on-policy draft generation, and per evaluation temperature the analytic-acceptance generation and
      pass, target-only decoding, the speculative loop at every γ, and the step-cost timing programs. Per
      program and per chip: compile seconds, XLA's argument / temporary / output / generated-code bytes, the
      bytes of the run's other live buffers, their total against the chip's HBM, FLOPs, bytes accessed and
      the compiler's estimated seconds. A run that does not fit exits non-zero with a mesh that fits.

Estimates are labelled as such. XLA's cost analysis counts the body of every loop once (measured: a
fori_loop of 1, 4 or 16 matmuls reports the FLOPs of one), and the model scans over its layers, so the
compiler's FLOPs and seconds are per loop iteration, not per program. Step and block times are therefore
also given as an analytic roofline (`roofline`): FLOPs over the chips' peak and bytes over HBM bandwidth,
from vendor peak figures, at 100% utilisation: lower bounds on time, to be replaced by measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from distillspec_jax import checks, costs, decoding, lenience
from distillspec_jax import errors
from distillspec_jax import evaluate as ev
from distillspec_jax import generate as gen
from distillspec_jax import sharding as shd
from distillspec_jax import speculative
from distillspec_jax import train
from distillspec_jax.data import generators, pipeline
from distillspec_jax.models import catalog, convert, qwen3
from distillspec_jax.costs import CHIPS, GiB, chip
from distillspec_jax.sampling import Sampler
from distillspec_jax.selection import SELECTIONS
from distillspec_jax.tpu_topology import TOPOLOGIES, check_libtpu, topology, topology_devices

HEADROOM = 0.10  # fraction of each chip's HBM left to the runtime (its own buffers, fragmentation)


# ----------------------------------------------------------------------------------------------
# What a config runs: model shapes and program shapes
# ----------------------------------------------------------------------------------------------


class UnknownShapeError(ValueError):
    """A model whose shapes cannot be known without downloading its config (a hub id outside catalog.PRESETS)."""


def model_config(c: ConfigDict, which: str) -> qwen3.Qwen3Config:
    """The Qwen3Config that the prepare stage would load for config.<which>, from shapes known offline: the
    published preset of a hub id, a local checkpoint's config.json, or the :tiny build's fields."""
    m = c[which]
    if m.model == checks.TINY:
        from distillspec_jax import tiny

        # The tiny tokenizer is trained to exactly tiny.vocab_size ids, the models' vocabulary.
        cfg = tiny.model_config(c.tiny.to_dict(), which, c.tiny.vocab_size)
    elif os.path.isdir(m.model):
        cfg = convert.from_hf_config(os.path.join(m.model, "config.json"))
    else:
        try:
            cfg = catalog.preset(m.model)
        except ValueError as e:
            raise UnknownShapeError(f"config.{which}.model={m.model!r}: no shape is known offline ({e}); point it "
                                    "at a local checkpoint folder to pre-flight it") from None
    return cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype)


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The static shapes of a run's programs, from the config alone."""

    train_batch: int  # B: global sequences per optimizer step
    train_len: int  # L: positions of a training sequence, prompt + response budget (upper bound)
    prompt_len: int  # T: padded prompt length of generation and evaluation (upper bound: max_prompt_len padded)
    generate_tokens: int  # N: new tokens of a generated training response
    eval_batch: int  # rows decoded together at evaluation
    eval_tokens: int  # new tokens per evaluation prompt


def run_shapes(c: ConfigDict) -> RunShapes:
    """Upper bounds of the data's shapes: a prompt is at most data.max_prompt_len tokens, padded to pad_multiple
    (the data's longest prompt may pad to less); a response is the generator's budget, or a fixed response of
    up to data.max_response_len when the generator trains on the dataset's (see generators.make_source)."""
    prompt_len = pipeline.round_up(c.data.max_prompt_len, c.data.pad_multiple)
    response = c.generator.max_new_tokens
    if c.generator.kind != "target":
        response = max(response, c.data.max_response_len)
    return RunShapes(train_batch=c.distill.batch_size, train_len=prompt_len + response, prompt_len=prompt_len,
                     generate_tokens=c.generator.max_new_tokens, eval_batch=c.eval.batch_size,
                     eval_tokens=c.eval.max_new_tokens)


def sharded_abstract_model(cfg: qwen3.Qwen3Config, mesh) -> qwen3.Qwen3:
    """The model with ShapeDtypeStruct parameters carrying their shardings on `mesh`: no weights anywhere."""
    graphdef, state = nnx.split(_abstract_model(cfg))
    nnx.replace_by_pure_dict(state, shd.abstract_params(state, mesh))
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg: qwen3.Qwen3Config) -> qwen3.Qwen3:
    return qwen3.abstract_model(cfg)  # seconds for the large presets; shared by every mesh tried


def _abstract(shape: Sequence[int], dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def per_chip_bytes(tree) -> int:
    """Bytes that one device holds of a pytree of sharded abstract arrays (the largest shard of each)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Run:
    """The abstract pieces of one run on one mesh: models, distillers, and the buffers it keeps resident."""

    c: ConfigDict
    mesh: Any  # jax Mesh over a topology's devices, or an AbstractMesh (estimates only)
    shapes: RunShapes
    target: qwen3.Qwen3
    draft: qwen3.Qwen3
    distiller: train.Distiller
    reference_distiller: train.Distiller | None  # a token selection's reference run (AdaSPEC: FKL)
    buffers: dict[str, int]  # per-chip bytes of each resident buffer (see `phases`)


def build_run(c: ConfigDict, mesh) -> Run:
    """The run's models (abstract, sharded on `mesh`) and its Distillers, as the distill stage builds them."""
    from distillspec_jax.stages import distill as distill_stage

    target = sharded_abstract_model(model_config(c, "target"), mesh)
    draft = sharded_abstract_model(model_config(c, "draft"), mesh)
    cfg = distill_stage.train_config(c)
    reference_distiller = reference = None
    if cfg.uses_reference:
        reference_distiller = train.Distiller(cfg.reference_config(), draft, target, mesh)
        reference = draft  # the same shapes and shardings as the draft
    distiller = train.Distiller(cfg, draft, target if cfg.uses_target else None, mesh, reference=reference)
    state = distiller.abstract_state()
    buffers = {
        "target": per_chip_bytes(nnx.state(target)),
        "draft": per_chip_bytes(state.params),
        "opt_state": per_chip_bytes(state.opt_state),
        # The step's gradient of the draft (cast to the parameters' dtype): a temporary of the step, named here
        # so that the cheap estimate counts it; in a compiled report it is inside the step's temporaries.
        "gradients": per_chip_bytes(state.params),
    }
    if reference_distiller is not None:
        buffers["reference"] = buffers["draft"]
        # the distill stage keeps the reference run's LoopResult (its optimizer state too) alive while the main
        # draft trains; counted because that is what the run holds.
        buffers["reference_opt_state"] = buffers["opt_state"]
    if generators.GENERATORS[c.generator.kind].on_policy and c.generator.regenerate_every > 1:
        buffers["draft_snapshot"] = buffers["draft"]  # generators._snapshot copies the generating draft
    return Run(c, mesh, run_shapes(c), target, draft, distiller, reference_distiller, buffers)


def phases(run: Run) -> dict[str, tuple[str, ...]]:
    """The buffers live in each phase of experiment.run (the models stay loaded from prepare to the end)."""
    distill = ["target", "draft", "opt_state", "gradients"]
    distill += [b for b in ("reference", "reference_opt_state", "draft_snapshot") if b in run.buffers]
    return {"data": ("target", "draft"), "eval": ("target", "draft"), "distill": tuple(distill)}


# ----------------------------------------------------------------------------------------------
# The cheap check (no compile)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FitEstimate:
    """Resident bytes per chip of each phase on one mesh: a lower bound (no activations, caches, logits)."""

    chip: str
    num_devices: int
    mesh: dict[str, int]  # data, fsdp, tensor
    hbm_bytes: int
    budget_bytes: int  # hbm_bytes less the headroom
    phase_bytes: dict[str, dict[str, int]]  # phase -> buffer -> bytes per chip
    peak_phase: str
    peak_bytes: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits, "label": "lower bound: weights, optimizer state and "
                "gradients only, from shapes and shardings (no compile)"}


class DoesNotFitError(errors.UserError, ValueError):
    """The config cannot fit the chips' memory; the message names the setting that makes it fit."""


def mesh_flags(mesh: dict[str, int]) -> str:
    return " ".join(f"--config.mesh.{axis}={mesh[axis]}" for axis in shd.MESH_AXES)


def _batch_ok(c: ConfigDict, data: int, fsdp: int) -> bool:
    micro = c.distill.batch_size // max(c.distill.grad_accum_steps, 1)
    return micro % (data * fsdp) == 0 and c.eval.batch_size % (data * fsdp) == 0


def candidate_meshes(c: ConfigDict, num_devices: int) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) over num_devices whose sizes divide the batches and the models' sharded
    dimensions, least model sharding first (data parallelism is cheapest), fsdp before tensor."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    configs = (model_config(c, "target"), model_config(c, "draft"))
    out = []
    for tensor in divisors:
        for fsdp in (d for d in divisors if (num_devices // tensor) % d == 0):
            data = num_devices // (tensor * fsdp)
            if not _batch_ok(c, data, fsdp):
                continue
            mesh = shd.abstract_mesh(data, fsdp, tensor, num_devices)
            try:
                for cfg in configs:
                    shd.state_shardings(nnx.state(_abstract_model(cfg)), mesh)
            except ValueError:  # a dimension the mesh does not divide
                continue
            out.append({"data": data, "fsdp": fsdp, "tensor": tensor})
    return sorted(out, key=lambda m: (m["fsdp"] * m["tensor"], m["tensor"]))


def estimate_fit(c: ConfigDict, device_kind: str, num_devices: int, mesh: dict[str, int] | None = None,
                 headroom: float = HEADROOM) -> FitEstimate:
    """The cheap estimate of config `c` on num_devices chips of device_kind, on `mesh` (default: the config's)."""
    sizes = mesh or {axis: c.mesh[axis] for axis in shd.MESH_AXES}
    amesh = shd.abstract_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], num_devices)
    run = build_run(c, amesh)
    phase_bytes = {name: {b: run.buffers[b] for b in names} for name, names in phases(run).items()}
    peak_phase = max(phase_bytes, key=lambda p: sum(phase_bytes[p].values()))
    hbm = chip(device_kind).hbm_bytes
    return FitEstimate(chip=chip(device_kind).name, num_devices=num_devices, mesh=dict(amesh.shape),
                       hbm_bytes=hbm, budget_bytes=int(hbm * (1 - headroom)), phase_bytes=phase_bytes,
                       peak_phase=peak_phase, peak_bytes=sum(phase_bytes[peak_phase].values()))


def fitting_mesh(c: ConfigDict, device_kind: str, num_devices: int, headroom: float = HEADROOM
                 ) -> dict[str, int] | None:
    """The least-sharded mesh (data parallelism first, then fsdp, then tensor) on which the cheap estimate
    fits, or None when none does: what a launcher or experiment.run could pick instead of a fixed mesh."""
    return next((m for m in candidate_meshes(c, num_devices)
                 if estimate_fit(c, device_kind, num_devices, m, headroom).fits), None)


def check_fits(c: ConfigDict, devices: Sequence[jax.Device] | None = None, *, device_kind: str | None = None,
               num_devices: int | None = None, headroom: float = HEADROOM) -> FitEstimate | None:
    """Refuses (DoesNotFitError) a config whose resident weights, optimizer state and gradients alone exceed
    the chips' memory on its mesh, naming the first mesh that fits; returns the estimate otherwise. Cheap (no
    compile, no weights: seconds, mostly building the abstract models): call it before downloading or
    converting anything. Pass jax devices (default: all), or a device kind and count (e.g. 'NVIDIA H100', 1)
    to check hardware this host does not have. Devices of no known HBM size (CPUs), and models whose shapes
    are not known offline (a hub id outside catalog.PRESETS), are not checked: None, with a warning for the latter."""
    if device_kind is None:
        devices = list(jax.devices() if devices is None else devices)
        device_kind, num_devices = devices[0].device_kind, len(devices)
        if not any(device_kind == k or device_kind.startswith(k) for k in CHIPS):
            return None
    try:
        est = estimate_fit(c, device_kind, num_devices, headroom=headroom)
    except UnknownShapeError as e:
        logging.warning("memory check skipped: %s", e)
        return None
    if est.fits:
        return est
    suggestion = fitting_mesh(c, device_kind, num_devices, headroom)
    phase = est.phase_bytes[est.peak_phase]
    detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in phase.items())
    fix = (f"a mesh that fits: {mesh_flags(suggestion)}" if suggestion else
           f"no mesh of {num_devices} {est.chip} chips fits it: use more chips or smaller models / dtypes")
    raise DoesNotFitError(
        f"config does not fit {num_devices} x {est.chip} ({est.hbm_bytes / GiB:.1f} GiB each, {headroom:.0%} "
        f"headroom) on mesh {est.mesh}: its {est.peak_phase} phase keeps {est.peak_bytes / GiB:.2f} GiB per chip "
        f"resident ({detail} GiB) before any activation; {fix}")


# ----------------------------------------------------------------------------------------------
# The compile pre-flight
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program of the run, ready to lower with abstract arguments."""

    name: str
    lower: Callable[[], Any]  # () -> jax.stages.Lowered
    resident: tuple[str, ...]  # the run's live buffers during this program that are not among its arguments


def _eos_ids(cfg: qwen3.Qwen3Config) -> tuple[int, ...]:
    # The program depends on the number of EOS ids, not their values: one, as the Qwen3 chat template ends a turn.
    return (cfg.vocab_size - 1,)


def programs(run: Run) -> list[Program]:
    """Every program experiment.run executes for this config, in the order it runs them."""
    c, mesh, s, target, draft = run.c, run.mesh, run.shapes, run.target, run.draft
    d = run.distiller
    batch_sh, repl = shd.batch_sharding(mesh, 2), shd.replicated(mesh)
    rng = _abstract((), jax.eval_shape(lambda: jax.random.key(0)).dtype, repl)
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(draft)
    phase = phases(run)
    out: list[Program] = []

    def others(phase_name: str, *taken: str) -> tuple[str, ...]:
        return tuple(b for b in phase[phase_name] if b not in taken)

    def prompts(batch: int, length: int):
        return (_abstract((batch, length), jnp.int32, batch_sh),
                _abstract((batch,), jnp.int32, shd.batch_sharding(mesh, 1)))

    def generate(name, graphdef, state, batch, new_tokens, sampler, sequences, resident, cfg):
        p, lens = prompts(batch, s.prompt_len)
        cache_len = decoding.required_cache_len(s.prompt_len, new_tokens)
        lower = functools.partial(gen._generate_jit.lower, graphdef, state, p, lens, rng, max_new_tokens=new_tokens,
                                  sampler=sampler, eos_ids=_eos_ids(cfg), pad_id=decoding.DEFAULT_PAD_ID,
                                  cache_len=cache_len, return_sequences=sequences)
        out.append(Program(name, lower, resident))

    g = c.generator
    g_sampler = Sampler(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
    if generators.stored_responses(g.kind, g.mix_other, g.logits_of) == "target":
        generate("generate_target_responses", tg, ts, s.train_batch, s.generate_tokens, g_sampler, True,
                 others("data", "target"), target.cfg)

    samplers = [Sampler(temperature=float(t), top_k=c.eval.top_k, top_p=c.eval.top_p) for t in c.eval.temperatures]
    gammas = [int(x) for x in c.eval.gammas]
    forms = lenience.parse_forms(c.eval.lenience)
    eval_cache = s.prompt_len + s.eval_tokens  # evaluate.gamma_sweep's step-cost cache

    def eval_programs(stage: str):
        if c.eval.timing_repeats > 0:
            def decode_steps(name, graphdef, state, cfg, tokens, resident):
                # evaluate.decode_step_seconds builds its cache with KVCache.init outside jit: uncommitted arrays,
                # whose sharding jit leaves to the compiler, as it does for abstract arrays without one.
                cache = jax.eval_shape(lambda: qwen3.KVCache.init(cfg, s.eval_batch, eval_cache))
                first = jax.ShapeDtypeStruct((s.eval_batch,), jnp.int32)
                lower = functools.partial(ev._decode_steps.lower, graphdef, state, cache, first,
                                          steps=c.eval.timing_steps, tokens_per_step=tokens)
                out.append(Program(name, lower, resident))

            decode_steps(f"{stage}/decode_step_target", tg, ts, target.cfg, 1, others("eval", "target"))
            decode_steps(f"{stage}/decode_step_draft", dg, ds, draft.cfg, 1, others("eval", "draft"))
            for gamma in gammas:
                decode_steps(f"{stage}/verify_step_target_g{gamma}", tg, ts, target.cfg, gamma + 1,
                             others("eval", "target"))
        for sampler in samplers:
            t = f"T{sampler.temperature:g}"
            if c.eval.analytic:
                generate(f"{stage}/{t}/analytic_generate_target", tg, ts, s.eval_batch, s.eval_tokens, sampler, True,
                         others("eval", "target"), target.cfg)
                length = s.prompt_len + s.eval_tokens
                sequences = _abstract((s.eval_batch, length), jnp.int32, batch_sh)
                predicts = _abstract((s.eval_batch, length), jnp.bool_, batch_sh)

                def position_sums(name, epsilons, form, quality):
                    lower = functools.partial(ev._position_sums.lower, tg, dg, ts, ds, sequences, predicts,
                                              _abstract((epsilons,), jnp.float32, repl), sampler=sampler,
                                              chunk=min(ev.POSITION_CHUNK, length), lenience=form, quality=quality)
                    out.append(Program(f"{stage}/{t}/{name}", lower, others("eval", "target", "draft")))

                position_sums("analytic_acceptance", 0, None, False)
                if not sampler.greedy and forms:  # the frontier's passes: α̂(ε) per form, quality per output
                    position_sums("frontier_quality_lossless", 0, None, True)
                    for form in forms:
                        position_sums(f"frontier_alpha_hat_{form}", len(c.eval.epsilons), form, False)
                        position_sums(f"frontier_quality_{form}", 1, form, True)
            if c.eval.timing_repeats > 0 and not c.eval.analytic:  # else the analytic pass's program, reused
                generate(f"{stage}/{t}/decode_target", tg, ts, s.eval_batch, s.eval_tokens, sampler, True,
                         others("eval", "target"), target.cfg)
            for gamma in gammas:
                p, lens = prompts(s.eval_batch, s.prompt_len)
                lower = functools.partial(
                    speculative._speculative_jit.lower, tg, dg, ts, ds, p, lens, rng, gamma=gamma,
                    max_new_tokens=s.eval_tokens, sampler=sampler, eos_ids=_eos_ids(target.cfg),
                    pad_id=decoding.DEFAULT_PAD_ID,
                    cache_len=decoding.required_cache_len(s.prompt_len, s.eval_tokens, gamma), return_sequences=False,
                    acceptance="lossless", keep_top_k=0, teacher_temperature=1.0)
                out.append(Program(f"{stage}/{t}/speculative_g{gamma}", functools.partial(lower, None, lenience=None),
                                   others("eval", "target", "draft")))
                if sampler.greedy or not forms:
                    continue
                # The lossy frontier keeps its outputs (their quality is scored): ε traced, one program per form,
                # and the lossless reference run beside them.
                for form in (None, *forms):
                    epsilon = None if form is None else _abstract((), jnp.float32, repl)
                    out.append(Program(f"{stage}/{t}/frontier_speculative_g{gamma}_{form or 'lossless'}",
                                       functools.partial(lower, epsilon, lenience=form, return_sequences=True),
                                       others("eval", "target", "draft")))

    stages = set(x.strip() for x in c.stages.split(","))
    if "eval_before" in stages or "eval_after" in stages:
        eval_programs("eval")  # eval_before and eval_after run the same programs at the same shapes

    if "distill" in stages:
        batch = {"tokens": _abstract((s.train_batch, s.train_len), jnp.int32, batch_sh),
                 "loss_mask": _abstract((s.train_batch, s.train_len), jnp.float32, batch_sh)}

        def step(name, distiller, resident, init_resident):
            state = distiller.abstract_state()
            lower = functools.partial(distiller._step.lower, state, distiller.frozen, batch)
            out.append(Program(name, lower, resident))
            # The optimizer's initialisation: takes the draft's parameters, returns the new optimizer state.
            out.append(Program(f"{name}/init_opt", functools.partial(distiller._init_opt.lower, state.params),
                               init_resident))

        reference = ("reference",) if run.reference_distiller is not None else ()
        if reference:
            # The reference's FKL run (arguments: its state and the target); the main draft's copy stays loaded.
            step("reference_step", run.reference_distiller, ("draft",), ("draft", "target"))
        taken = ("draft", "opt_state", "gradients") + (("target",) if d.spec.uses_target else ()) + reference
        step("distill_step", d, others("distill", *taken), others("distill", "draft", "opt_state", "gradients"))
        if generators.GENERATORS[g.kind].on_policy:
            generate("generate_draft_on_policy", dg, ds, s.train_batch, s.generate_tokens, g_sampler, True,
                     others("distill", "draft", "gradients"), draft.cfg)
    return out


@dataclasses.dataclass
class ProgramReport:
    """Per chip, one compiled program (sizes in bytes, from compiled.memory_analysis())."""

    name: str
    compile_s: float  # wall seconds of lower + compile
    compile_cpu_s: float  # this process's CPU seconds meanwhile (all threads): less sensitive to a busy host
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers: counted once, among the arguments
    generated_code_bytes: int
    resident_bytes: int  # the run's other live buffers (not arguments of this program)
    resident: tuple[str, ...]
    total_bytes: int  # argument + temp + output − alias + generated code + resident
    budget_bytes: int
    flops_per_iteration: float | None  # XLA cost analysis; loop bodies counted once (module docstring)
    bytes_accessed_per_iteration: float | None
    compiler_estimate_s_per_iteration: float | None  # XLA's 'optimal_seconds': an estimate, loop bodies once

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits}


def compile_program(program: Program, run: Run, budget_bytes: int) -> ProgramReport:
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = program.lower().compile()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0] if cost else {}
    resident = sum(run.buffers[b] for b in program.resident)
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.generated_code_size_in_bytes + resident)
    return ProgramReport(
        name=program.name, compile_s=round(seconds, 2), compile_cpu_s=round(cpu_seconds, 2), argument_bytes=int(m.argument_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes), generated_code_bytes=int(m.generated_code_size_in_bytes),
        resident_bytes=int(resident), resident=program.resident, total_bytes=int(total), budget_bytes=budget_bytes,
        flops_per_iteration=cost.get("flops"), bytes_accessed_per_iteration=cost.get("bytes accessed"),
        compiler_estimate_s_per_iteration=cost.get("optimal_seconds"))


def _selected(all_programs: list[Program], only: Sequence[str] | None) -> list[Program]:
    if not only:
        return all_programs
    chosen = [p for p in all_programs if any(p.name.startswith(o) or f"/{o}" in p.name for o in only)]
    if not chosen:
        raise ValueError(f"--programs={','.join(only)} matches none of {[p.name for p in all_programs]}")
    return chosen


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_all(c: ConfigDict, devices: Sequence[jax.Device], only: Sequence[str] | None = None,
                headroom: float = HEADROOM) -> tuple[Run, list[ProgramReport]]:
    """Compiles the selected programs of `c` on its mesh over `devices`; one report per program."""
    from distillspec_jax import experiment

    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    experiment.check_mesh(c, mesh)  # batch sizes against the mesh
    run = build_run(c, mesh)
    budget = int(chip(devices[0].device_kind).hbm_bytes * (1 - headroom))
    reports = []
    for program in _selected(programs(run), only):
        report = compile_program(program, run, budget)
        _log(f"[aot] {report.name}: {report.compile_s:.1f} s to compile; per chip {_size(report.total_bytes)} "
             f"(arguments {_size(report.argument_bytes)}, temporaries {_size(report.temp_bytes)}, outputs not "
             f"aliased {_size(report.output_bytes - report.alias_bytes)}, other resident "
             f"{_size(report.resident_bytes)}) of {_size(budget)}: {'fits' if report.fits else 'DOES NOT FIT'}")
        reports.append(report)
    return run, reports


# ----------------------------------------------------------------------------------------------
# Roofline estimates (analytic, labelled)
# ----------------------------------------------------------------------------------------------


def _decode_step_seconds(cfg: qwen3.Qwen3Config, rows: int, tokens: int, context: int, tensor: int, hw: costs.Chip
                         ) -> float:
    """Roofline of one cached decode step of `tokens` tokens for this chip's `rows` rows: its 1/tensor share of
    every weight and of its rows' KV cache read once (weights gathered over fsdp or replicated), or its FLOPs,
    whichever takes longer."""
    step_bytes = costs.decode_step_bytes(cfg, rows, context, tokens) / tensor
    flops = rows * tokens * costs.forward_flops_per_token(cfg, context) / tensor
    return max(step_bytes / hw.hbm_bytes_per_s, flops / hw.peak_flops)


def _uses_reference(c: ConfigDict) -> bool:
    """Whether the run's token selection trains and reads a reference draft (AdaSPEC)."""
    return SELECTIONS[c.distill.selection].uses_reference


def roofline(c: ConfigDict, device_kind: str, num_devices: int, gamma: int = 4) -> dict[str, Any]:
    """Analytic lower bounds of time at 100% of the vendor peaks (labelled estimates, not measurements): the
    distillation step (FLOPs over all chips: target forward unless the loss has none (cross-entropy) or reads a
    stored teacher, draft forward + backward + remat's second forward, AdaSPEC's reference forward), one
    speculative block at γ (γ draft steps, the first of two tokens, and the
    target's (γ + 1)-token verify call) and one decode step of each model (bytes: weights and KV cache)."""
    data, fsdp, tensor = shd.mesh_sizes(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
    hw, s = chip(device_kind), run_shapes(c)
    target_cfg, draft_cfg = model_config(c, "target"), model_config(c, "draft")
    positions = s.train_batch * s.train_len
    draft_passes = 3 + (1 if c.distill.remat else 0) + (1 if _uses_reference(c) else 0)
    stored_teacher = generators.GENERATORS[c.generator.kind].stored_teacher  # target_logits, serving
    target_passes = 0 if c.distill.divergence == "ce" or stored_teacher else 1
    flops = positions * (draft_passes * costs.forward_flops_per_token(draft_cfg, s.train_len)
                         + target_passes * costs.forward_flops_per_token(target_cfg, s.train_len))
    step_s = flops / (num_devices * hw.peak_flops)
    rows = max(s.eval_batch // (data * fsdp), 1)
    context = decoding.required_cache_len(s.prompt_len, s.eval_tokens, gamma)
    draft_s = (_decode_step_seconds(draft_cfg, rows, 2, context, tensor, hw)
               + (gamma - 1) * _decode_step_seconds(draft_cfg, rows, 1, context, tensor, hw))
    verify_s = _decode_step_seconds(target_cfg, rows, gamma + 1, context, tensor, hw)
    decode_context = s.prompt_len + s.eval_tokens
    return {
        "label": "analytic roofline at 100% of vendor peak FLOP/s and HBM bandwidth (lower bounds: no collectives, "
                 "no sampler, no overlap losses): estimates, not measurements",
        "chip": hw.name, "num_devices": num_devices, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "distill_step_s": step_s, "distill_step_flops": flops, "distill_positions_per_s": positions / step_s,
        "gamma": gamma, "speculative_block_s": draft_s + verify_s, "speculative_block_draft_s": draft_s,
        "speculative_block_verify_s": verify_s,
        "target_decode_step_s": _decode_step_seconds(target_cfg, rows, 1, decode_context, tensor, hw),
        "draft_decode_step_s": _decode_step_seconds(draft_cfg, rows, 1, decode_context, tensor, hw),
    }


def _generate_seconds(cfg: qwen3.Qwen3Config, batch: int, prompt_len: int, new_tokens: int, mesh: tuple[int, int, int],
                      hw: costs.Chip) -> float:
    """Roofline of one `generate` call: the prefill's FLOPs over every chip, then new_tokens decode steps."""
    data, fsdp, tensor = mesh
    chips = data * fsdp * tensor
    prefill = batch * prompt_len * costs.forward_flops_per_token(cfg, prompt_len) / (chips * hw.peak_flops)
    rows = max(batch // (data * fsdp), 1)
    return prefill + new_tokens * _decode_step_seconds(cfg, rows, 1, prompt_len + new_tokens, tensor, hw)


def run_seconds(c: ConfigDict, device_kind: str, num_devices: int, *, train_examples: int | None = None,
                alpha: float = 0.6) -> dict[str, float]:
    """Roofline seconds of each stage of experiment.run (analytic lower bounds, labelled estimates):
    data (target responses for every training prompt when the generator needs them, and with target_logits the
    target's forward pass that stores their top-k), one evaluation (eval_before or eval_after: per temperature
    the analytic pass, the timed target-only decode and the speculative loop at every γ, each timed run and its
    warm-up), distill (the steps, with on-policy generation of every batch; with serving, the speculative decoding
    of every served request at serving.gamma) and AdaSPEC's reference run. A speculative run is taken to last
    N / τ̂(γ) blocks with τ̂ from an assumed acceptance rate `alpha` (the measured one is known only after).
    train_examples: the training split's size when config.data.num_train_examples is -1 (all)."""
    hw, s = chip(device_kind), run_shapes(c)
    mesh = shd.mesh_sizes(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
    target_cfg, draft_cfg = model_config(c, "target"), model_config(c, "draft")
    examples = c.data.num_train_examples if c.data.num_train_examples >= 0 else train_examples
    if examples is None:
        raise ValueError("config.data.num_train_examples is -1 (the whole split): pass train_examples, its size")
    g = c.generator
    needs_target = generators.stored_responses(g.kind, g.mix_other, g.logits_of) == "target"
    data_s = (-(-examples // s.train_batch) * _generate_seconds(target_cfg, s.train_batch, s.prompt_len,
                                                                s.generate_tokens, mesh, hw)) if needs_target else 0.0
    if generators.GENERATORS[g.kind].stores_logits:  # one target forward over every training sequence
        data_s += examples * s.train_len * costs.forward_flops_per_token(target_cfg, s.train_len) / (
            num_devices * hw.peak_flops)
    step = roofline(c, device_kind, num_devices)["distill_step_s"]
    if generators.GENERATORS[g.kind].on_policy:  # every batch is generated by the current draft
        step += _generate_seconds(draft_cfg, s.train_batch, s.prompt_len, s.generate_tokens, mesh, hw)
    distill_s = c.distill.steps * step
    if g.kind == "serving":  # requests served in batches of distill.batch_size, N / τ̂ blocks each (block costs
        # at the evaluation's rows per chip: decode steps are weight-bound, so the rows barely matter)
        batches_served = -(-c.distill.steps // c.serving.steps_per_update) * (
            c.serving.requests_per_update // s.train_batch)
        serving_gamma = int(c.serving.gamma)
        blocks = s.generate_tokens / ev.expected_block_efficiency(alpha, serving_gamma)
        distill_s += batches_served * blocks * roofline(c, device_kind, num_devices, serving_gamma)["speculative_block_s"]
    reference_s = 0.0
    if _uses_reference(c):
        reference_s = (c.distill.reference_steps or c.distill.steps) * step
    runs = c.eval.timing_repeats + 1  # timed runs and one warm-up
    batches = c.eval.num_prompts // c.eval.batch_size
    target_decode = _generate_seconds(target_cfg, s.eval_batch, s.prompt_len, s.eval_tokens, mesh, hw)
    per_temperature = target_decode * (c.eval.analytic + (runs if c.eval.timing_repeats > 0 else 0))
    for gamma in c.eval.gammas:
        blocks = s.eval_tokens / ev.expected_block_efficiency(alpha, int(gamma))
        per_temperature += runs * blocks * roofline(c, device_kind, num_devices, int(gamma))["speculative_block_s"]
    eval_s = batches * len(c.eval.temperatures) * per_temperature
    return {"data_s": data_s, "eval_s": eval_s, "distill_s": distill_s, "reference_s": reference_s,
            "distill_step_s": step, "alpha_assumed": alpha}


# ----------------------------------------------------------------------------------------------
# The pre-flight
# ----------------------------------------------------------------------------------------------


def _with_mesh(c: ConfigDict, mesh: dict[str, int]) -> ConfigDict:
    c = ConfigDict(c.to_dict())  # unlocked copy
    c.mesh.update(mesh)
    return c


EXIT_DOES_NOT_FIT = 3  # the CLI's exit status for a refused config (2: bad input; 1: Python's own failures)
LOCAL = "local"  # --topology=local: this host's own devices (e.g. its GPUs) instead of a TPU topology


def preflight(c: ConfigDict, topology_name: str, *, only: Sequence[str] | None = None, headroom: float = HEADROOM,
              search: int = 3, estimate_only: bool = False, hosts: int = 1) -> dict[str, Any]:
    """Compiles every program of `c` for a TPU topology (or, with 'local', for this host's devices) and reports
    per chip (one JSON-serialisable dict). A config the cheap estimate refuses is not compiled.

    hosts (local only): the job spans this many hosts like this one; only the estimate is then possible.
    When a program does not fit, tries up to `search` other meshes (least sharding first, those the cheap
    estimate already refuses skipped), compiling the programs that did not fit, and names the first that fits.
    """
    from distillspec_jax import experiment

    experiment.validate(c)
    if topology_name == LOCAL:
        devices = jax.devices()
        num_devices = len(devices) * hosts
        estimate_only = estimate_only or hosts > 1  # one host cannot compile for the others' devices
        topo = {"name": LOCAL, "topology_name": None, "hosts": hosts}
    else:
        if hosts != 1:
            raise ValueError(f"hosts={hosts} applies to --topology={LOCAL}; a TPU topology names its own hosts")
        devices = topology_devices(topology_name)
        num_devices = len(devices)
        topo = {"name": topology_name, "topology_name": topology(topology_name).topology_name,
                "hosts": len({d.process_index for d in devices})}
    kind = devices[0].device_kind
    hw = chip(kind)
    mesh = dict(zip(shd.MESH_AXES, shd.mesh_sizes(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)))
    estimate = estimate_fit(c, kind, num_devices, headroom=headroom)
    compiling = estimate.fits and not estimate_only
    reports = compile_all(c, devices, only, headroom)[1] if compiling else []
    largest = max(reports, key=lambda r: r.total_bytes) if reports else None
    fits = estimate.fits and all(r.fits for r in reports)
    versions = {"jax": jax.__version__, "flax": importlib.metadata.version("flax")}
    if topology_name != LOCAL:
        versions["libtpu"] = check_libtpu()
    result: dict[str, Any] = {
        "tool": "distillspec_jax.aot",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": versions,
        "models": {"target": c.target.model, "draft": c.draft.model},
        "topology": {**topo, "devices": num_devices, "device_kind": kind},
        "chip": {"name": hw.name, "hbm_bytes": hw.hbm_bytes, "headroom": headroom,
                 "budget_bytes": int(hw.hbm_bytes * (1 - headroom))},
        "mesh": mesh,
        "shapes": dataclasses.asdict(run_shapes(c)),
        "estimate": estimate.to_json(),
        "compiled": compiling,
        "programs": [r.to_json() for r in reports],
        "largest": None if largest is None else {"name": largest.name, "total_bytes": largest.total_bytes},
        "compile_s_total": round(sum(r.compile_s for r in reports), 1),
        "fits": fits,
        "roofline": roofline(c, kind, num_devices),
        "suggested_mesh": None,
        # When the estimate refuses: the first mesh whose resident weights fit (not compiled unless searched).
        "estimate_suggested_mesh": None,
        "search": [],
    }
    if not estimate.fits:
        result["estimate_suggested_mesh"] = fitting_mesh(c, kind, num_devices, headroom)
    if not fits and not estimate_only:
        # Compile what did not fit (everything selected, when the estimate already refused) on other meshes.
        failing = [r.name for r in reports if not r.fits] or only
        tried = 0
        for candidate in candidate_meshes(c, num_devices):
            if candidate == mesh or not estimate_fit(c, kind, num_devices, candidate, headroom).fits:
                continue
            if tried == search:
                break
            tried += 1
            _log(f"[aot] trying mesh {candidate}")
            _, trial = compile_all(_with_mesh(c, candidate), devices, failing, headroom)
            worst = max(trial, key=lambda r: r.total_bytes)
            ok = all(r.fits for r in trial)
            result["search"].append({"mesh": candidate, "fits": ok, "programs": [r.name for r in trial],
                                     "largest": worst.name, "total_bytes": worst.total_bytes})
            if ok:
                result["suggested_mesh"] = candidate
                break
    return result


def verdict(result: dict[str, Any]) -> str:
    """One line: fits, or does not fit and what to change."""
    budget = result["chip"]["budget_bytes"]
    head = (f"{result['topology']['name']} ({result['topology']['devices']} x {result['chip']['name']}, "
            f"{budget / GiB:.1f} GiB budget per chip), mesh {result['mesh']}")
    if result["largest"] is None:
        est = result["estimate"]
        head += (f": resident weights, optimizer state and gradients need {est['peak_bytes'] / GiB:.2f} GiB per chip"
                 f"{'' if result['compiled'] else ' (estimate; programs not compiled)'}")
    else:
        head += (f": largest program {result['largest']['name']} needs "
                 f"{result['largest']['total_bytes'] / GiB:.2f} GiB per chip")
    if result["fits"]:
        return f"fits: {head}"
    if result["suggested_mesh"]:
        fix = f"a mesh that fits (compiled): {mesh_flags(result['suggested_mesh'])}"
    elif result["estimate_suggested_mesh"]:
        fix = (f"the resident weights fit on {mesh_flags(result['estimate_suggested_mesh'])} (estimate; rerun the "
               "pre-flight with it)")
    else:
        fix = "no mesh tried fits: use more chips, shorter sequences or smaller batches"
    return f"DOES NOT FIT: {head}; {fix}"


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    if f.topology != LOCAL and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # compile for the topology; never touch a local accelerator
    try:
        result = preflight(f.config, f.topology, only=[p for p in f.programs.split(",") if p] or None,
                           headroom=f.headroom, search=f.search, estimate_only=f.estimate_only, hosts=f.hosts)
    except (ValueError, RuntimeError) as e:  # bad topology, libtpu, config: one clear line, exit 2
        print(f"[aot] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=1)
    print(json.dumps(result), flush=True)
    _log(f"[aot] {verdict(result)}")
    sys.exit(0 if result["fits"] else EXIT_DOES_NOT_FIT)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<divergence>.py[:preset]", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU slice ({', '.join(list(TOPOLOGIES)[:6])}, ...), raw (v5e:2x2), "
                        f"or '{LOCAL}' (this host's devices, e.g. its GPUs)")
    flags.DEFINE_string("programs", "", "comma-separated program names (or prefixes) to compile; '' = all")
    flags.DEFINE_float("headroom", HEADROOM, "fraction of each chip's HBM left to the runtime")
    flags.DEFINE_integer("search", 3, "meshes to compile when the config's does not fit")
    flags.DEFINE_bool("estimate_only", False, "only the cheap estimate (no compile): seconds")
    flags.DEFINE_integer("hosts", 1, f"with --topology={LOCAL}: hosts like this one in the job (estimate only)")
    flags.DEFINE_string("json", "", "also write the report to this file")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
