"""Target-only autoregressive decode: our jitted `generate` against the memory roofline and against
transformers' PyTorch `Qwen3ForCausalLM.generate` with the same weights.

    python -m bench.decode                                   # CPU: the 'small' shape, float32
    python -m bench.decode --model=1.7b --dtype=bfloat16     # GPU: Qwen3-1.7B

Per batch size B, with T prompt tokens and N new tokens (greedy, no EOS, so every step runs):
  * end to end: median wall time of generate (prefill + N steps); tokens/s = B·N / time.
  * per decode step: `evaluate.decode_step_seconds` (one cached step, timed 16 at a time), and for the HF
    comparison (time(N) − time(1)) / (N − 1) for both, same cache length, which removes the prefill.
  * roofline: a step must read every matmul weight plus each row's cached keys/values (mean context
    T + (N − 1)/2) and do 2·N_params + attention FLOPs per row; ideal = max(bytes / measured bandwidth,
    FLOPs / measured or datasheet peak). roofline_fraction = ideal / measured (1 is the hardware limit).
  * reference: HF generate with the same weights (exported with `convert.export_hf`), measured the same way:
    'eager' (dynamic cache, SDPA attention) and 'static_compile' (static cache + torch.compile of the
    forward, HF's fastest single-device configuration). A failure is reported as a string, not dropped.
    On a shared CPU run it with OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin at every
    barrier, and when other processes hold the cores a step becomes 10x slower (measured here), which would
    make the reference a straw man.
"""

from __future__ import annotations

import argparse
import bisect
import os
import tempfile
from typing import Any

# The HF reference shares the accelerator: JAX must not reserve most of its memory up front (set before jax
# is imported; harmless on a CPU).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from distillspec_jax import decoding  # noqa: E402
from distillspec_jax import evaluate as ev  # noqa: E402
from distillspec_jax import generate as gen  # noqa: E402
from distillspec_jax.models import convert, qwen3  # noqa: E402

HF_MODES = ("eager", "static_compile")


def jax_decode(model: qwen3.Qwen3, prompts: np.ndarray, lens: np.ndarray, new_tokens: int, runs: int) -> dict[str, Any]:
    """Our generate end to end, its per-step cost from the difference of N and 1 new tokens (as for HF), and one
    decode step timed on its own by the evaluation's `decode_step_seconds` (the figure the roofline uses:
    16 steps per timed call, so it is not the small difference of two large times)."""
    batch, prompt_len = prompts.shape
    cache_len = decoding.required_cache_len(prompt_len, new_tokens)

    def call(n: int):
        return lambda: gen.generate(model, prompts, lens, n, eos_ids=(), cache_len=cache_len)

    compiled_before = gen.compiled_cache_size()
    first_s, full_s, out = common.first_and_median(call(new_tokens), runs)
    compiles_full = gen.compiled_cache_size() - compiled_before
    _, one_s, _ = common.first_and_median(call(1), runs)
    lengths = np.asarray(out.lengths)
    if not np.all(lengths == new_tokens):
        raise RuntimeError(f"generate stopped early: lengths {lengths}")
    # One step at the mean context (rounded down): attention reads the window that holds it.
    step_s = ev.decode_step_seconds(model, batch, cache_len, runs, context=int(prompt_len + (new_tokens - 1) / 2))
    return {
        "time_s": full_s, "first_call_s": first_s, "prefill_and_one_step_s": one_s,
        "tokens_per_s": batch * new_tokens / full_s, "ms_per_token": 1e3 * full_s / new_tokens,
        "decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": batch / step_s,
        "decode_step_ms_by_difference": 1e3 * (full_s - one_s) / (new_tokens - 1),
        "compiles_for_timed_shape": compiles_full, "tokens": np.asarray(out.tokens),
    }


