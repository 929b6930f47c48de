"""Stage 5: prove the student serves many users at once on a small GPU, and measure it honestly.

Plan: n = floor(V_GPU / (V_small + V_batch)), every term in bytes with its source. Check: start n real
OpenAI-compatible llama.cpp servers on the exported GGUF, drive held-out prompts through all of them
at once, measure memory, latency, throughput and answer validity (the task's checks), then compare against one instance
taking the same load, and always stop every process started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.artifacts import StageRecord, atomic_write_json, atomic_write_text, prepare_output, require_input, stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.stages.export import llama_cpp
from distill.tasks import Task, load_task

log = logging.getLogger(__name__)

MIB = 2**20
GIB = 2**30
# Memory and compute capability of the GPUs we plan for. Gemma 3 needs bf16 (fp16 overflows), and
# vLLM only runs bf16 from compute capability 8.0, so Turing cards serve it through llama.cpp.
GPU_PROFILES: dict[str, tuple[int, float]] = {
    "rtx2060-6gb": (6 * GIB, 7.5),
    "rtx3060-12gb": (12 * GIB, 8.6),
    "t4-16gb": (16 * GIB, 7.5),
    "l4-24gb": (24 * GIB, 8.9),
    "a10-24gb": (24 * GIB, 8.6),
    "a100-40gb": (40 * GIB, 8.0),
    "a100-80gb": (80 * GIB, 8.0),
    "h100-80gb": (80 * GIB, 9.0),
}
KV_BYTES = 2  # llama.cpp keeps K and V in f16 by default
SERVED_NAME = "student"
LOGIT_BYTES = 4  # logits are f32
UBATCH = 512  # llama.cpp's default physical batch: sizes its compute buffer


@dataclass(frozen=True)
class Geometry:
    """What the KV cache and logits of one model depend on."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    hidden: int
    sliding_window: int | None = None
    sliding_layers: int = 0


def geometry_of(config: Any) -> Geometry:
    """From a transformers config (Gemma 3 marks each layer full or sliding in `layer_types`)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return Geometry(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        sliding_window=window,
        sliding_layers=sum(t == "sliding_attention" for t in layer_types) if window else 0,
    )


def kv_cache_bytes(geo: Geometry, context: int, parallel: int, ubatch: int = UBATCH) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x cells x bytes. A sliding-window layer only keeps
    its window plus one physical batch of cells per sequence, as llama.cpp's SWA cache does."""
    per_cell_per_layer = 2 * geo.kv_heads * geo.head_dim * KV_BYTES
    full_layers = geo.layers - geo.sliding_layers
    swa_cells = min(context, (geo.sliding_window or 0) + ubatch)
    return per_cell_per_layer * parallel * (full_layers * context + geo.sliding_layers * swa_cells)


def compute_buffer_bytes(geo: Geometry, parallel: int, ubatch: int = UBATCH) -> int:
    """The vocabulary-sized logits dominate: the output buffer holds one row per sequence, and the
    compute graph is reserved for a whole physical batch of hidden states and logits."""
    output_buffer = geo.vocab * parallel * LOGIT_BYTES
    graph = ubatch * geo.vocab * LOGIT_BYTES + ubatch * geo.hidden * 4 * 8
    return output_buffer + graph


def budget_bytes(cfg: PipelineConfig) -> tuple[int, str]:
    serve = cfg.serve
    if serve.v_gpu_mb is not None:
        return int(serve.v_gpu_mb * MIB), "serve.v_gpu_mb"
    if serve.gpu_profile not in GPU_PROFILES:
        raise DistillError(
            f"serve.gpu_profile: unknown GPU '{serve.gpu_profile}'; use one of {', '.join(GPU_PROFILES)} "
            "or set serve.v_gpu_mb"
        )
    return GPU_PROFILES[serve.gpu_profile][0], f"gpu profile {serve.gpu_profile}"


