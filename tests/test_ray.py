"""`generate.engine: ray` on a local Ray started by the command: the same data as the local engine, exact
counts when a replica or the driver is killed mid-run, and nothing left running afterwards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, crew_task, run_cli

from distill.config import load_config

RAY = "  engine: ray\n  ray: {actors: 2}\n"
# a random teacher writes programs only under the grammar: every answer is then accepted, so a run's
# length is known, and each batch takes the tiny teacher a few seconds: long enough to kill something in
SLOW = "  backend: transformers\n  grammar: true\n  batch_size: 4\n  sampling: {max_tokens: 700}\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from distill.config import TinyModelsConfig
    from distill.models import build_tiny

    out = tmp_path_factory.mktemp("models")
    build_tiny(out, TinyModelsConfig(seed=0, corpus_size=60), crew_task())
    return out


def write_config(tmp_path: Path, models: Path, name: str, generate: str, sizes: tuple[int, int, int]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"run_name: {name}\nrun_dir: {tmp_path / 'runs'}\nseed: 1\n"
        f"models: {{teacher: {models / 'teacher'}, student: {models / 'student'}}}\n"
        "task: {kind: crew, catalog_mode: allowed, history_len: 3}\n"
        f"generate:\n  num_examples: {sizes[0]}\n  validation_examples: {sizes[1]}\n  test_examples: {sizes[2]}\n"
        + generate
    )
    return path


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


def test_ray_engine_writes_the_same_dataset_as_the_local_engine(tmp_path, models) -> None:
    from datasets import load_from_disk

    from distill.artifacts import read_manifest

    sizes = (40, 6, 5)
    local = write_config(tmp_path, models, "local", "  backend: reference\n  batch_size: 16\n", sizes)
    cluster = write_config(tmp_path, models, "cluster", "  backend: reference\n  batch_size: 16\n" + RAY, sizes)
    for config in (local, cluster):
        result = run_cli("generate", str(config))
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
def test_a_killed_replica_is_restarted_and_the_run_ends_exact(tmp_path, models) -> None:
    config = write_config(tmp_path, models, "replica", SLOW + RAY, (12, 2, 2))
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
def test_killing_the_driver_leaves_nothing_running_and_the_same_command_resumes(tmp_path, models) -> None:
    config = write_config(tmp_path, models, "driver", SLOW + RAY, (12, 2, 2))
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
def test_sigterm_ends_the_run_like_ctrl_c_and_stops_ray(tmp_path, models) -> None:
    config = write_config(tmp_path, models, "term", SLOW + RAY, (12, 2, 2))
    proc = start(config)
    wait_for_records(tmp_path, "term", 4, proc)
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # not Ray's crash handler: the command's own
    stderr = proc.stderr.read()
    assert stderr.strip().splitlines()[-1] == "error: terminated; re-run the same command to resume"
    assert "Traceback" not in stderr and ray_leftovers() == []


@pytest.mark.slow
def test_a_replica_that_keeps_dying_is_one_line_and_keeps_what_is_done(tmp_path, models) -> None:
    config = write_config(
        tmp_path, models, "dies", SLOW + "  engine: ray\n  ray: {actors: 2, max_restarts: 0}\n", (12, 2, 2)
    )
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


def test_ray_input_errors(tmp_path, models, monkeypatch) -> None:
    config = write_config(
        tmp_path, models, "bad", "  backend: reference\n  engine: ray\n  ray: {address: '127.0.0.1:9'}\n", (4, 1, 1)
    )
    result = run_cli("generate", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "generate.ray.address: no Ray cluster answers at 127.0.0.1:9" in result.stderr
    assert not (tmp_path / "runs/bad").exists()  # refused before the run folder is touched

    from distill.errors import DistillError
    from distill.teachers.ray_pool import check_cluster

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(DistillError, match=r"Ray is not installed; `pip install -e '.\[ray\]'`"):
        check_cluster(load_config(config))
