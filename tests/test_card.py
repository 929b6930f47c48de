"""The model card's metadata, read back by huggingface_hub's own parser (no network): a Hub base model only where
the student came from the Hub, and a model-index holding the evaluated row's held-out scores."""

from pathlib import Path

import pytest
from conftest import REPO, write_config

from distill.config import load_config


def summary(validity: float, gold: dict, constrained: dict | None = None) -> dict:
    scores = {"answers": 20, "validity": validity, "mean_quality": validity, "violation_rates": {}, "agreement": {}}
    return {**scores, "gold": gold, "perplexity": 1.5, **({"constrained": constrained} if constrained else {})}


def test_hub_base_model_only_for_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.card import hub_id

    assert hub_id("google/gemma-3-270m-it") == "google/gemma-3-270m-it"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "student").mkdir(parents=True)
    assert hub_id("org/student") is None  # a folder here, though it reads like a Hub id
    assert hub_id("models/tiny/student") is None and hub_id("student") is None and hub_id(None) is None


def test_model_index_of_a_labels_task_reads_back_through_huggingface_hub(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from distill.card import front_matter
    from distill.tasks import load_task

    cfg = load_config(REPO / "configs/crewdesk.yaml", ["models.student=google/gemma-3-270m-it", "card.license=gemma"])
    labels = {"labels": {"accuracy": 0.93, "macro_f1": 0.9, "answers": 20, "classes": {}, "confusion": {}}}
    row = summary(0.95, labels, constrained=summary(1.0, {"labels": {**labels["labels"], "accuracy": 0.94}}))
    data = front_matter(cfg, load_task(cfg), "gguf", row)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# crewdesk\n")  # validates the model-index as the Hub reads it
    meta = card.data.to_dict()
    assert meta["base_model"] == "google/gemma-3-270m-it" and meta["license"] == "gemma"
    assert meta["library_name"] == "gguf" and {"distillation", "gguf", "crewdesk"} <= set(meta["tags"])
    assert "teacher" not in meta  # the gold labels wrote this data (reference backend), not a teacher model
    scores = {(r.metric_type, r.metric_name.rsplit(", ", 1)[-1]): r.metric_value for r in card.data.eval_results}
    assert scores == {
        ("validity", "free decoding"): 0.95,
        ("quality", "free decoding"): 0.95,
        ("accuracy", "free decoding"): 0.93,
        ("f1", "free decoding"): 0.9,
        ("perplexity", "perplexity on the teacher's held-out responses"): 1.5,
        ("validity", "under the task's output grammar"): 1.0,
        ("quality", "under the task's output grammar"): 1.0,
        ("accuracy", "under the task's output grammar"): 0.94,
        ("f1", "under the task's output grammar"): 0.9,
    }
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}


def test_teacher_and_local_student_in_the_metadata(tmp_path: Path) -> None:
    from distill.card import front_matter
    from distill.tasks import load_task

    models = {"teacher": "Qwen/Qwen3-4B", "student": str(tmp_path)}  # a local student folder
    cfg = load_config(write_config(tmp_path, models, generate={"backend": "vllm"}))
    meta = front_matter(cfg, load_task(cfg), "transformers", None).to_dict()
    assert meta["teacher"] == "Qwen/Qwen3-4B" and "base_model" not in meta and "model-index" not in meta
    assert meta["library_name"] == "transformers" and "safetensors" in meta["tags"]
    named = load_config(write_config(tmp_path, models, card={"base_model": "google/gemma-3-270m-it"}))
    assert front_matter(named, load_task(named), "gguf", None).to_dict()["base_model"] == "google/gemma-3-270m-it"