def plan_serving(cfg: PipelineConfig, model_bytes: int | None = None, measured_small: int | None = None) -> dict[str, Any]:
    """Every term of n = floor(V_GPU / (V_small + V_batch)) with where it came from."""
    from distill.plan import load_arch

    serve = cfg.serve
    geo = geometry_of(load_arch(cfg, "student"))
    v_gpu, gpu_source = budget_bytes(cfg)
    kv = kv_cache_bytes(geo, serve.context, serve.parallel, serve.ubatch)
    compute = compute_buffer_bytes(geo, serve.parallel, serve.ubatch)
    if serve.v_small_mb is not None:
        v_small, small_source = int(serve.v_small_mb * MIB), "serve.v_small_mb"
    elif measured_small is not None:
        v_small, small_source = measured_small, "measured: RSS of one real instance on this machine"
    else:
        weights, weights_source = _weights_bytes(cfg, model_bytes)
        v_small = weights + int(serve.runtime_overhead_mb * MIB)
        small_source = f"estimate: {weights_source} + serve.runtime_overhead_mb"
    if serve.v_batch_mb is not None:
        v_batch, batch_source = int(serve.v_batch_mb * MIB), "serve.v_batch_mb"
    else:
        v_batch, batch_source = kv + compute, "estimate: KV cache + compute buffers"
    instances = v_gpu // (v_small + v_batch)
    return {
        "gpu": serve.gpu_profile if serve.v_gpu_mb is None else "custom",
        "v_gpu_bytes": v_gpu,
        "v_gpu_source": gpu_source,
        "v_small_bytes": v_small,
        "v_small_source": small_source,
        "v_batch_bytes": v_batch,
        "v_batch_source": batch_source,
        "kv_cache_bytes": kv,
        "compute_buffer_bytes": compute,
        "geometry": geo.__dict__,
        "context": serve.context,
        "parallel": serve.parallel,
        "ubatch": serve.ubatch,
        "instances": int(instances),
        "vllm_supported": _vllm_note(cfg),
    }


def _weights_bytes(cfg: PipelineConfig, model_bytes: int | None) -> tuple[int, str]:
    if model_bytes is not None:
        return model_bytes, "model file size"
    from distill.gguf_writer import planned_size
    from distill.plan import meta_model

    if cfg.serve.backend == "vllm":
        return 2 * sum(p.numel() for p in meta_model(cfg).parameters()), "bf16 weights of the student"
    return planned_size(meta_model(cfg), cfg.export.format), f"planned {cfg.export.format} size of the student"


def _vllm_note(cfg: PipelineConfig) -> str:
    if cfg.serve.v_gpu_mb is not None:
        return "unknown GPU: vLLM needs compute capability >= 8.0 for Gemma 3 (bf16)"
    capability = GPU_PROFILES.get(cfg.serve.gpu_profile, (0, 0.0))[1]
    if capability >= 8.0:
        return f"yes: compute capability {capability} runs Gemma 3 in bf16 under vLLM"
    return (
        f"no: compute capability {capability} has no bf16 in vLLM and Gemma 3 overflows in fp16; "
        "serve the Q8_0 GGUF through llama.cpp"
    )


def format_plan(plan: dict[str, Any]) -> list[tuple[str, str]]:
    def mib(n: int) -> str:
        return f"{n:,} B ({n / MIB:,.1f} MiB)"

    return [
        ("V_GPU", f"{mib(plan['v_gpu_bytes'])} — {plan['v_gpu_source']}"),
        ("V_small", f"{mib(plan['v_small_bytes'])} — {plan['v_small_source']}"),
        ("V_batch", f"{mib(plan['v_batch_bytes'])} — {plan['v_batch_source']}"),
        ("  KV cache", mib(plan["kv_cache_bytes"])),
        ("  compute buffers", mib(plan["compute_buffer_bytes"])),
        ("n = floor(V_GPU / (V_small + V_batch))", str(plan["instances"])),
        ("vLLM for this GPU", plan["vllm_supported"]),
    ]


