"""Distillation train-step throughput: tokens/s, MFU and peak memory of `train.Distiller.step` (student
forward + backward + AdamW, frozen teacher forward), with the chunked loss on and off, and with the teacher
online (in memory, a forward pass per step) or stored (its top-k per position read with the batch, no teacher).

    python -m bench.distill_step                                                   # CPU: small shapes
    python -m bench.distill_step --teachers=online,64 --loss_chunks=128            # online against stored top-64
    python -m bench.distill_step --student=0.6b --teacher=1.7b --dtype=bfloat16 --seq_len=1024 --batch=8   # GPU
    python -m bench.distill_step --loop_steps=16 --log_every=1,8                   # and the training loop around it

FLOPs per token (model FLOPs, PaLM's convention): 6·N_student + 2·N_teacher for the matmul weights (N counts
every weight used in a matmul, the LM head included, an untied input embedding excluded), plus attention:
3 · 4·L·N_heads·H·T for the student (forward and backward) and 4·L·N_heads·H·T for the teacher, with the
full T keys a position's attention computes. Recomputation (the chunked loss re-forms each chunk's logits in
the backward pass; --remat recomputes layers) is work the hardware does but is not counted, so MFU is a
lower bound on hardware utilisation.

With --loop_steps, each configuration also runs `train.run` (the training loop: batches to the devices, the
step, metrics pulled every log_every steps, progress lines, the metrics file and a final checkpoint) over that
many steps of the same batch, and reports its wall seconds per step from the request of the second batch to the
loop's return: a step's loop overhead is loop_step_s / step_s − 1.

Peak FLOP/s: the bfloat16 dense datasheet figure of a known GPU/TPU (H100/H200 989e12, A100 312e12, TPU v4
275e12, v5e 197e12, v5p 459e12), otherwise (a CPU) measured with a jitted matmul in the compute dtype.
Peak memory: on GPU/TPU `device.memory_stats()['peak_bytes_in_use']` after the timed steps; everywhere the
compiled step's own estimate from `memory_analysis()` (arguments + outputs − donated aliases + temporaries).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from bench import common
from distillspec_jax import sharding as shd
from distillspec_jax import train
from distillspec_jax.data import teacher_store
from distillspec_jax.models import qwen3
from distillspec_jax.sparse_teacher import TEACHER_KEYS


def step_flops_per_token(student: qwen3.Qwen3Config, teacher: qwen3.Qwen3Config | None,
                         seq_len: int) -> dict[str, float]:
    """Model FLOPs per token; teacher None: a stored teacher, whose forward pass the step does not run."""
    student_attn = 3 * common.attention_flops_per_token(student, seq_len)
    teacher_attn = 0.0 if teacher is None else common.attention_flops_per_token(teacher, seq_len)
    matmul = 6.0 * common.matmul_params(student) + (0.0 if teacher is None else 2.0 * common.matmul_params(teacher))
    return {"matmul": matmul, "attention": student_attn + teacher_attn,
            "total": matmul + student_attn + teacher_attn}


def memory_analysis(compiled) -> dict[str, Any]:
    """The compiled executable's own memory figures (bytes), or why they are unavailable."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # some backends do not implement it
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    if stats is None:
        return {"available": False, "reason": "memory_analysis() returned None on this backend"}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out: dict[str, Any] = {"available": True, **{f: int(getattr(stats, f, 0)) for f in fields}}
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def device_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 (GPU/TPU); None where the runtime keeps no such statistic (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def random_batch(batch: int, seq_len: int, cfg: qwen3.Qwen3Config, seed: int) -> dict[str, np.ndarray]:
    """Random token ids; the loss counts the second half of each row (the response after a prompt)."""
    tokens = np.random.default_rng(seed).integers(0, cfg.real_vocab_size, size=(batch, seq_len), dtype=np.int32)
    loss_mask = np.zeros((batch, seq_len), np.float32)
    loss_mask[:, seq_len // 2: seq_len - 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def stored_teacher_arrays(teacher: qwen3.Qwen3, tokens_bt: np.ndarray, k: int, chunk: int) -> dict[str, np.ndarray]:
    """The teacher's top-k at every position of the batch, as a stored-teacher batch carries it."""
    top = jax.jit(teacher_store.teacher_top_k, static_argnames=("k", "temperature", "chunk"))(
        teacher, jax.numpy.asarray(tokens_bt), k=k, temperature=1.0, chunk=chunk)
    return dict(zip(TEACHER_KEYS, shd.to_host(top)))


def loop_step_seconds(distiller: train.Distiller, local: dict[str, np.ndarray]) -> dict[str, Any]:
    """train.run over distiller.cfg.steps steps of `local`: wall seconds per step once compiled (from the request of
    the second batch, when the first step has been compiled and dispatched, to the loop's return, its final
    checkpoint included)."""
    steps, requested = distiller.cfg.steps, []

    def batches(position, context):
        del position, context
        while True:
            requested.append(time.perf_counter())
            yield local

    # The loop's progress lines go to stderr: stdout is the benchmark's JSON.
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        result = train.run(distiller, batches, workdir)
        end = time.perf_counter()
    return {"log_every": distiller.cfg.log_every, "steps": steps, "step_s": (end - requested[1]) / (steps - 1),
            "loss": result.last_metrics.get("loss")}


def measure(args: argparse.Namespace, loss_chunk: int, student_cfg: qwen3.Qwen3Config, teacher: qwen3.Qwen3,
            mesh, flops_per_token: float, peak: float, stored_k: int = 0) -> dict[str, Any]:
    """One configuration: compile, then the median step time over args.runs steps. stored_k > 0: the teacher's
    top-k comes with the batch and the step holds no teacher."""
    cfg = train.TrainConfig(divergence=args.divergence, loss_chunk=loss_chunk, warmup_steps=1, remat=args.remat,
                            steps=max(2, args.runs + 2), batch_size=args.batch, grad_clip_norm=1.0,
                            stored_teacher=stored_k > 0)
    # A fresh student per configuration: the step donates the state, whose first buffers are the model's own.
    distiller = train.Distiller(cfg, common.build_model(student_cfg, args.seed), None if stored_k else teacher, mesh)
    local = random_batch(args.batch, args.seq_len, student_cfg, args.seed)
    if stored_k:
        local.update(stored_teacher_arrays(teacher, local["tokens"], stored_k, loss_chunk or 128))
    batch = distiller.global_batch(local)
    state = distiller.init_state()

    # The step compiled ahead of time (the distiller's own jitted step, state donated, the frozen teacher an
    # argument so that its parameters are counted), so that its memory analysis and its compile time come from
    # the executable that is then timed, compiled once.
    start = time.perf_counter()
    compiled = distiller._step.lower(state, distiller.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], distiller.frozen, batch)
        return holder["state"], metrics

    first_s, step_s, (_, metrics) = common.first_and_median(one_step, args.runs)
    tokens = args.batch * args.seq_len
    achieved = flops_per_token * tokens / step_s
    loops = []
    for every in args.log_every if args.loop_steps else ():
        loop_cfg = dataclasses.replace(cfg, steps=args.loop_steps, log_every=every, checkpoint_every=args.loop_steps)
        loop_distiller = train.Distiller(loop_cfg, common.build_model(student_cfg, args.seed),
                                         None if stored_k else teacher, mesh)
        loop = loop_step_seconds(loop_distiller, local)
        loops.append({**loop, "tokens_per_s": tokens / loop["step_s"], "overhead": loop["step_s"] / step_s - 1})
    return {
        "teacher": f"stored top-{stored_k}" if stored_k else "online",
        "batch_bytes": int(sum(np.asarray(v).nbytes for v in local.values())),
        "loss_chunk": loss_chunk, "step_s": step_s, "first_call_s": first_s, "compile_s": compile_s,
        "tokens_per_s": tokens / step_s, "model_flops_per_s": achieved, "mfu": achieved / peak,
        "loss": float(metrics["loss"]), "peak_bytes_in_use": device_peak_bytes(),
        "compiled_memory": memory_analysis(compiled), "loop": loops,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="small-draft", choices=common.MODEL_CHOICES, help="student (draft) shape")
    parser.add_argument("--teacher", default="small", choices=common.MODEL_CHOICES, help="teacher (target) shape")
    parser.add_argument("--dtype", default="float32", choices=sorted(qwen3.DTYPES),
                        help="compute dtype of both models and the teacher's parameter dtype")
    parser.add_argument("--student_param_dtype", default="float32", choices=sorted(qwen3.DTYPES),
                        help="the student's parameter (and optimizer state) dtype")
    parser.add_argument("--vocab_size", type=int, default=None, help="override both shapes' vocabulary size")
    parser.add_argument("--remat", action="store_true", help="rematerialise the student's layers")
    parser.add_argument("--divergence", default="fkl", help="registered divergence (fkl | rkl | jsd | tvd)")
    parser.add_argument("--batch", type=int, default=8, help="global batch B (sequences per step)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens T per sequence")
    parser.add_argument("--loss_chunks", type=common.int_list_or_zero, default=[128, 0],
                        help="loss chunk sizes to compare; 0 = unchunked")
    parser.add_argument("--teachers", default="online",
                        help="comma-separated: online (teacher in memory) and/or k (stored top-k, no teacher)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    parser.add_argument("--runs", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--loop_steps", type=int, default=0, help="also time train.run over this many steps (0 = off)")
    parser.add_argument("--log_every", type=common.int_list, default=[1, 8],
                        help="with --loop_steps: the loop's log_every values to compare")
    args = parser.parse_args(argv)
    if args.loop_steps == 1 or args.loop_steps < 0:
        parser.error(f"--loop_steps must be 0 (off) or at least 2, got {args.loop_steps}")

    teacher_cfg = common.model_config(args.teacher, args.dtype, args.vocab_size)
    student_cfg = common.model_config(args.student, args.dtype, args.vocab_size).replace(
        param_dtype=args.student_param_dtype)
    if (student_cfg.vocab_size, student_cfg.real_vocab_size) != (teacher_cfg.vocab_size, teacher_cfg.real_vocab_size):
        parser.error(f"student and teacher vocabularies differ ({student_cfg.vocab_size} vs {teacher_cfg.vocab_size}); "
                     "pick shapes of one family or set --vocab_size")
    common.log(f"student {args.student} ({student_cfg.num_params() / 1e6:.1f}M), teacher {args.teacher} "
               f"({teacher_cfg.num_params() / 1e6:.1f}M), B={args.batch} T={args.seq_len}")
    teacher = common.build_model(teacher_cfg, args.seed + 1)
    mesh = shd.make_mesh(-1, 1, 1)  # data parallel over every local device (one GPU: a single device)
    flops = step_flops_per_token(student_cfg, teacher_cfg, args.seq_len)
    stored_flops = step_flops_per_token(student_cfg, None, args.seq_len)
    peak = common.peak_flops(args.dtype)
    total_peak = peak["peak_flops"] * jax.device_count()

    results = []
    for which in args.teachers.split(","):
        stored_k = 0 if which == "online" else int(which)
        for chunk in args.loss_chunks:
            common.log(f"teacher={which} loss_chunk={chunk}")
            per_token = (stored_flops if stored_k else flops)["total"]
            results.append(measure(args, chunk, student_cfg, teacher, mesh, per_token, total_peak, stored_k))
    return {
        "benchmark": "distill_step",
        "machine": common.machine_info(),
        "student": {"model": args.student, **common.describe(student_cfg), "remat": args.remat},
        "teacher": {"model": args.teacher, **common.describe(teacher_cfg)},
        "divergence": args.divergence, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_step": args.batch * args.seq_len, "runs": args.runs,
        "timing": "median of runs after one compiling call; block_until_ready (evaluate.median_seconds)",
        "flops_per_token": flops, "stored_teacher_flops_per_token": stored_flops, "peak": peak, "devices": jax.device_count(),
        "results": results,
    }


if __name__ == "__main__":
    common.print_json(main())
