"""Stage 5: does the student serve many users at once on a small GPU, and what is the best way to serve it?

Two fleets on the same memory budget take the same held-out requests at the same swept concurrency:
the paper's n processes of one sequence each, n = floor(V_GPU / (V_small + V_batch)), and one
llama-server whose N slots share one KV pool, N sized from the same budget. Each is measured the way
people serve (TTFT, time per output token, end-to-end latency, goodput of valid answers within
serve.slo_ms, capacity in concurrent users, memory per process), with each request constrained by its
input's grammar where the task has one (`serve.grammar`) and, at every load, the same requests free,
so the goodput the grammar buys or costs is visible. The best one is written down as a llama-server
command line and an Ollama Modelfile, and `distill deploy` starts it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distill.artifacts import (
    StageRecord,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    prepare_output,
    require_input,
    stage_dir,
)
from distill.config import PipelineConfig
from distill.constrain import first_grammar, request_fields, task_grammar
from distill.errors import DistillError
from distill.serving.fleet import (
    claim_ports,
    gpu_bytes_by_pid,
    llama_server_binary,
    make_servers,
    running,
    sample_memory,
    scrape_metrics,
)
from distill.serving.load import SLO_QUANTILE, capacity, drive
from distill.serving.memory import (
    MIB,
    check_backend,
    compute_capability,
    format_plan,
    plan_serving,
    server_bytes,
    too_small,
)
from distill.tasks import Grammar, Task, load_task

log = logging.getLogger(__name__)

# Gauges worth their peak under load (llama-server's and vLLM's names).
PEAK_GAUGES = (
    "requests_deferred",
    "requests_processing",
    "n_busy_slots_per_decode",
    "num_requests_waiting",
    "num_requests_running",
    "kv_cache_usage_perc",
)
FP16_PROMPTS = 8
CPU_NOTE = (
    "This run was on CPU: memory is the servers' proportional set size (PSS: shared pages such as the "
    "memory-mapped GGUF split between the processes that map them; no Python interpreter is counted), "
    "and the GPU budget is only a limit the fleets had to fit in. On the GPU the weights, KV cache and "
    "compute buffers live in VRAM, each process adds a CUDA context, and decoding is far faster, so "
    "latency and throughput here are not the GPU's."
)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def fleet_label(fleet: str, servers: int, slots: int) -> str:
    """ "5 processes x 1 slot" or "1 server x 180 slots"."""
    return f"{_count(servers, 'server' if fleet == 'slots' else 'process')} x {_count(slots, 'slot')}"


def find_gguf(cfg: PipelineConfig) -> Path:
    export = require_input(cfg, "export")
    candidates = [Path(p) for p in export.get("files", {}).values() if str(p).endswith(".gguf")]
    candidates = [p if p.is_absolute() else stage_dir(cfg, "export") / p for p in candidates]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        raise DistillError(
            f"{stage_dir(cfg, 'export')}: no GGUF file; run `distill export {cfg.command_args} export.format=q8_0`"
        )
    return existing[0]


def served_model(cfg: PipelineConfig) -> Path:
    """What the servers load: the GGUF for llama.cpp, the merged folder for vLLM."""
    check_backend(cfg)
    if cfg.serve.backend == "llama_cpp":
        return find_gguf(cfg)
    require_input(cfg, "merge")
    return stage_dir(cfg, "merge") / "model"


def model_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _held_out_requests(cfg: PipelineConfig, count: int) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))
    split = dataset["test"] if "test" in dataset else dataset["validation"]
    rows = [split[i % len(split)] for i in range(count)]
    return [{"prompt": r["prompt"], "payload": json.loads(r["payload"])} for r in rows]


def measure_fleet(
    cfg: PipelineConfig,
    model: Path,
    task: Task,
    requests: list[dict[str, Any]],
    log_dir: Path,
    name: str,
    count: int,
    slots: int,
    threads: int,
    planned_each: int,
    v_gpu: int,
    free: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start one fleet, sweep the concurrency levels over it, and stop it. With `free` (the same requests
    without their grammar) every level is also measured unconstrained, right after, as `free_levels`."""
    s = cfg.serve
    ports = claim_ports(s.base_port, count, "serve.base_port")
    servers = make_servers(cfg, model, ports, slots, threads, log_dir, name)
    peaks: dict[str, float] = {}

    def tick() -> None:
        gpu = gpu_bytes_by_pid()
        for server in servers:
            sample_memory(server, gpu)
            for key, value in scrape_metrics(server).items():
                if any(key.endswith(g) for g in PEAK_GAUGES):
                    peaks[key] = max(peaks.get(key, 0.0), value)

    def check(text: str, payload: dict[str, Any]) -> bool:
        return not task.check(text, payload)

    levels, free_levels = [], []
    with running(servers, s.ready_timeout_s):
        # One untimed request per server first (page faults and first-use allocations are not a user's
        # wait), from the end of the list: a level's first prompt must not find itself already cached.
        drive(
            [sv.url for sv in servers], requests[-len(servers) :], len(servers), 8, s.request_timeout_s, check, s.slo_ms
        )
        for users in s.concurrency:
            batch = requests[: max(s.requests, users)]
            log.info("serve: %s, %d concurrent users, %d requests", fleet_label(name, count, slots), users, len(batch))
            urls = [sv.url for sv in servers]
            levels.append(drive(urls, batch, users, s.max_tokens, s.request_timeout_s, check, s.slo_ms, tick))
            if free is not None:
                batch = free[: len(batch)]
                free_levels.append(drive(urls, batch, users, s.max_tokens, s.request_timeout_s, check, s.slo_ms, tick))
        totals: dict[str, float] = {}
        for server in servers:
            for key, value in scrape_metrics(server).items():
                # counters add up over the fleet; the longest sequence is the longest of any server
                merge = max if key.endswith("n_tokens_max") else float.__add__
                totals[key] = merge(totals.get(key, 0.0), value)
    measure = "gpu_bytes" if any("gpu_bytes" in sv.peak for sv in servers) else "pss_bytes"
    largest = max(sv.peak.get(measure, 0) for sv in servers)
    return {
        "servers": count,
        "slots_each": slots,
        "threads_each": threads,
        "command": servers[0].command,
        "levels": levels,
        "capacity": capacity(levels),
        **({"free_levels": free_levels, "free_capacity": capacity(free_levels)} if free is not None else {}),
        "memory": [{"port": sv.port, **sv.peak} for sv in servers],
        "memory_measure": measure,
        "planned_bytes_each": planned_each,
        # The plan held when every process stayed inside what it was planned to hold, and the fleet inside V_GPU.
        "budget_held": largest <= planned_each and sum(sv.peak.get(measure, 0) for sv in servers) <= v_gpu,
        "metrics_peak": peaks,
        "metrics_total": {k: v for k, v in totals.items() if k.endswith(("_total", "n_tokens_max"))},
    }


