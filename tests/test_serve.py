"""The serving check with real llama.cpp server processes on the tiny GGUF."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, make_exported_run, run_cli
from distill.config import load_config

SERVE = "serve: {max_instances: 2, requests: 4, max_tokens: 24, context: 2048, ready_timeout_s: 60}\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return make_exported_run(tmp_path_factory.mktemp("serve"), SERVE)


def servers_of(gguf_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "llama_cpp.server" in cmd and str(gguf_dir) in cmd:
            found.append(proc)
    return found


@pytest.mark.slow
def test_two_instances_under_load_write_a_report(exported) -> None:
    result = run_cli("serve", str(exported))
    assert result.returncode == 0, result.stderr
    cfg = load_config(exported)
    folder = cfg.run_path / "serve"
    report = json.loads((folder / "report.json").read_text())
    assert report["instances_started"] == 2 and report["plan"]["instances"] >= 2
    assert report["plan"]["v_small_source"].startswith("measured")
    for key in ("multi_instance", "single_instance"):
        res = report[key]
        assert res["requests"] == 4 and res["completion_tokens"] > 0
        assert res["latency_s"]["max"] >= res["latency_s"]["p95"] >= res["latency_s"]["p50"] > 0
        assert all(rss > 10 * 2**20 for rss in res["peak_rss_bytes"])
        assert 0 <= res["valid_share"] <= 1
    assert len(report["multi_instance"]["peak_rss_bytes"]) == 2
    assert report["winner"] in ("multi_instance", "single_instance")
    markdown = (folder / "report.md").read_text()
    assert "n = floor(V_GPU / (V_small + V_batch))" in markdown and "This run was on CPU" in markdown
    assert servers_of(cfg.run_path / "export") == []


@pytest.mark.slow
def test_interrupt_stops_every_instance(exported, tmp_path) -> None:
    cfg = load_config(exported)
    log_dir = cfg.run_path / "serve" / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "serve", str(exported), "--overwrite", "serve.requests=40", "serve.max_tokens=200"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(servers_of(cfg.run_path / "export")) < 2:
        time.sleep(0.2)
    children = servers_of(cfg.run_path / "export")
    assert len(children) >= 2, "the fleet never started"
    ports = [int(p.name.split("-")[1].split(".")[0]) for p in log_dir.glob("instance-*.log")]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    psutil.wait_procs(children, timeout=15)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still bound"


@pytest.mark.slow
def test_error_cases(exported, tmp_path) -> None:
    cfg = load_config(exported)
    # a budget too small for one instance
    res = run_cli("serve", str(exported), "serve.v_gpu_mb=1", "--overwrite")
    assert res.returncode == 1 and "too small for one instance" in res.stderr and "MiB missing" in res.stderr
    # a port already in use
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("serve", str(exported), f"serve.base_port={port}", "--overwrite")
    assert res.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in res.stderr
    # an instance that cannot start: a broken GGUF (restored afterwards)
    gguf = cfg.run_path / "export" / "e-q8_0.gguf"
    original = gguf.read_bytes()
    try:
        gguf.write_bytes(original[:4096])
        res = run_cli("serve", str(exported), "--overwrite")
        assert res.returncode == 1 and "exited with code" in res.stderr and "last log lines" in res.stderr
    finally:
        gguf.write_bytes(original)
    assert servers_of(cfg.run_path / "export") == []
    assert "Traceback" not in res.stderr


def test_missing_gguf_names_the_command(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"run_name: s\nrun_dir: {tmp_path}\nmodels: {{teacher: a, student: b}}\n")
    res = run_cli("serve", str(path))
    assert res.returncode == 1 and "export/manifest.json not found: run `distill export" in res.stderr


@pytest.mark.slow
def test_vllm_backend_serves_the_merged_model(exported) -> None:
    overrides = ["serve.backend=vllm", "serve.gpu_profile=a100-40gb", "serve.max_instances=1", "serve.requests=2",
                 "serve.max_tokens=8", "serve.ready_timeout_s=180", "--overwrite"]  # fmt: skip
    res = run_cli("serve", str(exported), *overrides)
    assert res.returncode == 0, res.stderr
    report = json.loads((load_config(exported).run_path / "serve/report.json").read_text())
    assert report["backend"] == "vllm" and report["multi_instance"]["completion_tokens"] > 0
    # on a Turing card the plan refuses vLLM and says why
    res = run_cli("serve", str(exported), "serve.backend=vllm", "--dry-run")
    assert res.returncode == 1 and "compute capability 7.5" in res.stderr and "llama_cpp" in res.stderr
