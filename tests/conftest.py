import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "distill.cli"]

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


@pytest.fixture
def cli():
    return run_cli


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
    result = run_cli("generate", str(config))
    assert result.returncode == 0, result.stderr
    assert records.read_bytes().startswith(before[: before.rfind(b"\n") + 1])
    return before


def crew_task(seed: int = 0):
    """The flagship pack with its defaults (what a config without a `task` section gets)."""
    from distill.tasks import default_task

    return default_task(seed)


def make_trained_run(root: Path, extra: str = "") -> Path:
    """Tiny models, a finished generate stage, and a non-trivial LoRA adapter standing in for training
    (real training has its own tests; here only the stages after it are under test)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.artifacts import StageRecord, prepare_output, stage_dir
    from distill.config import TinyModelsConfig, load_config
    from distill.models import build_tiny
    from distill.stages.generate import run as generate
    from distill.tasks import load_task

    path = root / "cfg.yaml"
    path.write_text(
        f"run_name: e\nrun_dir: {root / 'runs'}\n"
        f"models: {{teacher: {root / 'models/teacher'}, student: {root / 'models/student'}}}\n"
        "generate: {backend: reference, num_examples: 8, validation_examples: 3, test_examples: 4}\n"
        "train: {lora: {r: 4, alpha: 8}, precision: fp32}\nmerge: {dtype: float32, check_prompts: 2}\n"
        "export: {check_prompts: 2}\n" + extra
    )
    cfg = load_config(path)
    build_tiny(
        root / "models", TinyModelsConfig(seed=2, corpus_size=60), load_task(cfg)
    )  # tokenizers of the config's task
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


def make_exported_run(root: Path, extra: str = "") -> Path:
    """`make_trained_run`, then the real merge and export stages: a GGUF for serving and evaluation."""
    from distill.config import load_config
    from distill.stages.export import run as export
    from distill.stages.merge import run as merge

    path = make_trained_run(root, extra)
    cfg = load_config(path)
    merge(cfg)
    export(cfg)
    return path


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
