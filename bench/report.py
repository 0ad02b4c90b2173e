"""Markdown tables from the benchmarks' JSON output, for docs/benchmarks.md.

    python -m bench.decode ... > decode.json
    python -m bench.report decode.json speculative.json distill_step.json

Each file is one benchmark's JSON object; the table printed depends on its "benchmark" field.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _hf(entry: dict, mode: str, key: str, digits: int = 1) -> str:
    ref = entry["hf"].get(mode)
    if ref is None:
        return "not run"
    if "error" in ref:
        return "failed (see JSON)"
    return _f(ref[key], digits)


def decode_table(result: dict) -> str:
    header = ["B", "tokens/s", "ms/token", "step ms", "ideal step ms", "bound", "roofline fraction",
              "HF eager tokens/s", "HF static+compile tokens/s", "× HF eager", "× best HF"]
    rows = []
    for e in result["results"]:
        ours, limit = e["jax"], e["roofline"]
        eager = e["hf"].get("eager", {})
        rows.append([str(e["batch"]), _f(ours["tokens_per_s"], 1), _f(ours["ms_per_token"]),
                     _f(ours["decode_step_ms"]), _f(limit["ideal_step_ms"]), limit["bound"],
                     _f(ours["roofline_fraction"]), _hf(e, "eager", "tokens_per_s"),
                     _hf(e, "static_compile", "tokens_per_s"), _f(eager.get("speedup_end_to_end")),
                     _f(e.get("speedup_vs_best_hf"))])
    return _table(header, rows)


def speculative_tables(result: dict) -> str:
    verify = {v["gamma"]: v["verify_over_step"] for v in result["verify"]}
    parts = []
    for name, draft in result["drafts"].items():
        header = ["γ", "verify / step", "c", "τ", "α", "block ms", "ideal ms", "loop overhead",
                  "beyond 2-token draft step", "incl. prefill", "measured speedup", "predicted τ/(γc+1)",
                  "predicted τ/(γc+v)"]
        rows = [[str(g["gamma"]), _f(verify[g["gamma"]]), _f(draft["cost_ratio"]), _f(g["block_efficiency"]),
                 _f(g["acceptance_rate"]), _f(1e3 * g["block_decode_s"]), _f(1e3 * g["ideal_block_s"]),
                 f"{100 * g['loop_overhead']:+.0f}%", f"{100 * g['loop_overhead_beyond_pair_step']:+.0f}%",
                 f"{100 * g['loop_overhead_incl_prefill']:+.0f}%",
                 _f(g["measured_speedup"]), _f(g["predicted_speedup"]), _f(g["predicted_speedup_with_verify_cost"])]
                for g in draft["gammas"]]
        parts.append(f"Draft `{name}` ({draft['shape']['layers']} layers, hidden {draft['shape']['hidden']}; "
                     f"draft step {1e3 * draft['draft_step_s']:.2f} ms (2 tokens: "
                     f"{1e3 * draft['draft_pair_step_s']:.2f} ms), target step "
                     f"{1e3 * result['target_step_s']:.2f} ms, prefill of both {1e3 * draft['prefill_both_s']:.1f} ms)"
                     f":\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def distill_table(result: dict) -> str:
    header = ["teacher", "loss chunk", "step s", "tokens/s", "MFU", "compile s", "compiled peak (MiB)",
              "temporaries (MiB)", "device peak (MiB)", "loop s/step (log_every): overhead"]
    rows = []
    for e in result["results"]:
        loop = "; ".join(f"{r['step_s']:.3f} ({r['log_every']}): {100 * r['overhead']:+.1f}%" for r in e.get("loop", []))
        mem = e["compiled_memory"]
        peak = _f(mem["peak_estimate_bytes"] / 2**20, 1) if mem.get("available") else "unavailable"
        temp = _f(mem["temp_size_in_bytes"] / 2**20, 1) if mem.get("available") else "unavailable"
        device = "–" if e["peak_bytes_in_use"] is None else _f(e["peak_bytes_in_use"] / 2**20, 1)
        rows.append([e.get("teacher", "online"), str(e["loss_chunk"]) + (" (off)" if e["loss_chunk"] == 0 else ""),
                     _f(e["step_s"], 3),
                     _f(e["tokens_per_s"], 0), f"{100 * e['mfu']:.1f}%", _f(e["compile_s"], 1), peak, temp, device,
                     loop or "–"])
    return _table(header, rows)


def profile_table(result: dict[str, Any]) -> str:
    """One row: where a decode step's time goes, ms per step by op group (bench/profile_decode.py)."""
    groups = result["groups_ms_per_step"]
    header = ["B", "op time / step"] + list(groups)
    return _table(header, [[str(result["batch"]), _f(result["op_ms_per_step"])] + [_f(v) for v in groups.values()]])


