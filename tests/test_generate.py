import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import (
    REPO,
    VLLM_ENV,
    check_captured_distribution,
    crew_task,
    invoke_cli,
    kill_9_then_resume,
    run_cli,
    vllm_server,
    write_config,
)

from distill.config import load_config

RUN = {"run_name": "g", "seed": 1}
GENERATE = {"backend": "reference", "num_examples": 40, "validation_examples": 6, "test_examples": 5, "batch_size": 16}
VLLM = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "cpu_kvcache_gb": 1}


def load_records(folder: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted(folder.glob("shards/*/records.jsonl")) for line in f.read_text().splitlines()
    ]


def test_reference_backend_end_to_end_with_splits(tmp_path, tiny_models) -> None:
    from datasets import load_from_disk

    from distill.artifacts import read_manifest
    from distill.stages.generate import run

    cfg = load_config(write_config(tmp_path, tiny_models, **RUN, generate=GENERATE))
    folder = run(cfg)
    data = load_from_disk(str(folder / "dataset"))
    assert {k: len(v) for k, v in data.items()} == {"train": 40, "validation": 6, "test": 5}
    assert set(data["train"].column_names) == {"id", "index", "group", "payload", "prompt", "response"}
    train_groups = set(data["train"]["group"])
    assert not train_groups & (set(data["validation"]["group"]) | set(data["test"]["group"]))
    ids = [i for split in data.values() for i in split["id"]]
    assert len(ids) == len(set(ids))
    manifest = read_manifest(folder)
    metrics = manifest["metrics"]
    assert metrics["counts"]["train"] == 40 and metrics["acceptance_rate"] == 1.0
    assert metrics["prompt_tokens"]["max"] >= metrics["prompt_tokens"]["p95"] >= metrics["prompt_tokens"]["p50"] > 100
    assert metrics["response_tokens"]["mean"] > 50
    # a second run is a no-op
    before = (folder / "manifest.json").read_text()
    assert run(cfg) == folder and (folder / "manifest.json").read_text() == before


def test_near_duplicates_and_reasoning_only_are_rejected() -> None:
    from distill.dedup import ExampleDeduplicator
    from distill.stages.generate import judge
    from distill.teachers.reference import ReferenceTeacher

    task = crew_task()
    example = task.example("train", 0)
    inst = {"prompt": example.prompt, "payload": example.payload, "reference": example.reference}
    answer = ReferenceTeacher(load_config(REPO / "configs/tiny.yaml"), task).generate([inst])[0].text
    dedup = ExampleDeduplicator("answer", 0.9)
    assert judge(f"<think>\n\n</think>\n\n{answer}", inst, task, dedup)[:2] == ("accepted", [])
    assert judge(answer, inst, task, dedup)[:2] == ("rejected", ["near_duplicate"])
    assert judge("<think>I should plan a push day", inst, task, dedup)[:2] == ("rejected", ["only_reasoning"])
    status, reasons, _, _ = judge("Workout 1: push\n- moon_walk: 3x10, rest 60 s", inst, task, dedup)
    assert status == "rejected" and "unknown_exercise" in reasons


def test_kill_9_then_resume_gives_exact_unique_counts(tmp_path, tiny_models) -> None:
    # 100 lines of 311 by the kill: the resume has two thirds of the run to do
    path = write_config(tmp_path, tiny_models, **RUN, generate={**GENERATE, "num_examples": 300, "batch_size": 4})
    before = kill_9_then_resume(path, tmp_path / "runs/g/generate/shards/shard-0-of-1/records.jsonl", 100, 120)
    assert 100 <= before.count(b"\n") < 311, "the run must be killed mid-way"
    recs = load_records(tmp_path / "runs/g/generate")
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids))
    accepted = [r for r in recs if r["status"] == "accepted"]
    assert sum(r["split"] == "train" for r in accepted) == 300
    assert sum(r["split"] == "validation" for r in accepted) == 6


def test_shards_then_merge(tmp_path, tiny_models) -> None:
    path = write_config(tmp_path, tiny_models, **RUN, generate=GENERATE)
    for i in range(3):
        result = run_cli("generate", str(path), "--shard", f"{i}/3")
        assert result.returncode == 0, result.stderr
        if i < 2:
            early = run_cli("generate", str(path), "--merge-shards")
            assert early.returncode == 1 and "are not finished" in early.stderr
    result = invoke_cli("generate", str(path), "--merge-shards")
    assert result.returncode == 0, result.stderr
    from datasets import load_from_disk

    sharded = load_from_disk(str(tmp_path / "runs/g/generate/dataset"))
    assert {k: len(v) for k, v in sharded.items()} == {"train": 40, "validation": 6, "test": 5}
    ids = [i for split in sharded.values() for i in split["id"]]
    assert len(ids) == len(set(ids))
    for i in range(3):  # each shard did exactly its own indices
        shard_recs = [
            json.loads(x)
            for x in (tmp_path / f"runs/g/generate/shards/shard-{i}-of-3/records.jsonl").read_text().splitlines()
        ]
        assert shard_recs and all(r["index"] % 3 == i for r in shard_recs)

    # a record present in two shards is refused at merge
    (tmp_path / "runs/g/generate/manifest.json").unlink()
    first = (tmp_path / "runs/g/generate/shards/shard-0-of-3/records.jsonl").read_text().splitlines()[0]
    with (tmp_path / "runs/g/generate/shards/shard-1-of-3/records.jsonl").open("a") as fh:
        fh.write(first + "\n")
    result = run_cli("generate", str(path), "--merge-shards")
    assert result.returncode == 1 and "appears in both shard-0-of-3 and shard-1-of-3" in result.stderr


