"""serve's report.md: both fleets' plan, latency and goodput per load, memory, and the fleet chosen."""

from __future__ import annotations

from typing import Any

from distill.serving.fleet import fleet_label
from distill.serving.load import SLO_QUANTILE
from distill.serving.memory import MIB, format_plan

CPU_NOTE = (
    "This run was on CPU: memory is the servers' proportional set size (PSS: shared pages such as the "
    "memory-mapped GGUF split between the processes that map them; no Python interpreter is counted), "
    "and the GPU budget is only a limit the fleets had to fit in. On the GPU the weights, KV cache and "
    "compute buffers live in VRAM, each process adds a CUDA context, and decoding is far faster, so "
    "latency and throughput here are not the GPU's."
)


def free_level(fleet: dict[str, Any], level: dict[str, Any]) -> dict[str, Any]:
    """The unconstrained measurement at the same load as a constrained level."""
    return next(lv for lv in fleet["free_levels"] if lv["concurrency"] == level["concurrency"])


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def render_report(report: dict[str, Any]) -> str:
    plan, fleets, best, unit = report["plan"], report["fleets"], report["best"], report["unit"]
    slo = report["slo_ms"]
    lines = [
        "# Serving check",
        "",
        "| term | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in format_plan(plan)),
        "",
    ]
    if "processes" in fleets:
        capped = " (capped by serve.max_instances)" if report["processes_started"] < plan["instances"] else ""
        lines.append(
            f"Paper's fleet: planned {plan['instances']} processes; measured {report['processes_started']}{capped}."
        )
    else:
        lines.append("Paper's fleet: not one process of V_small + V_batch fits V_GPU; measured the server alone.")
    capped = " (capped by serve.max_slots)" if report["slots_started"] < plan["slots"] else ""
    lines += [
        f"One server: planned {plan['slots']} slots; measured {report['slots_started']}{capped}.",
        "",
        (
            f"SLO: {SLO_QUANTILE}% of requests end to end within {slo:g} ms. Goodput: {unit}s/s that pass the "
            "task's checks and finish within the SLO. Times in ms as p50 / p95 / p99."
        ),
        "",
        f"Decoding: {report['grammar']}.",
        "",
        "| fleet | users | grammar | req/s | out tok/s | TTFT | TPOT | end to end | valid | within SLO | goodput/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    constrained = any("free_levels" in fleet for fleet in fleets.values())
    for name, fleet in fleets.items():
        label = fleet_label(name, fleet["servers"], fleet["slots_each"])
        for lv in fleet["levels"]:
            rows = [("yes" if constrained else "no", lv)]
            if constrained:
                rows.append(("no", free_level(fleet, lv)))
            for mode, row in rows:
                pct = {k: " / ".join(f"{v:g}" for v in row[k].values()) for k in ("ttft_ms", "tpot_ms", "e2e_ms")}
                lines.append(
                    f"| {label} | {row['concurrency']} | {mode} | {row['requests_per_s']} | {row['output_tokens_per_s']} "
                    f"| {pct['ttft_ms']} | {pct['tpot_ms']} | {pct['e2e_ms']} | {row['valid_share']:.0%} "
                    f"| {row['within_slo_share']:.0%} | {row['goodput_per_s']} |"
                )
    free_title = " | capacity without grammar" if constrained else ""
    lines += [
        "",
        f"| fleet | capacity (users within SLO){free_title} | memory per process (peak) | planned per process | plan held |",
        "|---|---|---|---|---|" + ("---|" if constrained else ""),
    ]
    for name, fleet in fleets.items():
        measure = fleet["memory_measure"]
        per = ", ".join(_memory_cell(m, measure) for m in fleet["memory"])
        free_cell = f" | {fleet['free_capacity']}" if constrained else ""
        lines.append(
            f"| {name} | {fleet['capacity']}{free_cell} | {per} | {_mib(fleet['planned_bytes_each'])} "
            f"| {'yes' if fleet['budget_held'] else 'no'} |"
        )
    lines += ["", *_metrics_lines(fleets), ""]
    what = fleet_label(best["fleet"], best["servers"], best["slots_each"])
    level = best["level"]
    if best["meets_slo"]:
        free = (
            f" ({free_level(fleets[best['fleet']], level)['goodput_per_s']} without the grammar)" if constrained else ""
        )
        lines.append(
            f"Best: **{what}**: {best['capacity']} concurrent users within the SLO, goodput "
            f"{level['goodput_per_s']} {unit}s/s at that load{free} (`distill deploy` starts it; `llama-server.sh` "
            "and `Modelfile` beside this report)."
        )
    else:
        lines.append(
            f"**No configuration meets serve.slo_ms={slo:g}**; closest: {what} with one user, p{SLO_QUANTILE} "
            f"{level['e2e_ms'][f'p{SLO_QUANTILE}']:g} ms. Raise serve.slo_ms, lower serve.max_tokens, or use a "
            "faster card."
        )
    if report["fp16"]:
        lines += ["", f"fp16: {report['fp16']['note']}."]
    if report["device"] == "cpu":
        lines += ["", CPU_NOTE]
    return "\n".join(lines) + "\n"


def _memory_cell(memory: dict[str, Any], measure: str) -> str:
    if measure == "gpu_bytes":
        return f"{_mib(memory.get('gpu_bytes', 0))} GPU"
    return f"{_mib(memory.get('pss_bytes', 0))} PSS / {_mib(memory.get('uss_bytes', 0))} USS"


def _metrics_lines(fleets: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, fleet in fleets.items():
        peaks = fleet["metrics_peak"]
        if not peaks and not fleet["metrics_total"]:
            continue
        # n_busy_slots_per_decode is the server's own running mean; the others are instantaneous gauges
        shown = ", ".join(
            f"{k.split(':')[-1]} {'(mean so far) ' if k.endswith('per_decode') else ''}{v:g}"
            for k, v in sorted(peaks.items())
        )
        longest = next((v for k, v in fleet["metrics_total"].items() if k.endswith("n_tokens_max")), None)
        extra = f"; longest sequence {longest:g} tokens" if longest is not None else ""
        lines.append(f"/metrics of the {name} fleet under load (peak): {shown or 'none'}{extra}.")
    return lines