def _compile_seconds(program: dict | None) -> str:
    if program is None:
        return "–"
    cpu = program.get("compile_cpu_s")
    return f"{program['compile_s']:.0f}" + ("" if cpu is None else f" ({cpu:.0f})")


def scale_table(result: dict[str, Any]) -> str:
    """One row per (preset, topology) of bench/scale.py: the mesh the run uses (the config's, or the one the
    pre-flight named), its largest compiled program per chip against the budget, roofline estimates, and
    compile seconds (wall, with CPU seconds in brackets)."""
    header = ["preset", "topology", "default mesh", "mesh used (d, f, t)", "largest program", "GiB per chip / budget",
              "fits", "est. step s", "est. positions/s", "est. block γ=4 ms",
              "compile s: step / spec γ=4 / on-policy gen"]
    rows = []
    for cell in result["cells"]:
        first, used = cell["attempts"][0], cell["attempts"][-1]
        default = ("fits" if first["fits"] else "refused by the estimate" if not first["estimate"]["fits"]
                   else "refused (compiled)")
        programs = {p["name"]: p for p in used["programs"]}
        largest, roof, mesh = used["largest"], used["roofline"], used["mesh"]
        size = "–" if largest is None else (f"{largest['total_bytes'] / 2**30:.1f} / "
                                            f"{used['chip']['budget_bytes'] / 2**30:.1f}")
        topo = used["topology"]
        rows.append([cell["preset"], f"{topo['name']} ({topo['devices']} x {used['chip']['name']}, "
                                     f"{topo['hosts']} host{'s' if topo['hosts'] > 1 else ''})", default,
                     f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}", "–" if largest is None else largest["name"],
                     size, "yes" if used["fits"] else "no", _f(roof["distill_step_s"], 3),
                     f"{roof['distill_positions_per_s']:.0f}", _f(roof["speculative_block_s"] * 1e3, 1),
                     " / ".join(_compile_seconds(programs.get(n)) for n in
                                ("distill_step", "eval/T1/speculative_g4", "generate_draft_on_policy"))])
    return _table(header, rows)


def moe_tables(result: dict[str, Any]) -> str:
    """bench/moe.py: per token count, both expert forms' CPU time and cost analyses (CPU; TPU estimate when
    compiled for one); then, when present, the analytic MoE cost model of speculative decoding."""
    tpu = result.get("tpu")
    header = ["tokens", "ragged ms", "dense ms", "faster", "CPU bytes ragged / dense"]
    header += [f"TPU ({tpu}) est. bytes ragged / dense", "TPU est. FLOPs ragged / dense"] if tpu else []
    rows = []
    for r in result["rows"]:
        row = [str(r["tokens"]), _f(r["ragged"]["seconds"] * 1e3, 1), _f(r["dense"]["seconds"] * 1e3, 1), r["faster"],
               f"{r['ragged']['cpu_cost']['bytes_accessed']:.2e} / {r['dense']['cpu_cost']['bytes_accessed']:.2e}"]
        if tpu:
            est = {impl: r[impl]["tpu_cost_estimate"] for impl in ("ragged", "dense")}
            row += [f"{est['ragged']['bytes_accessed']:.2e} / {est['dense']['bytes_accessed']:.2e}",
                    f"{est['ragged']['flops']:.1e} / {est['dense']['flops']:.1e}"]
        rows.append(row)
    out = [_table(header, rows)] if rows else []
    model = result.get("cost_model")
    if model:
        out.append(_table(["B", "γ", "experts per verify", "v_moe", "c", "speedup dense formula α=0.8",
                           "speedup MoE model α=0.8"],
                          [[str(r["batch"]), str(r["gamma"]), _f(r["experts_per_verify"], 1), _f(r["v_moe"]), _f(r["c"]),
                            _f(r["speedup_dense_formula_alpha0.8"]), _f(r["speedup_moe_alpha0.8"])]
                           for r in model["rows"]]))
    return "\n\n".join(out)


def expert_union_tables(result: dict[str, Any]) -> str:
    """bench/expert_union.py: experts per layer of a step and of a verify call, trained and random targets."""
    header = ["target", "B", "γ", "step", "verify per row", "verify per batch", "uniform", "v_moe"]
    rows = [[which, str(r["batch"]), str(r["gamma"]), _f(r["experts_per_step"]), _f(r["experts_per_verify_row"]),
             _f(r["experts_per_verify_batch"]), _f(r["experts_per_verify_uniform"]),
             _f(r.get("verify_cost_ratio_moe"), 3)]
            for which in ("trained", "random_routing") for r in result[which]]
    return _table(header, rows)