def test_corrupt_shard_line_is_reported_and_kept(tmp_path, tiny_models) -> None:
    path = write_config(tmp_path, tiny_models, **RUN, generate={**GENERATE, "max_attempts_factor": 1.0})
    records = tmp_path / "runs/g/generate/shards/shard-0-of-1/records.jsonl"
    # stop a run early by asking for more than the budget allows: a teacher that fails checks
    invoke_cli("generate", str(path), "--shard", "0/1")
    lines = records.read_text().splitlines()
    lines[3] = lines[3][:40]
    records.write_text("\n".join(lines) + "\n")
    (tmp_path / "runs/g/generate/manifest.json").unlink(missing_ok=True)
    snapshot = records.read_bytes()
    result = run_cli("generate", str(path))
    assert result.returncode == 1
    assert f"{records}:4: corrupt record" in result.stderr and "Traceback" not in result.stderr
    assert records.read_bytes() == snapshot


def test_bad_input_errors(tmp_path, tiny_models) -> None:
    path = write_config(tmp_path, tiny_models, **RUN, generate=GENERATE)
    res = run_cli("generate", str(path), "generate.backend=magic")
    assert res.returncode == 1 and "generate.backend" in res.stderr
    res = run_cli("generate", str(path), "generate.backend=vllm", f"models.teacher={tmp_path / 'nope'}")
    assert res.returncode == 1 and "model folder" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("generate", str(path), "generate.backend=openai", "generate.openai.base_url=http://127.0.0.1:9/v1")
    assert res.returncode == 1 and "not reachable" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("generate", str(path), "--shard", "3/2")
    assert res.returncode == 1 and "--shard 3/2" in res.stderr


GRAMMAR_LEAVES = {"near_duplicate"}  # the crew grammar enforces every check; only the dedup filter is left


@pytest.mark.slow
def test_vllm_backend_on_tiny_qwen3(tmp_path, tiny_models) -> None:
    generate = {**GENERATE, "max_attempts_factor": 1.0, "sampling": {"max_tokens": 24}, "vllm": VLLM}
    path = write_config(tmp_path, tiny_models, **RUN, generate=generate)
    result = run_cli(
        "generate",
        str(path),
        "generate.backend=vllm",
        "generate.num_examples=8",
        "generate.validation_examples=2",
        "generate.test_examples=2",
        env=VLLM_ENV,
    )
    # a random teacher writes no valid program: the stage reports it and keeps what it did
    assert result.returncode == 1 and "ran out of attempts" in result.stderr, result.stderr
    recs = load_records(tmp_path / "runs/g/generate")
    assert len(recs) == 12
    assert all(r["status"] == "rejected" and r["output_tokens"] > 0 for r in recs)
    assert all("<think>" not in r["response"] for r in recs)
    assert sum(r["think_blocks"] for r in recs) == 0  # the empty think block lives in the prompt, not the answer
    # most of its faults are of form: what the grammar test below shuts out
    assert {x for r in recs for x in r["reasons"]} - GRAMMAR_LEAVES


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_a_teacher_under_the_grammar_is_rejected_only_for_what_the_grammar_cannot_say(
    tmp_path, tiny_models, backend
) -> None:
    generate = {**GENERATE, "max_attempts_factor": 1.0, "sampling": {"max_tokens": 700}, "vllm": VLLM}
    path = write_config(tmp_path, tiny_models, **RUN, generate=generate)
    args = (
        f"generate.backend={backend}",
        "generate.num_examples=8",
        "generate.validation_examples=2",
        "generate.test_examples=2",
    )
    cli = run_cli if backend == "vllm" else invoke_cli  # vLLM takes over its process: a fresh one
    # with the teacher's top-5 at every token (what train.objective=kd distils)
    constrained = cli("generate", str(path), *args, "generate.grammar=true", "generate.logprobs=5", env=VLLM_ENV)
    recs = load_records(tmp_path / "runs/g/generate")
    assert len(recs) >= 12 and all(r["output_tokens"] > 0 for r in recs), constrained.stderr
    assert {x for r in recs for x in r["reasons"]} <= GRAMMAR_LEAVES
    check_captured_distribution(tmp_path / "runs/g/generate", tiny_models / "teacher", 5)
    if backend == "vllm":
        return  # the same teacher free on vLLM is test_vllm_backend_on_tiny_qwen3
    # free, and not as long (an answer need not be long to be wrong in form)
    free = cli("generate", str(path), *args, "run_name=free", "generate.sampling.max_tokens=64")
    assert "ran out of attempts" in free.stderr  # a random teacher, free, writes no valid program...
    reasons = {x for r in load_records(tmp_path / "runs/free/generate") for x in r["reasons"]}
    assert reasons - GRAMMAR_LEAVES  # ...and most of its faults are of form