def roofline(cfg: qwen3.Qwen3Config, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
             peak: float) -> dict[str, Any]:
    context = prompt_len + (new_tokens - 1) / 2  # keys a decode step attends to, averaged over the steps
    step_bytes = common.decode_step_bytes(cfg, batch, context)
    step_flops = batch * common.forward_flops_per_token(cfg, context)
    memory_s, compute_s = step_bytes / bandwidth, step_flops / peak
    # What our attention reads: the window (`qwen3.cache_windows`) holding each step's rows, averaged over the steps.
    cache_len = decoding.required_cache_len(prompt_len, new_tokens)
    windows = qwen3.cache_windows(cache_len)
    read_slots = np.mean([windows[bisect.bisect_left(windows, prompt_len + i)] for i in range(new_tokens)])
    return {
        "mean_context": context, "step_bytes": step_bytes, "step_flops": step_flops,
        "weight_bytes": common.matmul_params(cfg) * common.dtype_bytes(cfg.param_dtype),
        "kv_bytes_mean": batch * context * common.kv_bytes_per_token(cfg),
        "kv_bytes_read_by_implementation": batch * read_slots * common.kv_bytes_per_token(cfg),
        "ideal_step_ms_memory": 1e3 * memory_s, "ideal_step_ms_compute": 1e3 * compute_s,
        "ideal_step_ms": 1e3 * max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
    }


# ----------------------------------------------------------------------------------------------
# transformers reference
# ----------------------------------------------------------------------------------------------


def load_hf(model: qwen3.Qwen3, folder: str):
    """Our random weights exported to HF safetensors and loaded by transformers (same values, same dtype)."""
    import torch
    from transformers import Qwen3ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if jax.default_backend() == "gpu" and device != "cuda":
        # A reference on another device than ours would be a meaningless ratio: refuse and say why.
        raise RuntimeError(f"JAX runs on the GPU but this torch ({torch.__version__}) has no CUDA; install a "
                           "CUDA build of torch to measure the reference on the same device")
    convert.export_hf(model, folder)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.cfg.param_dtype]
    hf = Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return hf, device


def hf_decode(hf, device: str, prompts: np.ndarray, new_tokens: int, runs: int, mode: str) -> dict[str, Any]:
    """HF greedy generate, timed like ours: end to end at N, and at 1 to remove the prefill."""
    import torch
    from transformers import CompileConfig

    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
    if mode == "static_compile":
        # On CUDA HF compiles with CUDA graphs ("reduce-overhead"); a CPU has none, and HF only compiles there
        # when asked to (_compile_all_devices).
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
        compile_config._compile_all_devices = True
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    elif mode != "eager":
        raise ValueError(f"unknown HF mode {mode!r}; choose from {HF_MODES}")

    def call(n: int):
        def run():
            with torch.inference_mode():
                out = hf.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    first_s, full_s, out = common.first_and_median(call(new_tokens), runs)
    _, one_s, _ = common.first_and_median(call(1), runs)
    if tuple(out.shape) != (prompts.shape[0], prompts.shape[1] + new_tokens):
        raise RuntimeError(f"HF generate returned shape {tuple(out.shape)}, expected {prompts.shape[0]} x "
                           f"{prompts.shape[1] + new_tokens}")
    batch = prompts.shape[0]
    return {
        "time_s": full_s, "first_call_s": first_s, "prefill_and_one_step_s": one_s,
        "tokens_per_s": batch * new_tokens / full_s, "ms_per_token": 1e3 * full_s / new_tokens,
        "decode_step_ms_by_difference": 1e3 * (full_s - one_s) / (new_tokens - 1),
        "compiled": mode == "static_compile" and hasattr(hf, "_compiled_call"),
        "tokens": out[:, prompts.shape[1]:].cpu().numpy(),
    }


