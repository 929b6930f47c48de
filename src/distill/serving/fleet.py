"""Server processes on 127.0.0.1: native llama-server (or vLLM), watched, measured, and always stopped.

Each server runs in its own session (a terminal's Ctrl-C reaches only `distill`, which then stops them in
order) and with a parent-death signal, so even `kill -9` of `distill` takes them down with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError

log = logging.getLogger(__name__)

SERVED_NAME = "student"
PR_SET_PDEATHSIG = 1


@dataclass
class Server:
    """One server process: its slots, threads, command and what was measured of it."""

    port: int
    slots: int
    threads: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    ready: bool = False  # answering since its last start
    peak: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def llama_server_binary(cfg: PipelineConfig) -> Path:
    """serve.llama_server, else the one `make setup` put beside this Python, else the one on PATH."""
    configured = cfg.serve.llama_server
    if configured is not None:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DistillError(
                f"serve.llama_server: {path} is not an executable file; point it at a llama-server binary"
            )
        return path
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise DistillError(
        "serve: llama-server not found beside this Python or on PATH; run `make setup` "
        "(scripts/install_llama_cpp.sh builds it) or set serve.llama_server=/path/to/llama-server"
    )


def server_command(
    cfg: PipelineConfig, model: Path, port: int, slots: int, threads: int
) -> tuple[list[str], dict[str, str]]:
    """The OpenAI-compatible server: llama-server on the GGUF, or vLLM on the merged model."""
    s = cfg.serve
    if s.backend == "llama_cpp":
        return [
            str(llama_server_binary(cfg)),
            "--model",
            str(model),
            "--alias",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # One KV pool shared by the slots, each slot capped at the configured context.
            "--parallel",
            str(slots),
            "--ctx-size",
            str(slots * s.context),
            "--kv-unified",
            "--kv-unified-per-slot",
            str(s.context),
            "--ubatch-size",
            str(s.ubatch),
            "--batch-size",
            str(s.ubatch),
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            "--n-gpu-layers",
            "999",
            "--fit",
            "off",  # everything on the GPU of a GPU build, sized by us
            # The prompt cache keeps copies of slots' KV in host RAM: not part of the GPU budget.
            "--cache-ram",
            "0",
            "--metrics",
            "--no-webui",
        ], {}
    import torch

    gpu = torch.cuda.is_available()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(s.context),
        "--max-num-seqs",
        str(slots),
        "--dtype",
        "bfloat16" if gpu else "float32",
        "--enforce-eager",
    ]
    if gpu:
        return command + ["--gpu-memory-utilization", str(round(1 / max(1, s.max_instances or 1), 3))], {}
    # The CPU build sizes its KV cache from this variable; one in-process engine starts fastest.
    return command, {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(threads),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def claim_ports(first: int | None, count: int, setting: str) -> list[int]:
    """`count` ports from `first` on, each checked free; free ports from the OS when `first` is None."""
    if first is None:
        return [free_port() for _ in range(count)]
    ports = list(range(first, first + count))
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        raise DistillError(f"{setting}: port {busy[0]} on 127.0.0.1 is already in use; free it or choose another port")
    return ports


def make_servers(
    cfg: PipelineConfig, model: Path, ports: list[int], slots: int, threads: int, log_dir: Path, tag: str
) -> list[Server]:
    servers = []
    for port in ports:
        command, env = server_command(cfg, model, port, slots, threads)
        servers.append(Server(port, slots, threads, command, env, log_dir / f"{tag}-{port}.log"))
    return servers


# Looked up once in the parent: the child between fork and exec must not load libraries (another
# thread of the parent may have held the loader's lock at the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> None:
    """Runs in the child before exec: SIGKILL when the parent dies, even by kill -9."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def start(server: Server) -> None:
    """Must be called from the main thread: the parent-death signal fires when the spawning thread ends."""
    parent = os.getpid()
    server.ready = False
    with server.log_path.open("a") as log_file:
        server.process = subprocess.Popen(
            server.command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **server.env},
            preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform == "linux" else None,  # noqa: PLW1509
        )


