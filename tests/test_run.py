"""`distill run`: the whole pipeline from tiny local models, skipping, resuming after Ctrl-C, REPORT.md."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, REPO, invoke_cli, run_cli, write_config
from huggingface_hub import ModelCard

# `distill run` builds its models from `models.tiny` (the pipeline's own path to them, under test here)
TINY = {"seed": 3, "corpus_size": 40, "vocab_size": 1024}
SECTIONS = {
    "generate": {"backend": "reference", "num_examples": 8, "validation_examples": 2, "test_examples": 3},
    "train": {
        "lora": {"r": 4, "alpha": 8},
        "precision": "fp32",
        "max_steps": 3,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 1.0e-3,
        "gradient_checkpointing": False,
        "save_steps": 2,
        "logging_steps": 1,
    },
    "merge": {"dtype": "float32", "check_prompts": 2},
    "export": {"check_prompts": 2},
    "serve": {
        "max_instances": 1,
        "max_slots": 2,
        "concurrency": [1],
        "requests": 2,
        "max_tokens": 16,
        "context": 4096,
        "ready_timeout_s": 60,
    },
    "eval": {"num_prompts": 3, "max_new_tokens": 16, "models": ["teacher", "base", "merged", "gguf"]},
}


@pytest.mark.slow
def test_run_skips_resumes_after_ctrl_c_and_reports(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "models", name="tiny.yaml", run_name="r", tiny=TINY, **SECTIONS)
    run = tmp_path / "runs" / "r"

    first = invoke_cli("run", str(config), "--until", "merge")
    assert first.returncode == 0, first.stderr
    assert (run / "merge" / "manifest.json").is_file() and not (run / "export").exists()
    partial = (run / "REPORT.md").read_text()
    assert "Not run yet: `distill export" in partial and "## Training" in partial
    assert not (run / "merge" / "model" / "README.md").exists()  # no card before export

    # Ctrl-C inside the evaluation of the base student, after its first program is written.
    records = run / "eval" / "base" / "generations.jsonl"
    proc = subprocess.Popen(
        [*CLI, "run", str(config)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 400
    while not (records.is_file() and records.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "re-run the same command to resume" in stderr and "Traceback" not in stderr
    for stage in ("generate", "train", "merge"):
        assert re.search(rf"{stage}: complete, skipping", stderr), stderr
    assert (run / "serve" / "manifest.json").is_file() and not (run / "eval" / "base" / "manifest.json").exists()
    kept = records.read_text().splitlines()[0]
    # export wrote the cards, serve and the teacher's evaluation rewrote them: no GGUF score to claim yet
    card = ModelCard.load(run / "export" / "README.md")
    assert card.data.eval_results is None and "| reference answers (held-out) |" in card.text
    assert "Measured by `distill serve`" in card.text and "| GGUF in llama.cpp |" not in card.text

    final = invoke_cli("run", str(config))
    assert final.returncode == 0, final.stderr
    assert "report at" in final.stdout and "eval teacher: complete, skipping" in final.stderr
    assert records.read_text().splitlines()[0] == kept  # the program generated before Ctrl-C is not redone
    report = (run / "REPORT.md").read_text()
    assert "Not run yet" not in report
    for section in ("## Data", "## Training", "## Sizes and export", "## Serving", "## Held-out quality"):
        assert section in report
    assert "8 training, 2 validation and 3 test examples" in report
    assert "3 steps over 8 examples" in report and "![training loss](train/loss.png)" in report
    export = json.loads((run / "export" / "manifest.json").read_text())["metrics"]
    # the crew pack's reference answers wrote the data: no teacher model to size or compare with
    assert "teacher_bf16_bytes" not in export and "| teacher (bf16) |" not in report
    assert f"| GGUF q8_0 | – | {export['file_bytes'] / 2**20:,.2f} MiB | – |" in report
    assert (
        "Written by reference answers of the `crew` task (the crew pack's rule-based planner); no language-model teacher ran"
        in report
    )
    assert "tokenization identical for 100%" in report
    assert re.search(r"Plan: \d+ processes or one server with \d+ slots fit the GPU budget; (best|no config)", report)
    assert "| 1 process x 1 slot | 1 |" in report and "| 1 server x 2 slots | 1 |" in report  # both fleets, measured
    for row in ("reference answers (held-out)", "student before training", "merged student", "GGUF in llama.cpp"):
        assert f"| {row} |" in report
    assert (run / "train" / "loss.png").is_file() and (run / "eval" / "comparison.png").is_file()
    manifests = {p.parent.name: json.loads(p.read_text()) for p in (run / "eval").glob("*/manifest.json")}
    assert set(manifests) == {"teacher", "base", "merged", "gguf"}
    for folder, row, library in ((run / "export", "gguf", "gguf"), (run / "merge" / "model", "merged", "transformers")):
        card = ModelCard.load(folder / "README.md")  # huggingface_hub's parser, which checks the model-index
        assert card.data.library_name == library and "distillation" in card.data.tags
        assert card.data.base_model is None  # a student built here has no Hub id to name
        free = manifests[row]["metrics"]
        scores = {
            (r.metric_type, r.metric_name.endswith("free decoding")): r.metric_value for r in card.data.eval_results
        }
        assert scores[("validity", True)] == round(free["validity"], 4)
        assert scores[("validity", False)] == round(free["constrained"]["validity"], 4)
        for section in ("## Training", "## The task and its checks", "## Held-out results", "## How to run it"):
            assert section in card.text
        assert "8 training, 2 validation and 3 held-out test examples" in card.text
    gguf_card = (run / "export" / "README.md").read_text()
    assert (
        "PORT=8080 sh ../serve/llama-server.sh" in gguf_card
        and "ollama create student -f ../serve/Modelfile" in gguf_card
    )
    assert 'extra_body={"grammar": open("grammar.gbnf").read()}' in gguf_card


def test_run_stage_selection_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "models", name="tiny.yaml", run_name="r", tiny=TINY, **SECTIONS)
    result = run_cli("run", str(config), "--from", "evaluate")
    assert result.returncode == 1 and "--from evaluate: unknown stage" in result.stderr
    result = run_cli("run", str(config), "--from", "eval", "--until", "train")
    assert result.returncode == 1 and "swap them" in result.stderr
    result = run_cli("run", str(config), "eval.models=[teacher, pruned]")
    assert result.returncode == 1 and "prune.enabled" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_teacher_size_only_where_a_teacher_model_wrote_the_data(tmp_path) -> None:
    from distill.config import load_config
    from distill.metrics import ExportMetrics
    from distill.report import _sizes
    from distill.stages.export import known_teacher_params

    models = {"teacher": "Qwen/Qwen3-4B", "student": "s", "teacher_arch": REPO / "configs/arch/qwen3-4b.json"}
    path = write_config(tmp_path, models, run_name="s", run_dir=tmp_path)
    assert known_teacher_params(load_config(path, ["generate.backend=reference"])) is None
    assert (
        known_teacher_params(load_config(path, ["generate.backend=openai", "models.teacher_arch=null"])) is None
    )  # an API teacher
    params = known_teacher_params(load_config(path, ["generate.backend=openai"]))
    assert params is not None and 4_000_000_000 < params < 4_100_000_000
    cfg = load_config(path)
    export = {
        "teacher_params": 1000,
        "teacher_bf16_bytes": 2000,
        "format": "q8_0",
        "file_bytes": 4000,
        "verification": {"prompts": 1, "tokenization_match": 1.0, "top1_agreement": 1.0, "max_abs_logit_diff": 0.0},
    }
    lines = "\n".join(_sizes(cfg, None, None, ExportMetrics.model_validate(export)))
    assert "| teacher (bf16) | 1,000 |" in lines and "| GGUF q8_0 | – | 0.00 MiB | 2.0x larger |" in lines
