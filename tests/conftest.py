import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "distill.cli"]

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each of `make test`'s workers gets its share of the CPUs, for torch, llama.cpp and every command it starts:
    # two workers whose processes each take every core spin against each other (measured here: slower than one).
    share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    # A worker inherits COLUMNS=80, which rich reads once, when the CLI's console is made; without it the console
    # reads each in-process command's own environment, as a command of its own would.
    os.environ.pop("COLUMNS", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with the most slow tests first: `make test` hands whole modules to its workers in this order,
    and they finish together when the longest start first."""
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session", autouse=True)
def vllm_cache(tmp_path_factory) -> None:
    """One vLLM cache for the session, as a user's ~/.cache/vllm is for theirs: every engine after the first finds
    the model inspection that vLLM otherwise redoes in a fresh interpreter (~8 s on this CPU)."""
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def invoke_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`distill ARGS` run inside this process by typer's CliRunner: the same app, exit code, stdout and stderr as
    `run_cli`, without a fresh interpreter importing torch again. For commands whose process is not what is under
    test (signals, kills, children, a different environment at start-up take `run_cli`). What a command changes in
    this process is put back afterwards: logging, the SIGTERM handler, cwd, environment and sys.path. An exception
    that escapes the app is written to stderr as its traceback, as the interpreter would print it."""
    import logging
    import signal
    import traceback

    from typer.testing import CliRunner

    from distill.cli import app

    root, httpx = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, httpx_level = root.handlers[:], root.level, httpx.level
    sigterm, environ, path, here = signal.getsignal(signal.SIGTERM), dict(os.environ), sys.path[:], os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        root.handlers[:] = handlers
        root.setLevel(level)
        httpx.setLevel(httpx_level)
        signal.signal(signal.SIGTERM, sigterm)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["distill", *args], result.exit_code, result.stdout, stderr)


@pytest.fixture
def cli():
    return invoke_cli