class _FlakyProxy(BaseHTTPRequestHandler):
    """Answers the first chat request with 503, then forwards to the real server."""

    upstream = ""
    failures_left = 1
    chat_calls = 0

    def log_message(self, *args) -> None:
        return None

    def _forward(self, method: str, body: bytes | None = None) -> None:
        import httpx

        response = httpx.request(
            method, self.upstream + self.path, content=body, headers={"Content-Type": "application/json"}, timeout=120
        )
        self.send_response(response.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).chat_calls += 1
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._forward("POST", body)


@pytest.mark.slow
def test_openai_backend_against_real_vllm_server_with_a_retry(tmp_path, tiny_models) -> None:
    with vllm_server(tiny_models / "teacher") as port:
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
        _FlakyProxy.upstream = f"http://127.0.0.1:{port}"
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            openai = {
                "base_url": f"http://127.0.0.1:{proxy.server_address[1]}/v1",
                "model": "teacher",
                "concurrency": 2,
            }
            generate = {**GENERATE, "max_attempts_factor": 1.0, "sampling": {"max_tokens": 16}, "openai": openai}
            path = write_config(tmp_path, tiny_models, **RUN, generate=generate)
            result = invoke_cli(
                "generate",
                str(path),
                "generate.backend=openai",
                "generate.num_examples=3",
                "generate.validation_examples=1",
                "generate.test_examples=1",
            )
            assert "ran out of attempts" in result.stderr, result.stderr
            recs = load_records(tmp_path / "runs/g/generate")
            assert len(recs) == 5 and all(r["output_tokens"] > 0 for r in recs)
            assert _FlakyProxy.chat_calls == 6  # 5 requests + 1 retried after the 503
            # the same server under each input's grammar (vLLM's structured_outputs): no answer is wrong in form
            # with the top-5 log-probabilities (logprobs / top_logprobs, token ids through return_tokens_as_token_ids)
            result = invoke_cli(
                "generate",
                str(path),
                "run_name=g2",
                "generate.backend=openai",
                "generate.grammar=true",
                "generate.num_examples=3",
                "generate.validation_examples=1",
                "generate.test_examples=1",
                "generate.sampling.max_tokens=700",
                "generate.logprobs=5",
            )
            recs = load_records(tmp_path / "runs/g2/generate")
            assert len(recs) >= 5 and {x for r in recs for x in r["reasons"]} <= GRAMMAR_LEAVES, result.stderr
            check_captured_distribution(tmp_path / "runs/g2/generate", tiny_models / "teacher", 5)
        finally:
            proxy.shutdown()


def test_rouge_l_known_values() -> None:
    from distill.selfinstruct import rouge_l

    assert rouge_l("plan my next three workouts", "plan my next three workouts") == 1.0
    assert rouge_l("a b c d", "e f g h") == 0.0
    # LCS "a c d" of lengths 4 and 5: P = 3/4, R = 3/5
    assert abs(rouge_l("a b c d", "a x c y d") - 2 * 0.75 * 0.6 / 1.35) < 1e-9


def test_self_instruct_pool_with_a_real_teacher(tmp_path, tiny_models) -> None:
    from distill.selfinstruct import load_seeds, request_pool, rouge_l
    from distill.teachers import make_teacher

    generate = {
        **GENERATE,
        "sampling": {"max_tokens": 24, "temperature": 1.0},
        "self_instruct": {"enabled": True, "num_requests": 3, "in_context": 4},
    }
    path = write_config(tmp_path, tiny_models, **RUN, generate=generate)
    cfg = load_config(path, ["generate.backend=transformers"])
    task = crew_task(cfg.seed)
    teacher = make_teacher(cfg, task)
    pool = request_pool(cfg, task, tmp_path / "gen", teacher)
    seeds = load_seeds(cfg, task.self_instruct())
    assert pool[: len(seeds)] == seeds and len(pool) <= len(seeds) + 3
    new = pool[len(seeds) :]
    for i, request in enumerate(new):
        assert all(rouge_l(request, other) < 0.7 for other in pool[: len(seeds) + i])
    assert request_pool(cfg, task, tmp_path / "gen", teacher) == pool  # bootstrapped once, then reused
    teacher.close()

    res = run_cli("generate", str(path))
    assert res.returncode == 1 and "needs a language-model teacher" in res.stderr


def test_prompts_carry_a_request() -> None:
    prompt = "Intro line.\n\nProfile:\n- role: pilot"
    out = crew_task().self_instruct().with_request(prompt, "I fly long-haul and my back hurts.")
    assert out.startswith('Intro line.\nThe crew member also writes: "I fly long-haul and my back hurts."')
    assert out.endswith("Profile:\n- role: pilot")
