"""Typed stage metrics: what a stage may write, and everything REPORT.md reads of them, without running a stage."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from distill.artifacts import StageRecord
from distill.config import load_config
from distill.metrics import EvalMetrics

LENGTHS = {"mean": 812.5, "p50": 800, "p95": 990, "max": 1200}
VERIFIED = {"prompts": 2, "top1_agreement": 1.0, "max_abs_logit_diff": 0.031}
SCORES = {
    "answers": 16,
    "validity": 0.5,
    "mean_quality": 0.75,
    "violation_rates": {"exercise_count": 0.25},
    "agreement": {"split_match": 0.875, "exercise_overlap": 0.2},
}
METRICS = {
    "generate": {
        "backend": "vllm",
        "counts": {"train": 64, "validation": 8, "test": 16, "rejected": 3, "attempts": 91},
        "acceptance_rate": 0.967,
        "reject_reasons": {"parse": 2, "near_duplicate": 1},
        "output_tokens_per_s": 1234.5,
        "prompt_tokens": LENGTHS,
        "response_tokens": {**LENGTHS, "mean": 301.0},
        "logprobs": {"k": 20, "teacher_tokens": 83961, "bytes": 11086308, "bytes_per_token": 132.0},
    },
    "train": {
        "objective": "kd",
        "kd": {
            "divergence": "jsd",
            "beta": 0.3,
            "temperature": 1.0,
            "alpha": 0.5,
            "align": True,
            "unmapped": "uld",
            "coverage": {"tokens": 1000, "none": 8, "direct": 0, "mapped": 800, "uld": 192, "share": 0.992},
        },
        "backend": "transformers",
        "precision": "fp32",
        "optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "examples": 64,
        "truncated": 2,
        "steps": 32,
        "trainable_params": 1000,
        "all_params": 4000,
        "final_loss": 0.0291,
        "tokens_per_s": 2700.0,
        "wall_s": 210.0,
    },
    "merge": {
        "method": "lora",
        "dtype": "bfloat16",
        "fold_max_abs_logit_diff": 1.2e-5,
        "saved_dtype_max_abs_logit_diff": 0.01,
        "params": 4000,
        "safetensors_bytes": 3 * 2**20,
    },
    "prune": {"overall_sparsity": 0.4, "params": 4000, "safetensors_bytes": 3 * 2**20},
    "export": {
        "format": "q8_0",
        "file_bytes": 2 * 2**20,
        "verification": {**VERIFIED, "tokenization_match": 1.0},
        "int8_bytes": 2**20,
        "int8_verification": {**VERIFIED, "quantized_linears": 14},
        "teacher_params": 4 * 2**20,
        "teacher_bf16_bytes": 8 * 2**20,
    },
    "serve": {
        "instances_planned": 12,
        "slots_planned": 180,
        "best_fleet": "slots",
        "meets_slo": True,
        "slo_ms": 1000.0,
        "capacity": 64,
        "goodput_per_s": 11.5,
        "e2e_p50_ms": 640.0,
        "e2e_p95_ms": 930.0,
        "valid_share": 1.0,
        "grammar": True,
        "goodput_per_s_free": 3.5,
        "budget_held": {"processes": True, "slots": True},
    },
}


@pytest.fixture
def cfg(tmp_path: Path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"run_name: r\nrun_dir: {tmp_path / 'runs'}\nmodels: {{teacher: t, student: s}}\n"
        "generate: {backend: vllm}\nprune: {enabled: true}\neval: {models: [merged]}\n"
    )
    return load_config(path)


def test_the_report_reads_every_metric_the_stages_write(cfg) -> None:
    from distill.report import render_report

    for stage, metrics in METRICS.items():
        record = StageRecord(cfg, stage)
        record.metrics = metrics
        record.finish()
    merged = StageRecord(cfg, "eval/merged")
    merged.metrics = {**SCORES, "perplexity": 1.7, "constrained": SCORES, "grammar": "free and constrained"}
    merged.finish()
    report = render_report(cfg)
    for expected in (
        "64 training, 8 validation and 16 test examples",
        "acceptance 97%; rejected for: parse 2, near_duplicate 1",
        "prompt mean 812 (p95 990), response mean 301",
        "teacher output 1,234 tokens/s",
        "top-20 log-probabilities were kept at each of its 83,961 tokens",
        "AdamW8bit",
        "1,000 trainable of 4,000 parameters (25.0%), 32 steps over 64 examples in 3.5 min",
        "final loss 0.029; 2 examples truncated",
        "(jsd, beta 0.3, temperature 1.0, cross-entropy weight 0.5); 99% of 1,000",
        "mapped by text 800, ULD 192; none 8",
        "| merged student (bfloat16) | 4,000 | 3.00 MiB | 2.7x smaller |",
        "| pruned student (40% of Linear weights zero)",
        "| GGUF q8_0 | – | 2.00 MiB | 4.0x smaller |",
        "| torch dynamic int8 | – | 1.00 MiB | 8.0x smaller |",
        "saving as bfloat16 adds max |Δlogit| 0.01",
        "on 2 validation prompts: tokenization identical for 100%",
        "12 processes or one server with 180 slots",
        (
            "best: one server with its slots, 64 concurrent users within 1000 ms, goodput 11.5 valid programs/s "
            "under the grammar (3.5 free)"
        ),
        "p50 640 ms / p95 930 ms",
        "| merged student + grammar |",
    ):
        assert expected in report, expected


def test_a_metric_no_model_declares_is_refused_when_the_manifest_is_written(cfg) -> None:
    StageRecord(cfg, "generate").finish()
    record = StageRecord(cfg, "train")
    record.metrics = {"final_los": 0.1}
    with pytest.raises(ValidationError, match="final_los"):
        record.finish()
    assert not (record.folder / "manifest.json").exists()
    record.metrics = {"steps": "many"}
    with pytest.raises(ValidationError, match="steps"):
        record.finish()


def test_every_comparison_column_is_an_eval_metric() -> None:
    from types import SimpleNamespace

    from distill.comparison import _get, columns
    from distill.scoring import label_scores, record_scores
    from distill.tasks import Labels, Records, default_task

    for key, _, _ in columns(default_task(0), {}):
        field = key.partition(".")[0]
        assert field in EvalMetrics.model_fields, key
    scores = {"answers": 1, "validity": 1.0, "mean_quality": 1.0, "violation_rates": {}, "agreement": {}}
    for shape, gold in (
        (Labels(("a", "b")), {"labels": label_scores(["a"], ["b"], ("a", "b"))}),
        (Records(("k",)), {"records": record_scores(['{"k": 1}'], ['{"k": 2}'], ("k",))}),
        (None, {"exact_match": 0.0}),
    ):
        summary = EvalMetrics.model_validate({**scores, "gold": gold}).model_dump(mode="json", exclude_none=True)
        task = SimpleNamespace(agreement_titles={}, unit="answer", shape=shape)
        shaped = [key for key, _, _ in columns(task, {"m": summary}) if key.startswith("gold.")]
        assert shaped and all(_get(summary, key) is not None for key in shaped), shaped
