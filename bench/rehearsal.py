"""Real-shape rehearsal: the whole `main.py` pipeline at the exact Qwen3-0.6B draft and Qwen3-1.7B target
shapes, with random weights and the real dtypes, on whatever this machine has (issue 13, design §9).

    python -m bench.rehearsal --out=/tmp/rehearsal > rehearsal.json

What it runs is `experiment.run` on `configs/jsd.py:0.6b-1.7b` as a user would, with only sizes lowered: a
bfloat16 target, a float32 master draft with bfloat16 compute, remat in training, the chunked loss, every
stage (prepare converts the two HF checkpoints, data, eval_before, distill, eval_after, report). The
checkpoints are written once by `export_hf` from random weights (bfloat16, sharded with an index, as the Hub
ships them) and the Qwen3 tokenizer is the offline one. Per stage it prints the wall time, the time XLA spent
compiling (JAX's own compile-duration events) and the peak resident memory of the process (Linux VmHWM, reset
at each stage start), and checks the peak against 1.3 x what training must hold: parameters of both models,
Adam's two moments, one gradient, and the largest batch's activations (formula in `activation_bytes`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

# XLA:CPU has no bfloat16 matmul: it converts each bfloat16 dot's operands to float32, and its loop-invariant
# code motion then hoists that conversion of the stacked layer weights out of the layer scan, so every program
# keeps a float32 copy of each bfloat16 model alive (6.9 GB for Qwen3-1.7B). Accelerators multiply bfloat16
# natively and make no such copy; with JAX_PLATFORMS=cpu the pass is turned off (measured in docs/scale.md).
# Set before JAX starts its backend.
CPU_XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
if os.environ.get("JAX_PLATFORMS") == "cpu" and "xla_disable_hlo_passes" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()

import jax  # noqa: E402

from bench import common  # noqa: E402
from configs import jsd  # noqa: E402
from distillspec_jax import experiment  # noqa: E402
from distillspec_jax.models import catalog, convert, qwen3  # noqa: E402

DRAFT, TARGET = "Qwen3-0.6B", "Qwen3-1.7B"
MEMORY_BOUND_FACTOR = 1.3  # allowed peak RSS over the training state and the largest batch's activations
MIN_PROGRAM_COMPILE_S = 1.0  # programs listed by name per stage (the many tiny ones are only counted)
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/jaxpr_trace_duration")


class StageMeter:
    """Wall time, compile time (summed JAX compile events), the programs XLA compiled (with how often) and
    peak RSS of each stage of one process."""

    def __init__(self):
        self.compile_s = 0.0
        self.compiles: list[tuple[str, float]] = []  # (program name, backend compile seconds), in order
        self.stages: dict[str, dict[str, Any]] = {}
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.compile_s += duration
        if event == COMPILE_EVENTS[0] and "fun_name" in kwargs:  # the backend compile names its program
            self.compiles.append((str(kwargs["fun_name"]), duration))

    def _programs(self, since: int) -> dict[str, dict[str, float]]:
        """Programs that took over MIN_PROGRAM_COMPILE_S to compile, with their count and seconds."""
        programs: dict[str, dict[str, float]] = {}
        for name, seconds in self.compiles[since:]:
            entry = programs.setdefault(name, {"compiles": 0, "seconds": 0.0})
            entry["compiles"] += 1
            entry["seconds"] += seconds
        return {k: v for k, v in programs.items() if v["seconds"] >= MIN_PROGRAM_COMPILE_S}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        reset_peak_rss()
        compile_start, start, logged = self.compile_s, time.perf_counter(), len(self.compiles)
        try:
            yield
        finally:
            self.stages[stage] = {"wall_s": time.perf_counter() - start, "compile_s": self.compile_s - compile_start,
                                  "peak_rss_bytes": peak_rss_bytes(), "compiles": len(self.compiles) - logged,
                                  "programs": self._programs(logged)}
            common.log(f"{stage}: {self.stages[stage]}")


def reset_peak_rss() -> None:
    """Resets the kernel's high-water mark of this process's resident set (Linux: clear_refs 5)."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def activation_bytes(draft: qwen3.Qwen3Config, target: qwen3.Qwen3Config, batch: int, seq: int, chunk: int) -> int:
    """What one training step's forward and backward hold at once, with remat and the chunked loss:
    one [B, T, D] residual per draft layer (compute dtype), one draft layer recomputed in full (its q, k, v,
    attention scores in float32, MLP activations), the target's hidden states [B, T, D], and per loss chunk
    the float32 [B, C, V] logits, log-probabilities and their gradient for both models (6 buffers)."""
    b, t = batch, seq
    act = qwen3.DTYPES[draft.dtype].dtype.itemsize
    residuals = draft.num_hidden_layers * b * t * draft.hidden_size * act
    n, k, h, f = draft.num_attention_heads, draft.num_key_value_heads, draft.head_dim, draft.intermediate_size
    one_layer = b * t * ((n + 2 * k) * h + 3 * f + 2 * draft.hidden_size) * act + 2 * b * n * t * t * 4
    target_hidden = b * t * target.hidden_size * qwen3.DTYPES[target.dtype].dtype.itemsize
    loss_chunk = 6 * b * min(chunk or t, t) * draft.vocab_size * 4
    return residuals + one_layer + target_hidden + loss_chunk