def greedy_agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Mean over rows of the fraction of new tokens before the first disagreement (1.0: identical outputs).
    Random weights give nearly flat logits, so near-ties can split float32 greedy paths late in a sequence."""
    same = np.cumprod(ours == theirs, axis=1)
    return float(same.sum(axis=1).mean() / ours.shape[1])


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--batch_sizes", type=common.int_list, default=[1, 8, 32], help="comma-separated B values")
    parser.add_argument("--prompt_len", type=int, default=128, help="prompt tokens T per row")
    parser.add_argument("--new_tokens", type=int, default=256, help="new tokens N per row (>= 2)")
    parser.add_argument("--hf", default=",".join(HF_MODES),
                        help=f"comma-separated HF reference modes from {HF_MODES}; 'none' skips the reference")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="torch.set_num_threads for the HF reference (default: torch's own choice)")
    parser.add_argument("--bandwidth_mib", type=int, default=None, help="array size of the bandwidth probe")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be >= 2 (the per-step figure is a difference of N and 1 tokens)")
    hf_modes = [] if args.hf == "none" else args.hf.split(",")
    for mode in hf_modes:
        if mode not in HF_MODES:
            parser.error(f"--hf: unknown mode {mode!r}; choose from {HF_MODES} or 'none'")

    cfg = common.config_from_flags(args)
    common.log(f"building {args.model} ({cfg.num_params() / 1e6:.1f}M parameters, {args.dtype})")
    model = common.build_model(cfg, args.seed)
    bandwidth = common.memory_bandwidth(args.bandwidth_mib)
    peak = common.peak_flops(args.dtype)
    common.log(f"bandwidth {bandwidth['bandwidth_gb_s']:.1f} GB/s, peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s")

    hf = device = None
    hf_load_error = None
    tmp = tempfile.TemporaryDirectory(prefix="bench_decode_hf_")
    if hf_modes:
        try:
            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
            hf, device = load_hf(model, tmp.name)
        except Exception as e:  # reported in the JSON: the reference could not be built here
            hf_load_error = f"{type(e).__name__}: {e}"

    results = []
    for batch in args.batch_sizes:
        prompts, lens = common.random_prompts(batch, args.prompt_len, cfg, args.seed)
        common.log(f"B={batch}: jax")
        ours = jax_decode(model, prompts, lens, args.new_tokens, args.runs)
        limit = roofline(cfg, batch, args.prompt_len, args.new_tokens, bandwidth["bandwidth_gb_s"] * 1e9,
                         peak["peak_flops"])
        ours_tokens = ours.pop("tokens")
        ours["roofline_fraction"] = common.ratio(limit["ideal_step_ms"], ours["decode_step_ms"])
        ours["measured_over_ideal"] = common.ratio(ours["decode_step_ms"], limit["ideal_step_ms"])
        entry: dict[str, Any] = {"batch": batch, "jax": ours, "roofline": limit, "hf": {}}
        for mode in hf_modes:
            if hf is None:
                entry["hf"][mode] = {"error": hf_load_error}
                continue
            common.log(f"B={batch}: transformers {mode}")
            try:
                ref = hf_decode(hf, device, prompts, args.new_tokens, args.runs, mode)
            except Exception as e:  # e.g. torch.compile unavailable: reported, never silently dropped
                entry["hf"][mode] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                continue
            ref["greedy_agreement"] = greedy_agreement(ours_tokens, ref.pop("tokens"))
            ref["speedup_end_to_end"] = common.ratio(ref["time_s"], ours["time_s"])  # >1: ours is faster
            ref["speedup_decode_step_by_difference"] = common.ratio(ref["decode_step_ms_by_difference"],
                                                                    ours["decode_step_ms_by_difference"])
            entry["hf"][mode] = ref
        timed = [m for m in entry["hf"].values() if "time_s" in m]
        if timed:
            best = min(timed, key=lambda m: m["time_s"])
            entry["speedup_vs_best_hf"] = common.ratio(best["time_s"], ours["time_s"])
        results.append(entry)
    tmp.cleanup()

    torch_threads = None
    if hf is not None:
        import torch

        torch_threads = torch.get_num_threads()
    return {
        "benchmark": "decode",
        "machine": common.machine_info(),
        "model": args.model, "shape": common.describe(cfg),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "sampler": "greedy", "eos": "none",
        "runs": args.runs, "timing": "median of runs after one compiling call; block_until_ready / cuda synchronize",
        "bandwidth": bandwidth, "peak": peak, "hf_device": device, "torch_threads": torch_threads,
        "results": results,
    }


if __name__ == "__main__":
    common.print_json(main())
