"""Serving with real llama-server processes on the tiny GGUF: both fleets, deploy, artefacts, stopping."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, invoke_cli, run_cli, trained_run_config, write_config

from distill.config import load_config
from distill.serving.load import Outcome, capacity, summarize

SERVE = {
    "max_instances": 2,
    "max_slots": 3,
    "concurrency": [1, 3],
    "requests": 4,
    "max_tokens": 24,
    "context": 2048,
    "ready_timeout_s": 60,
}


def test_goodput_and_capacity_on_known_latencies() -> None:
    outcomes = [
        Outcome(ttft_s=0.1, e2e_s=0.4, tokens=11, valid=True),  # valid, within 500 ms
        Outcome(ttft_s=0.2, e2e_s=0.5, tokens=4, valid=False),  # within, invalid
        Outcome(ttft_s=0.3, e2e_s=0.9, tokens=7, valid=True),  # valid, too slow
        Outcome(ttft_s=0.1, e2e_s=0.3, tokens=1, valid=True),  # valid, within; no time per output token
    ]
    level = summarize(outcomes, wall_s=2.0, concurrency=2, slo_ms=500)
    assert level["goodput_per_s"] == 1.0  # 2 valid answers within the SLO in 2 s
    assert level["within_slo_share"] == 0.75 and level["valid_share"] == 0.75
    assert level["requests_per_s"] == 2.0 and level["output_tokens_per_s"] == 11.5
    assert level["e2e_ms"] == {"p50": 400.0, "p95": 900.0, "p99": 900.0}  # nearest rank of [300, 400, 500, 900]
    assert level["ttft_ms"]["p50"] == 100.0
    # (0.4-0.1)/10, (0.5-0.2)/3, (0.9-0.3)/6 = 30, 100, 100 ms; the one-token answer has none
    assert level["tpot_ms"] == {"p50": 100.0, "p95": 100.0, "p99": 100.0}
    assert level["meets_slo"] is False  # p95 900 ms > 500 ms
    assert (
        capacity(
            [
                {"concurrency": 1, "meets_slo": True},
                {"concurrency": 4, "meets_slo": True},
                {"concurrency": 8, "meets_slo": False},
            ]
        )
        == 4
    )
    assert capacity([{"concurrency": 1, "meets_slo": False}]) == 0


def test_best_fleet_is_most_users_then_goodput_and_closest_when_none_meets() -> None:
    from distill.stages.serve import choose

    def fleet(levels: list[tuple[int, bool, float, float]]) -> dict:
        rows = [
            {"concurrency": c, "meets_slo": m, "goodput_per_s": g, "requests_per_s": g, "e2e_ms": {"p95": p95}}
            for c, m, g, p95 in levels
        ]
        return {
            "servers": 1,
            "slots_each": 1,
            "threads_each": 1,
            "command": [],
            "levels": rows,
            "capacity": capacity(rows),
        }

    wide = fleet([(1, True, 1.0, 100), (4, True, 2.0, 400)])
    narrow = fleet([(1, True, 3.0, 50), (4, False, 5.0, 2000)])
    best = choose({"processes": narrow, "slots": wide})
    assert best["fleet"] == "slots" and best["capacity"] == 4 and best["level"]["goodput_per_s"] == 2.0
    tie = fleet([(1, True, 1.0, 100), (4, True, 3.0, 400)])
    assert choose({"processes": tie, "slots": wide})["fleet"] == "processes"
    slow, slower = fleet([(1, False, 0.0, 900)]), fleet([(1, False, 0.0, 1200)])
    closest = choose({"processes": slower, "slots": slow})
    assert closest["fleet"] == "slots" and closest["meets_slo"] is False and closest["level"]["e2e_ms"]["p95"] == 900


def test_llama_server_is_the_configured_one_else_beside_python_else_on_path(monkeypatch, tmp_path) -> None:
    from distill.errors import DistillError
    from distill.serving.fleet import llama_server_binary

    cfg = load_config(REPO / "configs/paper.yaml")
    (tmp_path / "venv").mkdir()
    (tmp_path / "path").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv/python"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    with pytest.raises(DistillError, match=r"llama-server not found beside this Python or on PATH; run `make setup`"):
        llama_server_binary(cfg)
    for folder in ("path", "venv"):
        binary = tmp_path / folder / "llama-server"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        assert llama_server_binary(cfg) == binary  # beside the python wins over PATH
    own = tmp_path / "own-build"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert llama_server_binary(load_config(REPO / "configs/paper.yaml", [f"serve.llama_server={own}"])) == own


def test_missing_gguf_names_the_command(tmp_path) -> None:
    path = write_config(tmp_path, run_name="s", run_dir=tmp_path)
    res = run_cli("serve", str(path))
    assert res.returncode == 1 and "export/manifest.json not found: run `distill export" in res.stderr
    res = run_cli("deploy", str(path))
    assert res.returncode == 1 and "serve/manifest.json not found: run `distill serve" in res.stderr


@pytest.fixture(scope="module")
def exported(exported_run, tiny_models) -> Path:
    """The session's exported run, served under this module's own config beside it."""
    return trained_run_config(exported_run.parent, tiny_models, name="serve.yaml", serve=SERVE)


@pytest.fixture(scope="module")
def served(exported) -> Path:
    result = invoke_cli("serve", str(exported))
    assert result.returncode == 0, result.stderr
    return exported


def servers_of(gguf_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "llama-server" in cmd and str(gguf_dir) in cmd:
            found.append(proc)
    return found


def bound(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_both_fleets_take_the_same_load_and_the_report_says_which_serves_more(served) -> None:
    cfg = load_config(served)
    folder = cfg.run_path / "serve"
    report = json.loads((folder / "report.json").read_text())
    processes, slots = report["fleets"]["processes"], report["fleets"]["slots"]
    assert (processes["servers"], processes["slots_each"]) == (2, 1)
    assert (slots["servers"], slots["slots_each"], slots["threads_each"]) == (1, 3, 2)
    assert report["plan"]["instances"] >= 2 and report["plan"]["slots"] >= 3
    for fleet in (processes, slots):
        assert [lv["concurrency"] for lv in fleet["levels"]] == [1, 3]
        assert [lv["requests"] for lv in fleet["levels"]] == [4, 4]
        for lv in fleet["levels"]:
            assert lv["completion_tokens"] > 0 and 0 <= lv["valid_share"] <= 1
            for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
                assert 0 < lv[key]["p50"] <= lv[key]["p95"] <= lv[key]["p99"]
            assert lv["ttft_ms"]["p50"] <= lv["e2e_ms"]["p50"]
        # the servers' own processes, measured without any Python interpreter
        assert all(m["pss_bytes"] > 2**20 and m["uss_bytes"] > 2**20 for m in fleet["memory"])
        assert fleet["budget_held"] is True
    # the one server really decoded several sequences per step; each process of the paper's fleet only one
    assert slots["metrics_peak"]["llamacpp:n_busy_slots_per_decode"] > 1
    assert processes["metrics_peak"]["llamacpp:n_busy_slots_per_decode"] == 1
    assert report["best"]["fleet"] in ("processes", "slots") and report["best"]["meets_slo"] is True
    # every level went out twice: each request with its input's grammar, then the same requests free
    for fleet in (processes, slots):
        assert [lv["concurrency"] for lv in fleet["free_levels"]] == [1, 3]
        assert [lv["requests"] for lv in fleet["free_levels"]] == [4, 4] and fleet["free_capacity"] >= 0
    assert "goodput_per_s_free" in json.loads((folder / "manifest.json").read_text())["metrics"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["best_fleet"] == report["best"]["fleet"]
    assert manifest["files"]["llama_server_command"] == "llama-server.sh"
    markdown = (folder / "report.md").read_text()
    assert "N = floor((V_GPU - weights - graph) / per slot), at most 256" in markdown and "goodput/s" in markdown
    assert "Decoding: each request carries its input's grammar" in markdown and "| 3 | no |" in markdown
    assert "This run was on CPU" in markdown and "fp16: compute capability 7.5" in markdown
    assert servers_of(cfg.run_path / "export") == []


@pytest.mark.slow
def test_the_written_command_and_modelfile_serve_the_same_model(served, tmp_path) -> None:
    import httpx
    from transformers import AutoTokenizer

    from distill.serving.fleet import free_port

    cfg = load_config(served)
    folder = cfg.run_path / "serve"
    port = free_port()
    env = {**os.environ, "PORT": str(port), "LLAMA_SERVER": str(Path(sys.executable).parent / "llama-server")}
    proc = subprocess.Popen(
        ["sh", str(folder / "llama-server.sh")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not _answers(port):  # 503 while the model loads
            time.sleep(0.3)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
        assert [m["id"] for m in models["data"]] == ["student"]
        _grammar_reaches_the_server(cfg, f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)

    modelfile = (folder / "Modelfile").read_text()
    assert re.search(r"^FROM \.\./export/.+\.gguf$", modelfile, re.MULTILINE)
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "PARAMETER temperature 0.0" in modelfile
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    plain = template.split("{{ else }}")[1].split("{{ end }}")[0]
    tok = AutoTokenizer.from_pretrained(cfg.run_path / "merge/model")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.bos_token + plain.replace("{{ .Prompt }}", "hello") == rendered


def _grammar_reaches_the_server(cfg, url: str) -> None:
    """A request with its input's grammar gets the start of a valid program; a broken one a clear error."""
    import httpx
    import xgrammar as xgr

    from distill.constrain import request_fields
    from distill.data import test_rows
    from distill.errors import DistillError
    from distill.serving.load import stream_chat
    from distill.tasks import Grammar, load_task

    task, row = load_task(cfg), test_rows(cfg)[0]
    grammar = task.grammar(json.loads(row["payload"]))
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["<eos>"], stop_token_ids=[0]))
    with httpx.Client() as client:
        for fields, in_grammar in ((request_fields(grammar, "llama_cpp"), True), ({}, False)):
            text, *_ = stream_chat(client, url, row["prompt"], 40, 60, fields)
            assert xgr.GrammarMatcher(compiler.compile_grammar(grammar.gbnf)).accept_string(text) is in_grammar, text
        with pytest.raises(DistillError, match="HTTP 400.*grammar"):
            stream_chat(client, url, row["prompt"], 8, 60, request_fields(Grammar('root ::= "a" nowhere'), "llama_cpp"))


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start_deploy(config: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "deploy", str(config), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    assert lines[0].strip() == f"base URL: http://127.0.0.1:{port}/v1", (
        lines,
        proc.stderr.read() if proc.poll() else "",
    )
    assert lines[1].strip() == "model: student"
    return proc


def test_front_decides_from_the_request_line_and_headers() -> None:
    from distill.serving.deploy import MAX_BODY_BYTES, body_problem, refusal

    chat = "/v1/chat/completions"
    assert refusal("POST", chat + "?stream=1", {"Content-Length": str(MAX_BODY_BYTES)}) is None
    assert refusal("GET", "/v1/models", {}) is None and refusal("GET", "/health", {}) is None
    assert refusal("POST", chat, {"Transfer-Encoding": "chunked"}) == (
        411,
        "send the body with a Content-Length, not chunked",
    )
    assert refusal("POST", chat, {"Content-Length": "-5"}) == (400, "Content-Length '-5' is not a number of bytes")
    assert refusal("POST", chat, {"Content-Length": str(MAX_BODY_BYTES + 1)})[0] == 413
    assert refusal("GET", "/slots", {})[0] == 404 and refusal("PUT", chat, {})[0] == 405
    assert (
        body_problem(b'{"messages": []}') is None
        and body_problem(b"") == "the body is not JSON (Expecting value: line 1 column 1 (char 0))"
    )


def _front_refuses_what_a_server_would_fail_on(port: int, messages: list[dict[str, str]], logs: Path) -> None:
    """4xx and a one-line reason from deploy's front; llama-server answers a body that is not JSON with a 500."""
    import httpx

    from distill.serving.deploy import MAX_BODY_BYTES

    base = f"http://127.0.0.1:{port}"
    cases = [
        (httpx.post(f"{base}/v1/chat/completions", content=b"{not json"), 400, "the body is not JSON"),
        (httpx.post(f"{base}/v1/chat/completions", json=[{"messages": messages}]), 400, "must be a JSON object"),
        (httpx.post(f"{base}/v1/chat/completions", content=b"\xff\xfe"), 400, "the body is not JSON"),
        (httpx.get(f"{base}/v1/nowhere"), 404, "no route /v1/nowhere; this server answers /health"),
        (httpx.get(f"{base}/v1/chat/completions"), 405, "/v1/chat/completions takes POST, not GET"),
        (httpx.delete(f"{base}/v1/models"), 405, "/v1/models takes GET, not DELETE"),
    ]
    for response, status, reason in cases:
        message = response.json()["error"]["message"]
        assert response.status_code == status and reason in message and "\n" not in message, (status, message)
    # too large: refused from its Content-Length, before a byte of the body is read
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
        sock.sendall(head.encode())
        status_line = sock.makefile("rb").readline().decode()
    assert status_line.split()[1] == "413", status_line
    assert httpx.get(f"{base}/health").status_code == 200
    # none of it reached a server: llama-server logs each request it refuses as an exception
    assert not [line for log in logs.glob("*.log") for line in log.read_text().splitlines() if "got exception" in line]


@pytest.mark.slow
@pytest.mark.parametrize("fleet", ["processes", "slots"])
def test_deploy_serves_the_openai_client_restarts_a_dead_server_and_stops_clean(served, fleet, tmp_path) -> None:
    from datasets import load_from_disk
    from llama_cpp import Llama
    from openai import OpenAI

    from distill.models import exported
    from distill.serving.fleet import free_port

    cfg = load_config(served)
    report_path = cfg.run_path / "serve/report.json"
    original = report_path.read_text()
    report = json.loads(original)
    measured = report["fleets"][fleet]
    report["best"].update(
        fleet=fleet,
        servers=measured["servers"],
        slots_each=measured["slots_each"],
        threads_each=measured["threads_each"],
    )
    report_path.write_text(json.dumps(report))  # deploy what this fleet would be, whichever won
    port = free_port()
    proc = _start_deploy(served, port)
    try:
        children = servers_of(cfg.run_path / "export")
        assert len(children) == measured["servers"]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["student"]
        prompt = load_from_disk(str(cfg.run_path / "generate/dataset"))["test"][0]["prompt"]
        messages = [{"role": "user", "content": prompt}]
        answer = client.chat.completions.create(model="student", messages=messages, max_tokens=24, temperature=0)
        text = answer.choices[0].message.content
        assert text and answer.usage.completion_tokens == 24 and answer.choices[0].finish_reason == "length"
        _front_refuses_what_a_server_would_fail_on(port, messages, cfg.run_path / "deploy" / "logs")
        if measured["slots_each"] == 1:
            # one sequence per server: the same arithmetic as llama.cpp in process, so the same greedy answer
            # (with several slots the batch shapes differ, and this fixture's near-tied logits may flip)
            in_process = Llama(model_path=str(exported(cfg, "gguf")), n_ctx=cfg.serve.context, verbose=False)
            expected = in_process.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0)
            assert text == expected["choices"][0]["message"]["content"]  # same model, template and decoding

        children[0].kill()  # a server dies: deploy says so and starts it again
        deadline = time.time() + 60
        while time.time() < deadline:
            respawned = [c for c in servers_of(cfg.run_path / "export") if c.pid != children[0].pid]
            if len(respawned) == measured["servers"] and _answers(port):
                break
            time.sleep(0.3)
        streamed = client.chat.completions.create(
            model="student", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        report_path.write_text(original)
    assert proc.returncode == 0, err
    assert "restarted" in err and "stopped; every server process has ended" in out
    assert servers_of(cfg.run_path / "export") == [] and not bound(port)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_server_outlives_serve_however_it_is_stopped(served, how) -> None:
    cfg = load_config(served)
    log_dir = cfg.run_path / "serve" / "logs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "serve",
            str(served),
            "--overwrite",
            "serve.requests=40",
            "serve.max_tokens=200",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(servers_of(cfg.run_path / "export")) < 2:
        time.sleep(0.1)
    children = servers_of(cfg.run_path / "export")
    assert len(children) >= 2, "the fleet never started"
    ports = [int(p.stem.split("-")[1]) for p in log_dir.glob("processes-*.log")]
    time.sleep(1)  # under load
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    expected = {signal.SIGINT: 130, signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGKILL: -signal.SIGKILL}[how]
    assert proc.returncode == expected, err
    if how != signal.SIGKILL:
        assert ("interrupted" if how == signal.SIGINT else "terminated") in err and "Traceback" not in err
    psutil.wait_procs(children, timeout=15)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert ports and not any(bound(port) for port in ports)


@pytest.mark.slow
def test_error_cases(served, tmp_path) -> None:
    cfg = load_config(served)
    res = invoke_cli("serve", str(served), "serve.v_gpu_mb=1", "--overwrite")
    assert res.returncode == 1 and "too small for one instance" in res.stderr and "MiB missing" in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = invoke_cli("serve", str(served), f"serve.base_port={port}", "--overwrite")
        assert res.returncode == 1 and f"serve.base_port: port {port} on 127.0.0.1 is already in use" in res.stderr
    res = run_cli("serve", str(served), "serve.llama_server=/nowhere/llama-server", "--overwrite")
    assert res.returncode == 1 and "serve.llama_server: /nowhere/llama-server is not an executable file" in res.stderr
    gguf = cfg.run_path / "export" / "e-q8_0.gguf"
    original = gguf.read_bytes()
    try:
        gguf.write_bytes(original[:4096])
        res = invoke_cli("serve", str(served), "--overwrite")
        assert res.returncode == 1 and "exited with code" in res.stderr and "last log lines" in res.stderr
    finally:
        gguf.write_bytes(original)
    assert servers_of(cfg.run_path / "export") == [] and "Traceback" not in res.stderr
    # an SLO nothing meets is a finding, not a failure: the report names the closest configuration
    unmet = ("serve.slo_ms=0.001", "serve.concurrency=[1]", "serve.requests=2")
    res = invoke_cli("serve", str(served), *unmet, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "No configuration meets serve.slo_ms=0.001" in (cfg.run_path / "serve/report.md").read_text()
    assert json.loads((cfg.run_path / "serve/manifest.json").read_text())["metrics"]["meets_slo"] is False
    # deploy, of the serve stage just finished, on a busy port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("deploy", str(served), *unmet, "--port", str(port))
    assert res.returncode == 1 and f"--port: port {port} on 127.0.0.1 is already in use" in res.stderr


@pytest.mark.slow
def test_fp16_headroom_is_measured_and_an_overflowing_student_is_flagged(served, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.serving.fp16 import FP16_MAX, fp16_risk

    merged = load_config(served).run_path / "merge/model"
    prompts = ["Plan three workouts for a pilot.", "Cabin crew, knee pain, 2 sessions a week."]
    assert fp16_risk(8.6, merged, prompts)["f16_activations"] is False
    fine = fp16_risk(7.5, merged, prompts)
    assert fine["at_risk"] is False and fine["headroom"] > 2 and fine["max_abs_activation"] > 0
    model = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4 * FP16_MAX / fine["max_abs_activation"])
    model.save_pretrained(tmp_path / "hot")
    AutoTokenizer.from_pretrained(merged).save_pretrained(tmp_path / "hot")
    hot = fp16_risk(7.5, tmp_path / "hot", prompts)
    assert hot["at_risk"] is True and hot["max_abs_activation"] > FP16_MAX and "AT RISK" in hot["note"]


@pytest.mark.slow
def test_vllm_backend_serves_the_merged_model(exported) -> None:
    overrides = [
        "serve.backend=vllm",
        "serve.gpu_profile=a100-40gb",
        "serve.max_instances=1",
        "serve.max_slots=2",
        "serve.concurrency=[1]",
        "serve.requests=2",
        "serve.max_tokens=8",
        "serve.ready_timeout_s=180",
        "--overwrite",
    ]
    res = invoke_cli("serve", str(exported), *overrides)
    assert res.returncode == 0, res.stderr
    report = json.loads((load_config(exported).run_path / "serve/report.json").read_text())
    assert report["backend"] == "vllm" and report["fleets"]["slots"]["levels"][0]["completion_tokens"] > 0
    # on a Turing card the plan refuses vLLM and says why
    res = invoke_cli("serve", str(exported), "serve.backend=vllm", "--dry-run")
    assert res.returncode == 1 and "compute capability 7.5" in res.stderr and "llama_cpp" in res.stderr