def stored_teacher_table(result: dict[str, Any]) -> str:
    """The sparse (top-k) teacher against the full one, per divergence and k (bench/stored_teacher.py)."""
    header = ["divergence", "k", "loss sparse / full", "gradient cosine", "1 − TVD sparse", "1 − TVD full",
              "bytes / token"]
    rows = [[r["divergence"], str(r["k"]), _f(r["loss_ratio"], 3), _f(r["grad_cosine"], 3),
             _f(r["acceptance_sparse"], 3), _f(r["acceptance_full"], 3), str(r["storage_bytes_per_token"])]
            for r in result["results"]]
    return _table(header, rows)


def _weighted_ms(per_window: dict[str, dict], steps: dict[str, int]) -> str:
    if any(per_window[w]["estimated_s"] is None for w in steps):
        return "–"
    return _f(sum(per_window[w]["estimated_s"] * n for w, n in steps.items()) / sum(steps.values()) * 1e3, 3)


def step_cost_tables(result: dict[str, Any]) -> str:
    """bench/step_cost.py: bytes per decode step over a generation (live-cache windows and the whole cache, against
    the ideal), then a verify call against one step; XLA cost-analysis estimates, per platform and batch."""
    out = []
    generation = [r for r in result["results"] if "generation" in r]
    if generation:
        header = ["model", "layers", "platform", "B", "ideal GB/step", "live windows GB/step", "live / ideal",
                  "live, resident weights / ideal", "whole cache GB/step", "whole / ideal", "est. ms/step, live",
                  "est. ms/step, live resident", "est. ms/step, whole"]
        rows = []
        for r in generation:
            g = r["generation"]
            live, whole, held = g["live"], g["whole_cache"], g.get("live_resident_weights")
            rows.append([r["model"], str(r.get("layers", "–")), r["device_kind"], str(r["batch"]),
                         _f(g["ideal_bytes_per_step"] / 1e9, 3),
                         _f(live["bytes_per_step"] / 1e9, 3), _f(live["bytes_over_ideal"], 3),
                         "–" if held is None else _f(held["bytes_over_ideal"], 3),
                         _f(whole["bytes_per_step"] / 1e9, 3), _f(whole["bytes_over_ideal"], 3),
                         _weighted_ms(live["per_window"], g["steps_per_window"]),
                         "–" if held is None else _weighted_ms(held["per_window"], g["steps_per_window"]),
                         "–" if whole["estimated_s"] is None else _f(whole["estimated_s"] * 1e3, 3)])
        out.append(_table(header, rows))
    verify = [r for r in result["results"] if "verify" in r]
    if verify:
        header = ["model", "layers", "platform", "B", "weights", "tokens", "window", "step GB", "verify GB",
                  "bytes verify / step", "est. s verify / step", "FLOPs ratio"]
        rows = []
        for r in verify:
            v = r["verify"]
            # results before 2026-12-04 hold one stored-layout figure at the top level
            layouts = {k: v[k] for k in ("stored_layouts", "resident_weights") if k in v} or {"stored_layouts": v}
            for layout, c in layouts.items():
                rows.append([r["model"], str(r.get("layers", "–")), r["device_kind"], str(r["batch"]),
                             layout.replace("_", " "), str(v["tokens"]), str(v["window"]),
                             _f(c["step"]["bytes"] / 1e9, 3), _f(c["verify"]["bytes"] / 1e9, 3),
                             _f(c["bytes_ratio"], 3), _f(c.get("estimated_s_ratio"), 3), _f(c["flops_ratio"])])
        out.append(_table(header, rows))
    return "\n\n".join(out)


TABLES = {"decode": decode_table, "speculative": speculative_tables, "distill_step": distill_table,
          "profile_decode": profile_table, "scale": scale_table, "moe": moe_tables, "expert_union": expert_union_tables,
          "stored_teacher": stored_teacher_table, "step_cost": step_cost_tables}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON files written by the benchmarks")
    args = parser.parse_args(argv)
    for path in args.files:
        with open(path) as f:
            result = json.load(f)
        kind = result.get("benchmark")
        if kind not in TABLES:
            raise SystemExit(f"{path}: benchmark {kind!r} has no table; known: {sorted(TABLES)}")
        print(f"<!-- {path} -->\n{TABLES[kind](result)}\n")


if __name__ == "__main__":
    main()