@dataclass
class Instance:
    port: int
    process: subprocess.Popen
    log_path: Path
    peak_rss: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def sample_rss(self) -> int:
        import psutil

        try:
            rss = psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return self.peak_rss
        self.peak_rss = max(self.peak_rss, rss)
        return rss


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ports(cfg: PipelineConfig, count: int) -> list[int]:
    if cfg.serve.base_port is None:
        return [free_port() for _ in range(count)]
    ports = list(range(cfg.serve.base_port, cfg.serve.base_port + count))
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        raise DistillError(
            f"serve.base_port: port {busy[0]} on 127.0.0.1 is already in use; free it or set another base_port"
        )
    return ports


def server_command(cfg: PipelineConfig, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The OpenAI-compatible server of one instance: llama.cpp on the GGUF, or vLLM on the merged model."""
    s = cfg.serve
    if s.backend == "llama_cpp":
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(s.context), "--n_ubatch", str(s.ubatch),
            "--n_batch", str(s.ubatch), "--n_threads", str(s.threads_per_instance),
            "--n_gpu_layers", "-1",  # offload everything on a GPU build; ignored by the CPU build
        ], {}  # fmt: skip
    import torch

    gpu = torch.cuda.is_available()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(s.context), "--max-num-seqs", str(s.parallel),
        "--dtype", "bfloat16" if gpu else "float32", "--enforce-eager",
    ]  # fmt: skip
    if gpu:
        return command + ["--gpu-memory-utilization", str(round(1 / max(1, s.max_instances or 1), 3))], {}
    # The CPU build sizes its KV cache from this variable; one in-process engine starts fastest.
    return command, {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(s.threads_per_instance)}


@contextmanager
def instances(cfg: PipelineConfig, model: Path, count: int, log_dir: Path) -> Iterator[list[Instance]]:
    """Start `count` servers in their own process groups; always stop them all on exit."""
    started: list[Instance] = []
    try:
        for port in _ports(cfg, count):
            log_path = log_dir / f"instance-{port}.log"
            command, env = server_command(cfg, model, port)
            with log_path.open("w") as log_file:
                process = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                )  # fmt: skip
            started.append(Instance(port, process, log_path))
        _wait_ready(started, cfg.serve.ready_timeout_s)
        yield started
    finally:
        stop(started)


def stop(started: list[Instance]) -> None:
    """SIGTERM each process group, then SIGKILL whatever is still alive after a grace period."""
    for inst in started:
        if inst.process.poll() is None:
            with _suppress_lookup():
                os.killpg(inst.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for inst in started:
        try:
            inst.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(inst.process.pid, signal.SIGKILL)
            inst.process.wait()


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


def _wait_ready(started: list[Instance], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(started)
    while pending:
        for inst in list(pending):
            if inst.process.poll() is not None:
                raise DistillError(
                    f"serve: instance on port {inst.port} exited with code {inst.process.returncode} while "
                    f"starting; last log lines ({inst.log_path}): {inst.tail()}"
                )
            try:
                if httpx.get(f"{inst.url}/models", timeout=2).status_code == 200:
                    pending.remove(inst)
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            inst = pending[0]
            raise DistillError(
                f"serve: instance on port {inst.port} not ready after {timeout:.0f} s (serve.ready_timeout_s); "
                f"last log lines ({inst.log_path}): {inst.tail()}"
            )
        if pending:
            time.sleep(0.25)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def drive_load(
    targets: list[Instance], requests: list[dict[str, Any]], concurrency: int, cfg: PipelineConfig, task: Task
) -> dict[str, Any]:
    """Send every request once, spread round-robin over the targets with `concurrency` in flight,
    sampling each server's memory meanwhile. Returns latency, throughput and validity."""
    import threading

    import httpx

    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            for inst in targets:
                inst.sample_rss()
            stop_sampling.wait(0.2)

    def one(i: int) -> dict[str, Any]:
        inst = targets[i % len(targets)]
        req = requests[i]
        body = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": req["prompt"]}],
            "max_tokens": cfg.serve.max_tokens,
            "temperature": 0.0,
        }
        start = time.perf_counter()
        response = httpx.post(f"{inst.url}/chat/completions", json=body, timeout=cfg.serve.request_timeout_s)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise DistillError(f"serve: instance on port {inst.port} answered HTTP {response.status_code}: {response.text[:200]}")
        data = response.json()
        text = data["choices"][0]["message"]["content"] or ""
        valid = not task.check(text, json.loads(req["payload"]))
        inst.latencies.append(latency)
        return {"latency": latency, "tokens": data.get("usage", {}).get("completion_tokens", 0), "valid": valid}

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(len(requests))))
    finally:
        stop_sampling.set()
        sampler.join()
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "instances": len(targets),
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "latency_s": {
            "p50": round(_percentile(latencies, 50), 4),
            "p95": round(_percentile(latencies, 95), 4),
            "max": round(max(latencies), 4),
        },
        "answers_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "valid_share": round(sum(r["valid"] for r in results) / len(results), 4),
        "peak_rss_bytes": [inst.peak_rss for inst in targets],
    }


