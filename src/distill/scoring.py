"""Held-out scores through the task's interface: one answer's checks and agreement, and the rates over many."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from distill.tasks import Task, quality_score


def score(text: str, row: dict[str, Any], task: Task) -> dict[str, Any]:
    """The task's checks on one answer, and how it agrees with the teacher's answer to the same prompt."""
    payload = json.loads(row["payload"])
    violations = task.check(text, payload)
    return {
        "valid": not violations,
        "violations": sorted({v.check for v in violations}),
        "quality": quality_score(violations, task.weights),
        "agreement": task.agreement(text, row["response"], payload),
    }


def summarize(records: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """Rates over the evaluated answers; perplexity over all teacher-response tokens together."""
    n = len(records)
    out: dict[str, Any] = {
        "answers": n,
        "validity": sum(r["valid"] for r in records) / n,
        "mean_quality": sum(r["quality"] for r in records) / n,
        "violation_rates": {c: sum(c in r["violations"] for r in records) / n for c in task.weights},
        "agreement": {m: sum(r["agreement"][m] for r in records) / n for m in task.agreement_titles},
    }
    if records and "nll" in records[0]:
        out["perplexity"] = math.exp(sum(r["nll"] for r in records) / sum(r["answer_tokens"] for r in records))
    if records and "latency_s" in records[0]:
        latencies = [r["latency_s"] for r in records]
        out.update(
            latency_s_mean=statistics.fmean(latencies),
            latency_s_p50=statistics.median(latencies),
            tokens_per_s=sum(r["tokens"] for r in records) / sum(latencies),
        )
    return out
