"""The teacher as replicas on a Ray cluster (`generate.engine: ray`): the same backends, inside actors.

The generate loop is unchanged: it still makes each batch from what is already accepted, judges the
answers (checks, near-duplicates) and appends them, one fsync'd write per batch, in input order. Only
the teacher call is spread: a batch is split between the replicas and gathered back in order. So
instance ids decide what is done exactly as on one machine: a replica that dies is restarted and its
share sent again (`generate.ray.max_restarts`), a driver that dies loses at most the batch in flight
and the same command continues, and a deterministic teacher gives the very same dataset.

Without `generate.ray.address` the command starts a local Ray head of its own (its own session, its own
temporary folder) and a reaper that ends them when the command ends, however it ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError, Terminated
from distill.tasks import Grammar
from distill.teachers import Completion

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60


class _Replica:
    """One teacher backend inside an actor."""

    def __init__(self, cfg: PipelineConfig, threads: int, cwd: str):
        from distill.tasks import load_task
        from distill.teachers import make_teacher, teacher_backend

        if os.path.isdir(cwd):  # relative paths and a python pack's module, as the command sees them
            os.chdir(cwd)
        if teacher_backend(cfg).local_model:  # the others run no model here: no torch to import
            import torch

            torch.set_num_threads(threads)
        self.teacher = make_teacher(cfg, load_task(cfg))

    def generate(
        self, instances: list[dict[str, Any]], grammars: list[Grammar] | None
    ) -> tuple[list[Completion], float]:
        start = time.perf_counter()
        return self.teacher.generate(instances, grammars), time.perf_counter() - start

    def ready(self) -> None:
        """Answers once the replica is built, so that a backend that cannot start fails here."""


class _LocalHead:
    """`ray start --head --block` in a session of its own, with a reaper for that session."""

    def __init__(self, cpus: float):
        self.folder = tempfile.mkdtemp(prefix="distill-ray-")  # short: Ray's socket paths are length-limited
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.log = open(os.path.join(self.folder, "head.log"), "wb")  # noqa: SIM115 - closed in stop()
        self.head = subprocess.Popen(
            [
                ray,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--num-cpus={max(1, int(cpus))}",
                f"--temp-dir={self.folder}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            start_new_session=True,
        )
        self.reaper = subprocess.Popen(
            [sys.executable, "-m", "distill.reaper", str(os.getpid()), str(self.head.pid), self.folder],
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _reachable(self.address):
            if self.head.poll() is not None or time.monotonic() > deadline:
                tail = Path(self.folder, "head.log").read_bytes()[-300:].decode(errors="replace")
                self.stop()
                raise DistillError(f"generate.engine=ray: the local Ray head did not start ({tail.strip()})")
            time.sleep(0.2)

    def stop(self) -> None:
        from distill.reaper import end_session

        end_session(self.head.pid)  # the head's session: gcs, raylet, agents, workers
        self.head.wait()
        self.reaper.kill()
        self.reaper.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _reachable(address: str) -> bool:
    host, _, port = address.split("://")[-1].rpartition(":")  # host:port, or ray://host:port (Ray Client)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except (OSError, ValueError):
        return False


def check_cluster(cfg: PipelineConfig) -> None:
    """Ray is installed and the configured cluster answers: checked before anything is written."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise DistillError(
            "generate.engine=ray: Ray is not installed; `pip install -e '.[ray]'`, or set generate.engine=local"
        ) from None
    address = cluster_address(cfg)
    if address is not None and not _reachable(address):
        raise DistillError(
            f"generate.ray.address: no Ray cluster answers at {address}; start one (`ray start --head`) or fix the address"
        )


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The configured cluster, else the one a `ray job submit` runs the command on; None: start a local head."""
    return cfg.generate.ray.address or os.environ.get("RAY_ADDRESS") or None


class RayTeachers:
    """The Teacher interface over `generate.ray.actors` replicas of the configured backend."""

    name = "ray"

    def __init__(self, cfg: PipelineConfig):
        import ray

        r = cfg.generate.ray
        check_cluster(cfg)
        address = cluster_address(cfg)
        self.max_restarts = r.max_restarts
        self.terminated = False
        self.head = _LocalHead(r.actors * r.cpus_per_actor) if address is None else None
        try:
            ray.init(
                address=self.head.address if self.head else address, log_to_driver=False, logging_level=logging.WARNING
            )
            # Ray's core worker takes SIGTERM for its crash dump (exit 1, no clean-up): SIGTERM ends the
            # command as it does without Ray, stopping the replicas and the head on the way out
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._on_sigterm)
            actor = ray.remote(
                num_cpus=r.cpus_per_actor,
                num_gpus=r.gpus_per_actor,
                max_restarts=r.max_restarts,
                max_task_retries=r.max_restarts,
            )(_Replica)
            threads = max(1, int(r.cpus_per_actor))
            self.replicas = [actor.remote(cfg, threads, os.getcwd()) for _ in range(r.actors)]
            ray.get([replica.ready.remote() for replica in self.replicas])
        except BaseException:
            self.close()
            raise
        nodes = [n for n in ray.nodes() if n["Alive"]]
        self.cluster = {
            "engine": "ray",
            "address": address or "local",
            "nodes": len(nodes),
            "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
            "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes),
            "actors": r.actors,
        }
        self.per_actor = [{"examples": 0, "output_tokens": 0, "seconds": 0.0} for _ in self.replicas]
        log.info("generate on Ray: %d replicas over %d node(s), %g CPUs", r.actors, len(nodes), self.cluster["cpus"])

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        import ray

        size = -(-len(instances) // len(self.replicas))  # contiguous shares, in order
        shares = [
            (instances[i : i + size], grammars[i : i + size] if grammars else None)
            for i in range(0, len(instances), size)
        ]
        refs = [replica.generate.remote(share, g) for replica, (share, g) in zip(self.replicas, shares)]
        out: list[Completion] = []
        for k, ((share, _), ref) in enumerate(zip(shares, refs)):
            try:
                completions, seconds = ray.get(ref)
            except KeyboardInterrupt:
                if self.terminated:  # ray.get turns what the handler raised into a plain KeyboardInterrupt
                    raise Terminated from None
                raise
            except ray.exceptions.RayError as exc:
                ids = ", ".join(inst["id"] for inst in share[:3]) + (", ..." if len(share) > 3 else "")
                reason = str(exc).strip().splitlines()[0][:200]
                raise DistillError(
                    f"generate.ray: replica {k} failed on inputs {ids} after {self.max_restarts} restart(s) "
                    f"({reason}); every finished batch is kept: re-run to continue, or raise generate.ray.max_restarts"
                ) from None
            stats = self.per_actor[k]
            stats["examples"] += len(share)
            stats["output_tokens"] += sum(c.output_tokens for c in completions)
            stats["seconds"] += seconds
            out += completions
        return out

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.terminated = True
        raise Terminated

    def throughput(self) -> list[dict[str, float]]:
        """Examples/s and output tokens/s of each replica so far (time inside its teacher)."""
        return [
            {
                "examples_per_s": round(s["examples"] / s["seconds"], 2) if s["seconds"] else 0.0,
                "tokens_per_s": round(s["output_tokens"] / s["seconds"], 1) if s["seconds"] else 0.0,
            }
            for s in self.per_actor
        ]

    def close(self) -> None:
        import ray

        ray.shutdown()
        if self.head is not None:
            self.head.stop()
            self.head = None