def _held_out_requests(cfg: PipelineConfig, count: int) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))
    split = dataset["test"] if len(dataset["test"]) else dataset["validation"]
    rows = [split[i % len(split)] for i in range(count)]
    return [{"prompt": r["prompt"], "payload": r["payload"]} for r in rows]


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


def _device(cfg: PipelineConfig) -> str:
    if cfg.serve.backend == "llama_cpp":
        return "gpu" if llama_cpp("serve").llama_supports_gpu_offload() else "cpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def check_backend(cfg: PipelineConfig) -> None:
    """vLLM runs Gemma 3 only in bf16, which it supports from compute capability 8.0."""
    if cfg.serve.backend == "vllm" and cfg.serve.v_gpu_mb is None and GPU_PROFILES.get(cfg.serve.gpu_profile, (0, 8.0))[1] < 8.0:
        raise DistillError(f"serve.backend=vllm: {_vllm_note(cfg)}; set serve.backend=llama_cpp")


def served_model(cfg: PipelineConfig) -> Path:
    """What the instances load: the GGUF for llama.cpp, the merged folder for vLLM."""
    check_backend(cfg)
    if cfg.serve.backend == "llama_cpp":
        return find_gguf(cfg)
    require_input(cfg, "merge")
    return stage_dir(cfg, "merge") / "model"


