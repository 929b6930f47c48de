"""Held-out scores through the task's interface: one answer's checks and agreement, the rates over many, and
where the task's answers have a shape and gold answers, the scores of that shape: classification (accuracy,
per-class precision, recall and F1, macro-F1, confusion matrix) or extraction (exact record, per-field accuracy
and F1)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from distill.tasks import Labels, Records, Task, quality_score

INVALID = "(not a label)"  # the confusion matrix's column for an answer that is none of the labels


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


def summarize(records: list[dict[str, Any]], task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates over the evaluated answers (one per row, in order); perplexity over all teacher-response tokens
    together; the shape's scores over the rows that have a gold answer."""
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
    pairs = [
        (r["text"], g) for r, row in zip(records, rows) if (g := task.gold(json.loads(row["payload"]))) is not None
    ]
    if pairs and isinstance(task.shape, Labels):
        out["gold"] = {"labels": label_scores(*zip(*pairs), task.shape.classes)}
    elif pairs and isinstance(task.shape, Records):
        out["gold"] = {"records": record_scores(*zip(*pairs), task.shape.fields)}
    elif pairs:  # answers of no known shape (a regex, a schema for a list): the whole answer, as the checks read it
        out["gold"] = {"exact_match": _ratio(sum(a.strip() == g.strip() for a, g in pairs), len(pairs))}
    return out


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0  # nothing to measure counts as nothing right, as scikit-learn has it


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def label_scores(answers: Sequence[str], golds: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Classification against gold labels. An answer is its text stripped, as the checks read it; one that is
    none of the labels is wrong, and its own column in the confusion matrix. Macro-F1 is the mean F1 over the
    labels that occur among the gold labels or the answers."""
    predicted = [a.strip() for a in answers]
    gold = [g.strip() for g in golds]
    labels = [c for c in classes if c in gold or c in predicted] + sorted(set(gold) - set(classes))
    per_class = {}
    for label in labels:
        hits = sum(p == g == label for p, g in zip(predicted, gold))
        said, true = predicted.count(label), gold.count(label)
        precision, recall = _ratio(hits, said), _ratio(hits, true)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": true,
            "predicted": said,
        }
    columns = labels + ([INVALID] if any(p not in labels for p in predicted) else [])
    confusion = {g: {c: 0 for c in columns} for g in labels if g in gold}
    for p, g in zip(predicted, gold):
        confusion[g][p if p in labels else INVALID] += 1
    return {
        "answers": len(gold),
        "accuracy": _ratio(sum(p == g for p, g in zip(predicted, gold)), len(gold)),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class),
        "classes": per_class,
        "confusion": confusion,
    }


def _canonical(value: Any) -> str:
    # JSON's own equality: Python's would call true equal to 1
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def record_scores(answers: Sequence[str], golds: Sequence[str], fields: Sequence[str]) -> dict[str, Any]:
    """Extraction against gold records, field by field. A field that is absent or null has no value: one the
    answer fills where the gold has none is a false positive, one it leaves empty (or gets wrong) where the gold
    has a value a false negative; accuracy counts a field right when both agree, no value included. An answer
    that is not a JSON object gets every field wrong. `field_accuracy` is the share of each gold record's fields
    the answer reproduces, averaged over records; `field_f1` pools every field's counts."""
    ours = []
    for answer in answers:
        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            value = None
        ours.append(value if isinstance(value, dict) else None)
    gold = [json.loads(g) for g in golds]
    names = list(fields) or list(dict.fromkeys(k for g in gold if isinstance(g, dict) for k in g))
    per_field, pooled = {}, [0, 0, 0]
    for name in names:
        right = tp = fp = fn = support = 0
        for answer, expected in zip(ours, gold):
            want = expected.get(name) if isinstance(expected, dict) else None
            got = answer.get(name) if answer is not None else None
            same = answer is not None and _canonical(got) == _canonical(want)
            right += same
            support += want is not None
            tp += same and want is not None
            fp += got is not None and not same
            fn += want is not None and not same
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_field[name] = {
            "accuracy": _ratio(right, len(gold)),
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": support,
        }
        pooled = [pooled[0] + tp, pooled[1] + fp, pooled[2] + fn]
    shares = []
    for answer, expected in zip(ours, gold):
        if isinstance(expected, dict) and expected:
            found = sum(answer is not None and _canonical(answer.get(k)) == _canonical(v) for k, v in expected.items())
            shares.append(found / len(expected))
        else:
            shares.append(float(_canonical(answer) == _canonical(expected)))
    precision, recall = _ratio(pooled[0], pooled[0] + pooled[1]), _ratio(pooled[0], pooled[0] + pooled[2])
    return {
        "answers": len(gold),
        "exact_match": _ratio(
            sum(a is not None and _canonical(a) == _canonical(g) for a, g in zip(ours, gold)), len(gold)
        ),
        "field_accuracy": _ratio(sum(shares), len(shares)),
        "field_f1": _f1(precision, recall),
        "fields": per_field,
    }


def shares(counts: dict[str, int]) -> str:
    """Counts per label as 'label 61% (49)', largest first, for tables and the report."""
    total = sum(counts.values())
    return " · ".join(f"{label} {n / total:.0%} ({n:,})" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