def choose(fleets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fleet that serves the most users within the SLO, then the most goodput and throughput at that
    load; where none meets the SLO at any load, the one closest to it at the lightest load."""

    def at_capacity(name: str) -> dict[str, Any]:
        return next(lv for lv in fleets[name]["levels"] if lv["concurrency"] == fleets[name]["capacity"])

    def rank(name: str) -> tuple[float, ...]:
        fleet = fleets[name]
        if not fleet["capacity"]:
            return (0, 0, 0)
        return (fleet["capacity"], at_capacity(name)["goodput_per_s"], at_capacity(name)["requests_per_s"])

    name = max(fleets, key=rank)
    if fleets[name]["capacity"] > 0:
        level, meets = at_capacity(name), True
    else:
        name = min(fleets, key=lambda n: fleets[n]["levels"][0]["e2e_ms"][f"p{SLO_QUANTILE}"])
        level, meets = fleets[name]["levels"][0], False
    fleet = fleets[name]
    return {
        "fleet": name,
        "servers": fleet["servers"],
        "slots_each": fleet["slots_each"],
        "threads_each": fleet["threads_each"],
        "meets_slo": meets,
        "capacity": fleet["capacity"],
        "level": level,
        "command": fleet["command"],
    }


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    s = cfg.serve
    folder = stage_dir(cfg, "serve")
    model = served_model(cfg)
    require_input(cfg, "generate")
    if s.backend == "llama_cpp":
        llama_server_binary(cfg)  # say it is missing before anything starts
    task = load_task(cfg)  # a broken task or grammar fails before the output folder is touched
    requests = _held_out_requests(cfg, max(s.requests, *s.concurrency))
    grammar = first_grammar(task, requests[0]["payload"], "serve.grammar") if s.grammar else None
    plan = plan_serving(cfg, model_bytes=model_bytes(model))
    if problem := too_small(plan):
        raise DistillError(problem)
    if prepare_output(cfg, "serve", overwrite) == "skip":
        log.info("serve: complete, skipping (%s)", folder)
        return folder
    log.info("serve config: %s", s.model_dump())
    upstream = "export" if s.backend == "llama_cpp" else "merge"
    record = StageRecord(cfg, "serve", inputs=(upstream, "generate"))
    log_dir = folder / "logs"
    log_dir.mkdir(exist_ok=True)
    free = None
    if grammar is not None:  # each request carries its input's grammar; the same ones go out free as well
        free = requests
        requests = [{**r, "fields": request_fields(task_grammar(task, r["payload"]), s.backend)} for r in requests]

    processes = min(plan["instances"], s.max_instances or plan["instances"])
    slots = min(plan["slots"], s.max_slots or plan["slots"])
    log.info(
        "serve: plan says %d processes or 1 server with %d slots; measuring %d and %d",
        plan["instances"],
        plan["slots"],
        processes,
        slots,
    )
    fleets: dict[str, dict[str, Any]] = {}
    if processes:
        fleets["processes"] = measure_fleet(
            cfg,
            model,
            task,
            requests,
            log_dir,
            "processes",
            processes,
            s.parallel,
            s.threads_per_instance,
            plan["v_small_bytes"] + plan["v_batch_bytes"],
            plan["v_gpu_bytes"],
            free,
        )
    # Same CPU for both: the one server gets the threads the processes had together.
    fleets["slots"] = measure_fleet(
        cfg,
        model,
        task,
        requests,
        log_dir,
        "slots",
        1,
        slots,
        s.threads_per_instance * max(1, processes),
        server_bytes(plan, slots),
        plan["v_gpu_bytes"],
        free,
    )
    best = choose(fleets)
    fp16 = _fp16(cfg, requests) if s.backend == "llama_cpp" else None
    report = {
        "unit": task.unit,
        "backend": s.backend,
        "device": "gpu" if any(f["memory_measure"] == "gpu_bytes" for f in fleets.values()) else "cpu",
        "slo_ms": s.slo_ms,
        "grammar": _grammar_use(s, grammar),
        "plan": plan,
        "processes_started": processes,
        "slots_started": slots,
        "fleets": fleets,
        "best": best,
        "fp16": fp16,
    }
    record.files = {"report": "report.json", "report_md": "report.md"}
    if s.backend == "llama_cpp":
        record.files.update(_write_portable(cfg, model, folder, best))
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", render_report(report))
    level = best["level"]
    record.metrics = {
        "instances_planned": plan["instances"],
        "slots_planned": plan["slots"],
        "processes_started": processes,
        "slots_started": slots,
        "best_fleet": best["fleet"],
        "meets_slo": best["meets_slo"],
        "slo_ms": s.slo_ms,
        "capacity": best["capacity"],
        "goodput_per_s": level["goodput_per_s"],
        "requests_per_s": level["requests_per_s"],
        "e2e_p50_ms": level["e2e_ms"]["p50"],
        "e2e_p95_ms": level["e2e_ms"]["p95"],
        "valid_share": level["valid_share"],
        "grammar": grammar is not None,
        **({"goodput_per_s_free": _free_level(fleets[best["fleet"]], level)["goodput_per_s"]} if grammar else {}),
        "budget_held": {name: fleet["budget_held"] for name, fleet in fleets.items()},
    }
    return record.finish()


def _grammar_use(s: Any, grammar: Grammar | None) -> str:
    if grammar is not None:
        field = next(iter(request_fields(grammar, s.backend)))
        return f"each request carries its input's grammar (`{field}`); the same requests also went out free"
    return "free decoding (serve.grammar is off)" if not s.grammar else "free decoding (the task has no grammar)"


def _free_level(fleet: dict[str, Any], level: dict[str, Any]) -> dict[str, Any]:
    """The unconstrained measurement at the same load as a constrained level."""
    return next(lv for lv in fleet["free_levels"] if lv["concurrency"] == level["concurrency"])


def _fp16(cfg: PipelineConfig, requests: list[dict[str, Any]]) -> dict[str, Any]:
    from distill.serving.fp16 import fp16_risk

    merged = stage_dir(cfg, "merge") / "model" if is_complete(cfg, "merge") else None
    return fp16_risk(compute_capability(cfg), merged, [r["prompt"] for r in requests[:FP16_PROMPTS]])


def _write_portable(cfg: PipelineConfig, model: Path, folder: Path, best: dict[str, Any]) -> dict[str, str]:
    from distill.serving.portable import launch_script, modelfile

    what = fleet_label(best["fleet"], best["servers"], best["slots_each"])
    note = f"The configuration `distill serve` measured best: {what}" + (
        f"; run {best['servers']} of these on different ports behind a balancer, or use `distill deploy`"
        if best["servers"] > 1
        else ""
    )
    script = folder / "llama-server.sh"
    atomic_write_text(script, launch_script(best["command"], model, folder, note))
    script.chmod(0o755)
    sampling = {
        "temperature": cfg.eval.temperature,
        "num_predict": cfg.eval.max_new_tokens,
        "num_ctx": cfg.serve.context,
    }
    atomic_write_text(folder / "Modelfile", modelfile(model, folder, sampling))
    return {"llama_server_command": script.name, "ollama_modelfile": "Modelfile"}


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
                rows.append(("no", _free_level(fleet, lv)))
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
            f" ({_free_level(fleets[best['fleet']], level)['goodput_per_s']} without the grammar)"
            if constrained
            else ""
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