def model_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    folder = stage_dir(cfg, "serve")
    model = served_model(cfg)
    require_input(cfg, "generate")
    if cfg.serve.backend == "llama_cpp":
        llama_cpp("serve")  # the instances run its server module: say so before starting any
    task = load_task(cfg)  # a broken task fails before the output folder is touched
    if prepare_output(cfg, "serve", overwrite) == "skip":
        log.info("serve: complete, skipping (%s)", folder)
        return folder
    log.info("serve config: %s", cfg.serve.model_dump())
    upstream = "export" if cfg.serve.backend == "llama_cpp" else "merge"
    record = StageRecord(cfg, "serve", inputs=(upstream, "generate"))
    estimate = plan_serving(cfg, model_bytes=model_bytes(model))
    log_dir = folder / "logs"
    log_dir.mkdir(exist_ok=True)

    with instances(cfg, model, 1, log_dir) as probe:
        idle_rss = probe[0].sample_rss()
    plan = plan_serving(cfg, model_bytes=model_bytes(model), measured_small=idle_rss)
    if plan["instances"] < 1:
        need = plan["v_small_bytes"] + plan["v_batch_bytes"]
        raise DistillError(
            f"serve: budget {plan['v_gpu_bytes'] / MIB:,.0f} MiB ({plan['v_gpu_source']}) is too small for one "
            f"instance: it needs {need / MIB:,.0f} MiB, {(need - plan['v_gpu_bytes']) / MIB:,.0f} MiB missing"
        )
    started = min(plan["instances"], cfg.serve.max_instances or plan["instances"])
    requests = _held_out_requests(cfg, cfg.serve.requests)
    log.info("serve: plan says %d instances; starting %d on this machine", plan["instances"], started)
    with instances(cfg, model, started, log_dir) as fleet:
        multi = drive_load(fleet, requests, started * cfg.serve.parallel, cfg, task)
    with instances(cfg, model, 1, log_dir) as single:
        one = drive_load(single, requests, started * cfg.serve.parallel, cfg, task)

    measured_total = sum(multi["peak_rss_bytes"])
    slot = plan["v_small_bytes"] + plan["v_batch_bytes"]
    report = {
        "unit": task.unit,
        "backend": cfg.serve.backend,
        "device": _device(cfg),
        "estimate": estimate,
        "plan": plan,
        "instances_started": started,
        "multi_instance": multi,
        "single_instance": one,
        "measured_total_bytes": measured_total,
        "slot_bytes": slot,
        # The plan holds when every instance stayed inside its slot (V_small + V_batch) and all together
        # inside V_GPU.
        "budget_held": max(multi["peak_rss_bytes"]) <= slot and measured_total <= plan["v_gpu_bytes"],
        "winner": "multi_instance" if multi["answers_per_s"] >= one["answers_per_s"] else "single_instance",
    }
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", render_report(report))
    record.metrics = {k: report[k] for k in ("instances_started", "measured_total_bytes", "budget_held", "winner")}
    record.metrics.update(
        instances_planned=plan["instances"],
        answers_per_s=multi["answers_per_s"],
        latency_p50_s=multi["latency_s"]["p50"],
        latency_p95_s=multi["latency_s"]["p95"],
        valid_share=multi["valid_share"],
    )
    record.files = {"report": "report.json", "report_md": "report.md"}
    return record.finish()


def render_report(report: dict[str, Any]) -> str:
    plan, multi, one = report["plan"], report["multi_instance"], report["single_instance"]
    started, planned = report["instances_started"], plan["instances"]
    lines = [
        "# Serving check",
        "",
        "| term | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in format_plan(plan)),
        "",
        f"Planned {planned} instances; started {started} here"
        + (" (capped by serve.max_instances)." if started < planned else "."),
        "",
        f"| setup | {report['unit']}s/s | tokens/s | p50 s | p95 s | max s | valid | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in ((f"{started} instances x 1 sequence", multi), (f"1 instance, {multi['concurrency']} in flight", one)):
        lat = res["latency_s"]
        lines.append(
            f"| {name} | {res['answers_per_s']} | {res['tokens_per_s']} | {lat['p50']} | {lat['p95']} | {lat['max']} "
            f"| {res['valid_share']:.0%} | {sum(res['peak_rss_bytes']) / MIB:,.0f} MiB |"
        )
    winner = "several single-sequence instances" if report["winner"] == "multi_instance" else "one instance"
    lines += [
        "",
        f"More {report['unit']}s/s: **{winner}** on the same load.",
        f"Budget held: **{'yes' if report['budget_held'] else 'no'}** — largest instance "
        f"{max(multi['peak_rss_bytes']) / MIB:,.0f} MiB against a slot of {report['slot_bytes'] / MIB:,.0f} MiB "
        f"(V_small + V_batch); {started} instances together {report['measured_total_bytes'] / MIB:,.0f} MiB "
        f"against V_GPU {plan['v_gpu_bytes'] / MIB:,.0f} MiB.",
        "",
    ]
    if report["device"] == "cpu":
        lines.append(
            "This run was on CPU: memory is process RSS (it includes the Python server, which on a GPU would "
            "sit in host memory, not VRAM), and the GPU budget is only a limit the instances had to fit in. On "
            "the GPU, weights, KV cache and compute buffers live in VRAM, the CUDA context adds a fixed cost per "
            "process, and decoding is far faster, so latency and throughput here are not the GPU's."
        )
    return "\n".join(lines) + "\n"
