"""`generate.engine: ray` on a local Ray started by the command: the same data as the local engine, exact
counts when a replica or the driver is killed mid-run, and nothing left running afterwards."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from conftest import REPO, invoke_cli, run_cli, write_config

from distill.config import load_config

CREW = {"seed": 1, "task": {"kind": "crew", "catalog_mode": "allowed", "history_len": 3}}
RAY = {"engine": "ray", "ray": {"actors": 2}}
REFERENCE = {"backend": "reference", "batch_size": 16, "num_examples": 40, "validation_examples": 6, "test_examples": 5}
# a random teacher writes programs only under the grammar: every answer is then accepted, so a run's
# length is known, and each batch takes the tiny teacher a few seconds: long enough to kill something in
SLOW = {
    "backend": "transformers",
    "grammar": True,
    "batch_size": 4,
    "sampling": {"max_tokens": 700},
    "num_examples": 12,
    "validation_examples": 2,
    "test_examples": 2,
}
ANSWER_S = 1.5  # each answer of the paced teacher
ANSWER_REGEX = "[0-9a-f]{8}( [0-9a-f]{8}){3}"  # what it answers: four hex words


class _PacedTeacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible teacher at the network boundary, for the tests of what the engine does with its
    processes: each answer comes after ANSWER_S (time to kill something in, without a model's CPU) and is four
    new hex words, which the `paced` task accepts, so a run's length is known."""

    def log_message(self, *args) -> None:
        return None

    def _send(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the replica that asked was killed while it waited: what these tests do

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "teacher", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(ANSWER_S)
        words = uuid.uuid4().hex
        answer = " ".join(words[i : i + 8] for i in range(0, 32, 8))
        message = {"role": "assistant", "content": answer}
        self._send(
            {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": {"completion_tokens": 4}}
        )


@pytest.fixture
def paced(tmp_path):
    """The config sections of a run on the paced teacher: a jsonl task of 16 inputs whose answers are hex words,
    SLOW's batches, and the Ray engine's replicas asking `_PacedTeacher`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PacedTeacher)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    inputs = tmp_path / "inputs.jsonl"
    splits = ["train"] * 12 + ["validation"] * 2 + ["test"] * 2
    inputs.write_text("".join(json.dumps({"text": f"note {i}", "split": s}) + "\n" for i, s in enumerate(splits)))
    task = {
        "kind": "jsonl",
        "files": [str(inputs)],
        "prompt_field": "text",
        "split_field": "split",
        "regex": ANSWER_REGEX,
    }
    openai = {"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "teacher"}
    generate = {**SLOW, "backend": "openai", "grammar": False, "openai": openai}
    try:
        yield {"seed": 1, "task": task, "generate": generate}
    finally:
        server.shutdown()
        server.server_close()


def records(tmp_path: Path, name: str) -> list[dict]:
    files = sorted((tmp_path / "runs" / name / "generate" / "shards").glob("*/records.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def ray_leftovers() -> list[str]:
    """Ray processes and temporary folders of any command of this test session."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "distill-ray-" in cmd or "distill.reaper" in cmd or cmd.startswith("ray::"):
            found.append(cmd[:80])
    return found + [p.name for p in Path("/tmp").glob("distill-ray-*")]


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "generate", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_records(tmp_path: Path, name: str, count: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while len(records(tmp_path, name)) < count:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline, "no batch was written"
        time.sleep(0.3)


def test_ray_engine_writes_the_same_dataset_as_the_local_engine(tmp_path, tiny_models) -> None:
    from datasets import load_from_disk

    from distill.artifacts import read_manifest

    local = write_config(tmp_path, tiny_models, name="local.yaml", run_name="local", **CREW, generate=REFERENCE)
    cluster = write_config(
        tmp_path, tiny_models, name="cluster.yaml", run_name="cluster", **CREW, generate={**REFERENCE, **RAY}
    )
    for result in (invoke_cli("generate", str(local)), run_cli("generate", str(cluster))):
        assert result.returncode == 0, result.stderr
    datasets = [load_from_disk(str(tmp_path / "runs" / name / "generate/dataset")) for name in ("local", "cluster")]
    for split in ("train", "validation", "test"):
        assert (
            datasets[0][split]["id"] == datasets[1][split]["id"]
            and datasets[0][split]["response"] == datasets[1][split]["response"]
        )
    metrics = [read_manifest(tmp_path / "runs" / name / "generate")["metrics"] for name in ("local", "cluster")]
    timing = ("engine", "cluster", "teacher_seconds", "output_tokens_per_s", "examples_per_s")
    assert {k: v for k, v in metrics[0].items() if k not in timing} == {
        k: v for k, v in metrics[1].items() if k not in timing
    }
    (engine,) = metrics[1]["cluster"]
    assert (
        metrics[1]["engine"] == "ray"
        and engine["nodes"] == 1
        and engine["actors"] == 2
        and len(engine["replicas"]) == 2
    )
    assert metrics[0]["engine"] == "local" and "cluster" not in metrics[0]
    # where the teacher runs is not part of what the data depends on: a run may move between engines
    assert load_config(local).stage_fingerprint("generate") == load_config(cluster).stage_fingerprint("generate")
    assert ray_leftovers() == []


@pytest.mark.slow
def test_a_killed_replica_is_restarted_and_the_run_ends_exact(tmp_path, tiny_models) -> None:
    config = write_config(tmp_path, tiny_models, run_name="replica", **CREW, generate={**SLOW, **RAY})
    proc = start(config)
    wait_for_records(tmp_path, "replica", 4, proc)
    replicas = [
        p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith("ray::_Replica")
    ]
    assert len(replicas) == 2
    replicas[0].kill()  # kill -9, mid-batch
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    recs = records(tmp_path, "replica")
    assert len(recs) == 16 == len({r["id"] for r in recs}) and all(r["status"] == "accepted" for r in recs)
    assert ray_leftovers() == []


@pytest.mark.slow
def test_killing_the_driver_leaves_nothing_running_and_the_same_command_resumes(tmp_path, tiny_models, paced) -> None:
    sections = {**paced, "generate": {**paced["generate"], **RAY}}
    config = write_config(tmp_path, tiny_models, run_name="driver", **sections)
    proc = start(config)
    wait_for_records(tmp_path, "driver", 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = records(tmp_path, "driver")
    deadline = time.time() + 15
    while ray_leftovers() and time.time() < deadline:  # the reaper ends the head's session
        time.sleep(0.3)
    assert ray_leftovers() == []
    result = run_cli("generate", str(config))
    assert result.returncode == 0, result.stderr
    recs = records(tmp_path, "driver")
    assert recs[: len(first)] == first and len(recs) == 16 == len({r["id"] for r in recs})
    assert ray_leftovers() == []


@pytest.mark.slow
def test_sigterm_ends_the_run_like_ctrl_c_and_stops_ray(tmp_path, tiny_models, paced) -> None:
    sections = {**paced, "generate": {**paced["generate"], **RAY}}
    config = write_config(tmp_path, tiny_models, run_name="term", **sections)
    proc = start(config)
    wait_for_records(tmp_path, "term", 4, proc)
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # not Ray's crash handler: the command's own
    stderr = proc.stderr.read()
    assert stderr.strip().splitlines()[-1] == "error: terminated; re-run the same command to resume"
    assert "Traceback" not in stderr and ray_leftovers() == []


@pytest.mark.slow
def test_a_replica_that_keeps_dying_is_one_line_and_keeps_what_is_done(tmp_path, tiny_models, paced) -> None:
    generate = {**paced["generate"], "engine": "ray", "ray": {"actors": 2, "max_restarts": 0}}
    config = write_config(tmp_path, tiny_models, run_name="dies", **{**paced, "generate": generate})
    proc = start(config)
    wait_for_records(tmp_path, "dies", 4, proc)
    kept = records(tmp_path, "dies")
    for p in psutil.process_iter(["cmdline"]):
        if " ".join(p.info["cmdline"] or []).startswith("ray::_Replica"):
            p.kill()
    assert proc.wait(timeout=120) == 1
    stderr = proc.stderr.read()
    error = stderr.strip().splitlines()[-1]
    assert "generate.ray: replica" in error and "after 0 restart(s)" in error and "re-run to continue" in error
    assert "Traceback" not in stderr and records(tmp_path, "dies")[: len(kept)] == kept
    assert ray_leftovers() == []


def test_ray_input_errors(tmp_path, tiny_models, monkeypatch) -> None:
    generate = {
        "backend": "reference",
        "num_examples": 4,
        "validation_examples": 1,
        "test_examples": 1,
        "engine": "ray",
        "ray": {"address": "127.0.0.1:9"},
    }
    config = write_config(tmp_path, tiny_models, run_name="bad", **CREW, generate=generate)
    result = run_cli("generate", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "generate.ray.address: no Ray cluster answers at 127.0.0.1:9" in result.stderr
    assert not (tmp_path / "runs/bad").exists()  # refused before the run folder is touched

    from distill.errors import DistillError
    from distill.teachers.ray_pool import check_cluster

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(DistillError, match=r"Ray is not installed; `pip install -e '.\[ray\]'`"):
        check_cluster(load_config(config))
