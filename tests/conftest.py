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
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def cli():
    return run_cli


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
    build_tiny(root / "models", TinyModelsConfig(seed=2, corpus_size=60), load_task(cfg))  # tokenizers of the config's task
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
    StageRecord(cfg, "train", inputs=("generate",)).finish()
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