def write_checkpoints(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Random HF checkpoints at the real shapes (bfloat16 safetensors with an index, the Qwen3 tokenizer);
    written once and reused by later rehearsals."""
    from distillspec_jax import tokenizer as tok

    folders = {}
    for name in (DRAFT, TARGET):
        folder = root / name
        if not (folder / convert.CONFIG_FILE).is_file():
            common.log(f"writing a random {name} checkpoint to {folder}")
            tokenizer_dir = root / "tokenizer"
            tok.offline_qwen3_tokenizer().save_pretrained(tokenizer_dir)
            model = qwen3.init_model(catalog.preset(name, param_dtype="bfloat16", dtype="bfloat16"),
                                     seed=len(folders))
            convert.export_hf(model, folder, dtype="bfloat16", tokenizer_from=tokenizer_dir,
                              max_shard_bytes=1 << 30)
            del model
        folders[name] = folder
    return folders


def rehearsal_config(folders: dict[str, pathlib.Path], args: argparse.Namespace):
    c = jsd.get_config("0.6b-1.7b")
    c.draft.model, c.target.model = str(folders[DRAFT]), str(folders[TARGET])
    c.tokenizer = "qwen3_offline"
    c.data.update(source="humaneval", name="", split="train", eval_split="", task="humaneval",
                  max_prompt_len=args.prompt_len, pad_multiple=args.prompt_len, num_train_examples=16)
    c.generator.max_new_tokens = args.new_tokens
    c.distill.update(steps=args.steps, batch_size=args.batch, warmup_steps=1, checkpoint_every=args.steps,
                     log_every=1)
    c.eval.update(gammas=tuple(args.gammas), temperatures=tuple(args.temperatures), num_prompts=args.eval_prompts, batch_size=args.eval_prompts,
                  max_new_tokens=args.new_tokens, timing_repeats=1, timing_steps=args.timing_steps)
    c.plots = False
    c.compilation_cache = ""  # every compile is counted, as on a fresh machine
    return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the checkpoints (reused) and the workdir (fresh)")
    parser.add_argument("--steps", type=int, default=2, help="distillation steps")
    parser.add_argument("--batch", type=int, default=2, help="distillation batch (sequences)")
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens (the padded prompt length)")
    parser.add_argument("--new_tokens", type=int, default=8, help="generated tokens (data and evaluation)")
    parser.add_argument("--timing_steps", type=int, default=2, help="decode steps per timed call (c, verify cost)")
    parser.add_argument("--eval_prompts", type=int, default=4, help="evaluation prompts (one batch)")
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 3], help="draft block lengths")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                        help="evaluation temperatures (sampling, the path with the residual draw; 0 adds greedy)")
    parser.add_argument("--write_checkpoints_only", action="store_true",
                        help="only write the random checkpoints (the measured run does this in a child process, so "
                             "that building them leaves nothing in its memory)")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    if args.write_checkpoints_only:
        return {"checkpoints": {k: str(v) for k, v in write_checkpoints(out / "checkpoints").items()}}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.rehearsal", f"--out={out}", "--write_checkpoints_only"],
                   check=True, stdout=subprocess.DEVNULL)
    folders = write_checkpoints(out / "checkpoints")  # written by the child: only resolves the folders
    workdir = out / f"run-{int(time.time())}"
    c = rehearsal_config(folders, args)
    meter = StageMeter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON object; progress goes to stderr
        experiment.run(c, str(workdir), observe=meter)

    draft_cfg = catalog.preset(DRAFT, param_dtype=c.draft.param_dtype, dtype=c.draft.dtype)
    target_cfg = catalog.preset(TARGET, param_dtype=c.target.param_dtype, dtype=c.target.dtype)
    param_bytes = {name: cfg.num_params() * qwen3.DTYPES[cfg.param_dtype].dtype.itemsize
                   for name, cfg in (("draft", draft_cfg), ("target", target_cfg))}
    seq = args.prompt_len + args.new_tokens
    seq = -(-seq // c.data.pad_multiple) * c.data.pad_multiple  # the batcher pads to pad_multiple
    state = {"params": sum(param_bytes.values()), "adam_moments": 2 * param_bytes["draft"],
             "gradients": param_bytes["draft"],
             "activations_estimate": activation_bytes(draft_cfg, target_cfg, args.batch, seq, c.distill.loss_chunk)}
    bound = MEMORY_BOUND_FACTOR * sum(state.values())
    peak = max(s["peak_rss_bytes"] for s in meter.stages.values())
    return {
        "benchmark": "rehearsal",
        "machine": common.machine_info(),
        "draft": {"shape": DRAFT, "param_dtype": c.draft.param_dtype, "dtype": c.draft.dtype,
                  "params": draft_cfg.num_params()},
        "target": {"shape": TARGET, "param_dtype": c.target.param_dtype, "dtype": c.target.dtype,
                   "params": target_cfg.num_params()},
        "settings": {"steps": args.steps, "batch": args.batch, "seq": seq, "remat": c.distill.remat,
                     "loss_chunk": c.distill.loss_chunk, "gammas": args.gammas,
                     "temperatures": list(c.eval.temperatures), "eval_prompts": args.eval_prompts,
                     "new_tokens": args.new_tokens},
        "stages": meter.stages,
        "run_wall_s": sum(s["wall_s"] for s in meter.stages.values()),
        "total_wall_s": time.perf_counter() - start,
        "memory": {"training_state_bytes": state, "bound_bytes": bound, "peak_rss_bytes": peak,
                   "within_bound": peak <= bound},
    }


if __name__ == "__main__":
    common.print_json(main())