def stop(servers: list[Server]) -> None:
    """SIGTERM each process group, again each server still up a second later, then SIGKILL whatever is still alive
    after a grace period. After the first SIGTERM llama-server waits for open client connections to close (the
    load generator's or a user's, in mid-answer); the second ends it at once. vLLM's API server ignores the second
    and drains as it would; the second goes to the server alone, so vLLM's engine is left to its clean-up."""
    running = [s for s in servers if s.process is not None]
    deadline = time.monotonic() + 10
    _sigterm(running, os.killpg)
    second = time.monotonic() + 1
    while time.monotonic() < second and any(s.process.poll() is None for s in running):
        time.sleep(0.05)
    _sigterm(running, os.kill)
    for server in running:
        try:
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def _sigterm(servers: list[Server], kill: Callable[[int, int], None]) -> None:
    """SIGTERM to each server still running: its process group (os.killpg) or the process alone (os.kill)."""
    for server in servers:
        if server.process.poll() is None:
            with suppress(ProcessLookupError):
                kill(server.process.pid, signal.SIGTERM)


def wait_ready(servers: list[Server], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for server in list(pending):
            if not server.alive():
                code = server.process.returncode if server.process else None
                raise DistillError(
                    f"serve: server on port {server.port} exited with code {code} while starting; "
                    f"last log lines ({server.log_path}): {server.tail()}"
                )
            with suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                    server.ready = True
                    pending.remove(server)
        if pending and time.monotonic() > deadline:
            server = pending[0]
            raise DistillError(
                f"serve: server on port {server.port} not ready after {timeout:.0f} s (serve.ready_timeout_s); "
                f"last log lines ({server.log_path}): {server.tail()}"
            )
        if pending:
            time.sleep(0.25)


@contextmanager
def running(servers: list[Server], ready_timeout: float) -> Iterator[list[Server]]:
    """Start the servers, wait until each answers; stop every one on the way out, however it is left."""
    try:
        for server in servers:
            start(server)
        wait_ready(servers, ready_timeout)
        yield servers
    finally:
        stop(servers)


def restart_dead(servers: list[Server], ready_timeout: float, say: Callable[[str], None]) -> None:
    """Start again every server whose process ended, saying which and why as soon as it is started again (not
    once it is ready: a stop that comes while it loads must not lose the line)."""
    for server in servers:
        if server.process is not None and not server.alive():
            code = server.process.returncode
            start(server)
            say(f"server on port {server.port} exited with code {code}; restarted (log: {server.log_path})")
            wait_ready([server], ready_timeout)


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def gpu_bytes_by_pid() -> dict[int, int]:
    """Device memory per process from nvidia-smi; empty without an NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    found = {}
    for line in out.strip().splitlines():
        pid, _, mib = line.partition(",")
        with suppress(ValueError):
            found[int(pid)] = int(float(mib)) * 2**20
    return found


def sample_memory(server: Server, gpu: dict[int, int]) -> None:
    """Peak PSS and USS of the server's process tree (native code only, no Python interpreter for
    llama-server) and its GPU memory where nvidia-smi reports it."""
    import psutil

    if not server.alive():
        return
    pss = uss = 0
    procs = _tree(server.process.pid)
    for proc in procs:
        with suppress(psutil.Error):
            info = proc.memory_full_info()
            pss += info.pss
            uss += info.uss
    current = {"pss_bytes": pss, "uss_bytes": uss}
    if gpu:
        current["gpu_bytes"] = sum(gpu.get(p.pid, 0) for p in procs)
    for key, value in current.items():
        server.peak[key] = max(server.peak.get(key, 0), value)


def scrape_metrics(server: Server) -> dict[str, float]:
    """The server's Prometheus `/metrics`, as name -> value (labels dropped)."""
    import httpx

    try:
        response = httpx.get(f"{server.url}/metrics", timeout=2)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with suppress(ValueError):
            values[name.split("{")[0]] = float(value)
    return values


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def fleet_label(fleet: str, servers: int, slots: int) -> str:
    """ "5 processes x 1 slot" or "1 server x 180 slots"."""
    return f"{_count(servers, 'server' if fleet == 'slots' else 'process')} x {_count(slots, 'slot')}"