def kill_9_then_resume(config: Path, records: Path, after_lines: int, timeout: float) -> bytes:
    """`distill generate` killed with SIGKILL once `records` has `after_lines` lines, then run again to the
    end; returns the file as the kill left it, after checking the second run only appended to it."""
    import signal
    import time

    proc = subprocess.Popen(
        [*CLI, "generate", str(config)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while time.time() < deadline and (not records.exists() or records.read_text().count("\n") < after_lines):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records.read_bytes()
    result = invoke_cli("generate", str(config))
    assert result.returncode == 0, result.stderr
    assert records.read_bytes().startswith(before[: before.rfind(b"\n") + 1])
    return before


def crew_task(seed: int = 0):
    """The flagship pack with its defaults (what a config without a `task` section gets)."""
    from distill.tasks import default_task

    return default_task(seed)


def write_config(
    root: Path,
    models: Path | dict | None = None,
    *,
    name: str = "cfg.yaml",
    run_name: str = "t",
    run_dir: Path | str | None = "runs",
    tiny: dict | str | None = None,
    **sections: object,
) -> Path:
    """Write the pipeline config `root/name` of a test and return its path; the test states only what it sets.

    `models`: a folder holding teacher/ and student/ (such as `tiny_models`), a whole `models` section as a dict,
    or None for stand-in names where no model is loaded; `tiny` adds `models.tiny` (the pipeline builds them).
    `run_dir` relative to `root` unless absolute; None leaves it out (the default, ./runs). Every other keyword
    is a top-level key (seed, task, generate, train, ...): a value, a dict, or (a string) YAML text to read.
    Written by `yaml.safe_dump`, so a test that derives one config from another passes changed sections
    rather than editing the text."""
    if models is None:
        section = {"teacher": "a", "student": "b"}
    elif isinstance(models, dict):
        section = dict(models)
    else:
        section = {"teacher": Path(models) / "teacher", "student": Path(models) / "student"}
    if tiny is not None:
        section["tiny"] = _parsed(tiny)
    data: dict = {"run_name": run_name}
    if run_dir is not None:
        data["run_dir"] = root / run_dir
    data["models"] = section
    data.update({key: _parsed(value) for key, value in sections.items()})
    path = root / name
    path.write_text(yaml.safe_dump(_yaml_ready(data), sort_keys=False, allow_unicode=True))
    return path


def _parsed(section: object) -> object:
    """A section given as YAML text, read; any other value as it is."""
    return yaml.safe_load(section) if isinstance(section, str) else section


def _yaml_ready(value: object) -> object:
    """Paths as strings, tuples as lists: what `yaml.safe_dump` writes."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _yaml_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(item) for item in value]
    return value


TINY_MODELS = {"seed": 0, "corpus_size": 60}  # `tiny_models`: the crew pack's tokenizers, seed 0


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny teacher (Qwen 3, byte-level BPE) and student (Gemma 3, SentencePiece with byte fallback) of the
    crew pack, built once per test session and shared by every module: read-only (its files are made so); a
    test that must change a model copies the folder first."""
    from distill.config import TinyModelsConfig
    from distill.models import build_tiny

    out = tmp_path_factory.mktemp("tiny-models")
    build_tiny(out, TinyModelsConfig(**TINY_MODELS), crew_task())
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    return out


# A run's stages before training's output: what `make_trained_run` configures, beside a test's own sections.
TRAINED_RUN = {
    "generate": {"backend": "reference", "num_examples": 8, "validation_examples": 3, "test_examples": 4},
    "train": {"lora": {"r": 4, "alpha": 8}, "precision": "fp32"},
    "merge": {"dtype": "float32", "check_prompts": 2},
    "export": {"check_prompts": 2},
}


def trained_run_config(root: Path, models: Path, name: str = "cfg.yaml", **sections: object) -> Path:
    """The config of `make_trained_run` (run `e` under `root/runs`), with `sections` added or replaced."""
    return write_config(root, models, name=name, run_name="e", **{**TRAINED_RUN, **sections})


def make_trained_run(root: Path, models: Path | None = None, **sections: object) -> Path:
    """A finished generate stage and a non-trivial LoRA adapter standing in for training (real training has
    its own tests; here only the stages after it are under test), on `models` (`tiny_models`); without them,
    tiny models with the tokenizers of the config's own task (`sections` may set one) are built in root/models."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.artifacts import StageRecord, prepare_output, stage_dir
    from distill.config import TinyModelsConfig, load_config
    from distill.models import build_tiny
    from distill.stages.generate import run as generate
    from distill.tasks import load_task

    path = trained_run_config(root, models or root / "models", **sections)
    cfg = load_config(path)
    if models is None:
        build_tiny(root / "models", TinyModelsConfig(seed=2, corpus_size=60), load_task(cfg))
    generate(cfg)
    prepare_output(cfg, "train", overwrite=False)
    base = AutoModelForCausalLM.from_pretrained(cfg.models.student)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=cfg.train.lora.target_modules))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft.save_pretrained(stage_dir(cfg, "train") / "adapter")
    AutoTokenizer.from_pretrained(cfg.models.student).save_pretrained(stage_dir(cfg, "train") / "adapter")
    StageRecord(cfg, "train").finish()
    return path


def make_exported_run(root: Path, models: Path | None = None, **sections: object) -> Path:
    """`make_trained_run`, then the real merge and export stages: a GGUF for serving and evaluation."""
    from distill.config import load_config
    from distill.stages.export import run as export
    from distill.stages.merge import run as merge

    path = make_trained_run(root, models, **sections)
    cfg = load_config(path)
    merge(cfg)
    export(cfg)
    return path


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, tiny_models) -> Path:
    """`make_exported_run` on `tiny_models`, once per session. A module evaluates or serves it through a config
    of its own beside it, `trained_run_config(exported_run.parent, tiny_models, name=..., eval=...)`: the eval and
    serve sections are not part of the generate..export fingerprints, so each such config finds those done."""
    return make_exported_run(tmp_path_factory.mktemp("exported"), tiny_models)


def check_captured_distribution(folder: Path, teacher_dir: Path, k: int, ends_with_eos: bool = False) -> None:
    """generate.logprobs under generate.grammar: each accepted record's teacher tokens spell its answer, each has
    k candidates in falling order that are log-probabilities of one distribution, and the dataset holds exactly
    those arrays. The distribution is the one after the grammar's mask, so wherever the grammar leaves few
    tokens (punctuation, digits, the format's fixed words) the top k hold all the mass."""
    import json

    import numpy as np
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from distill.kd import unpack

    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    records = {}
    for path in folder.glob("shards/*/records.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["id"] not in records
            records[record["id"]] = record
    data = load_from_disk(str(folder / "dataset"))
    rows = [row for split in data.values() for row in split]
    assert rows
    full = []
    for row in rows:
        record = records[row["id"]]
        tokens, ids, logprobs = unpack(record["teacher"])
        assert row["teacher_tokens"] == tokens.tolist() and row["teacher_top_ids"] == ids.tolist()
        assert np.allclose(np.asarray(row["teacher_top_logprobs"], dtype=np.float16), logprobs)
        assert len(tokens) == record["output_tokens"] and ids.shape == (len(tokens), k) and (ids >= 0).all()
        if ends_with_eos:  # the grammar ends every answer with one of the teacher's end tokens, which is kept
            assert teacher.convert_ids_to_tokens(int(tokens[-1])) in ("<|im_end|>", "<|endoftext|>")
        assert teacher.decode(tokens, skip_special_tokens=True).strip() == row["response"]
        # falling order; under a grammar the tokens it forbids come last, at -inf
        values = np.maximum(logprobs.astype(np.float32), -1e30)
        assert (np.diff(values, axis=1) <= 0).all() and (values <= 0).all() and np.isfinite(values[:, 0]).all()
        assert (np.exp(values).sum(axis=1) <= 1.01).all()
        full += (np.exp(values).sum(axis=1) > 0.999).tolist()
    # a random teacher's unmasked top k never holds all the mass; masked, it often does
    assert np.mean(full) > 0.3, np.mean(full)


VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@contextlib.contextmanager
def vllm_server(model: Path, name: str = "teacher", start_s: float = 180) -> Iterator[int]:
    """vLLM's OpenAI-compatible server of `model` (fp32, eager) on a free port, once it answers; its whole process
    group is ended afterwards. Yields the port; a server not answering within `start_s` fails the test."""
    import httpx

    from distill.serving.fleet import free_port

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", "4096", "--enforce-eager"]
    server = subprocess.Popen(
        command,
        env={**os.environ, **VLLM_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + start_s
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("vLLM server did not start")
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
