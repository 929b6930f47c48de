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

import logging
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_json, atomic_write_text, is_complete, open_stage, require_inputs, stage_dir
from distill.card import write_cards
from distill.config import PipelineConfig
from distill.constrain import first_grammar, request_fields, task_grammar
from distill.data import held_out_requests
from distill.errors import DistillError
from distill.models import served_model, weights_bytes
from distill.serving.fleet import (
    claim_ports,
    fleet_label,
    gpu_bytes_by_pid,
    llama_server_binary,
    make_servers,
    running,
    sample_memory,
    scrape_metrics,
)
from distill.serving.load import SLO_QUANTILE, capacity, drive
from distill.serving.memory import (
    compute_capability,
    plan_serving,
    server_bytes,
    too_small,
)
from distill.serving.report import free_level, render_report
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
    model = served_model(cfg)
    require_inputs(cfg, "serve")
    if s.backend == "llama_cpp":
        llama_server_binary(cfg)  # say it is missing before anything starts
    task = load_task(cfg)  # a broken task or grammar fails before the output folder is touched
    requests = held_out_requests(cfg, max(s.requests, *s.concurrency))
    grammar = first_grammar(task, requests[0]["payload"], "serve.grammar") if s.grammar else None
    plan = plan_serving(cfg, model_bytes=weights_bytes(model))
    if problem := too_small(plan):
        raise DistillError(problem)
    record = open_stage(cfg, "serve", overwrite)
    if record is None:
        return stage_dir(cfg, "serve")
    folder = record.folder
    log_dir = folder / "logs"
    log_dir.mkdir(exist_ok=True)
    free = None
    if grammar is not None:  # each request carries its input's grammar; the same ones go out free as well
        free = requests
        requests = [{**r, "fields": request_fields(task_grammar(task, r["payload"]), s.backend)} for r in requests]

    processes, slots, fleets = measure_both(cfg, model, task, plan, requests, free, log_dir)
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
    record.metrics = serve_metrics(report, free is not None)
    out = record.finish()
    write_cards(cfg)
    return out


def measure_both(
    cfg: PipelineConfig,
    model: Path,
    task: Task,
    plan: dict[str, Any],
    requests: list[dict[str, Any]],
    free: list[dict[str, Any]] | None,
    log_dir: Path,
) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """The paper's processes (where the budget fits any) and the one server with slots, on the same CPU: the
    server gets the threads the processes had together. Returns (processes, slots, fleets)."""
    s = cfg.serve
    processes = min(plan["instances"], s.max_instances or plan["instances"])
    slots = min(plan["slots"], s.max_slots or plan["slots"])
    log.info(
        "serve: plan says %d processes or 1 server with %d slots; measuring %d and %d",
        plan["instances"],
        plan["slots"],
        processes,
        slots,
    )
    common = (cfg, model, task, requests, log_dir)
    fleets: dict[str, dict[str, Any]] = {}
    if processes:
        each = plan["v_small_bytes"] + plan["v_batch_bytes"]
        fleets["processes"] = measure_fleet(
            *common, "processes", processes, s.parallel, s.threads_per_instance, each, plan["v_gpu_bytes"], free
        )
    threads = s.threads_per_instance * max(1, processes)
    fleets["slots"] = measure_fleet(
        *common, "slots", 1, slots, threads, server_bytes(plan, slots), plan["v_gpu_bytes"], free
    )
    return processes, slots, fleets


def serve_metrics(report: dict[str, Any], constrained: bool) -> dict[str, Any]:
    """The manifest's summary of the report: the plan, the chosen fleet and its numbers at capacity."""
    plan, best, fleets = report["plan"], report["best"], report["fleets"]
    level = best["level"]
    return {
        "instances_planned": plan["instances"],
        "slots_planned": plan["slots"],
        "processes_started": report["processes_started"],
        "slots_started": report["slots_started"],
        "best_fleet": best["fleet"],
        "meets_slo": best["meets_slo"],
        "slo_ms": report["slo_ms"],
        "capacity": best["capacity"],
        "goodput_per_s": level["goodput_per_s"],
        "requests_per_s": level["requests_per_s"],
        "e2e_p50_ms": level["e2e_ms"]["p50"],
        "e2e_p95_ms": level["e2e_ms"]["p95"],
        "valid_share": level["valid_share"],
        "grammar": constrained,
        **({"goodput_per_s_free": free_level(fleets[best["fleet"]], level)["goodput_per_s"]} if constrained else {}),
        "budget_held": {name: fleet["budget_held"] for name, fleet in fleets.items()},
    }


def _grammar_use(s: Any, grammar: Grammar | None) -> str:
    if grammar is not None:
        field = next(iter(request_fields(grammar, s.backend)))
        return f"each request carries its input's grammar (`{field}`); the same requests also went out free"
    return "free decoding (serve.grammar is off)" if not s.grammar else "free decoding (the task has no grammar)"


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
