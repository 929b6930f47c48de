"""The held-out comparison of every evaluated model: the markdown tables and the plot that eval writes and the
report embeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text, read_manifest, stage_dir, stage_status
from distill.config import PipelineConfig
from distill.stages import MODEL_DESCRIPTIONS, MODELS, eval_stage
from distill.tasks import Task


def evaluated(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Summaries of every model whose evaluation is complete for this config, in the registry's order."""
    return {
        m: read_manifest(stage_dir(cfg, eval_stage(m)))["metrics"]
        for m in MODELS
        if stage_status(cfg, eval_stage(m)) == "complete"
    }


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "bytes":
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def describe(cfg: PipelineConfig, model: str) -> str:
    """How a model is named in tables and plots; the teacher row is whoever wrote the data."""
    if model == "teacher" and cfg.generate.backend == "reference":
        return "reference answers (held-out)"
    return MODEL_DESCRIPTIONS[model]


def columns(task: Task) -> list[tuple[str, str, str]]:
    """(summary key, title, format) of the comparison table; agreement keys are `agreement.<metric>`."""
    return [
        ("validity", "valid", "pct"),
        ("mean_quality", "quality", "num"),
        *((f"agreement.{m}", title, "pct") for m, title in task.agreement_titles.items()),
        ("perplexity", "perplexity", "num"),
        ("latency_s_mean", f"s / {task.unit}", "num"),
        ("tokens_per_s", "tokens/s", "num"),
        ("size_bytes", "size", "bytes"),
    ]


def _get(summary: dict[str, Any], key: str) -> Any:
    section, _, metric = key.partition(".")
    return summary.get(section, {}).get(metric) if metric else summary.get(key)


def table_rows(cfg: PipelineConfig, results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(row label, summary) per model, its constrained decoding right below its free one."""
    rows = []
    for m, s in results.items():
        rows.append((describe(cfg, m), s))
        if "constrained" in s:
            # perplexity and size belong to the model, not to how it decodes
            same = {k: s.get(k) for k in ("perplexity", "size_bytes")}
            rows.append((f"{describe(cfg, m)} + grammar", {**s["constrained"], **same}))
    return rows


def comparison_table(cfg: PipelineConfig, task: Task, results: dict[str, dict[str, Any]]) -> str:
    cols = columns(task)
    lines = [
        "| model | " + " | ".join(title for _, title, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    rows = table_rows(cfg, results)
    for label, s in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(_get(s, k), kind) for k, _, kind in cols) + " |")
    seen = [c for c in task.weights if any(s["violation_rates"].get(c) for _, s in rows)]
    if seen:
        lines += [
            "",
            f"Share of {task.unit}s with each violation:",
            "",
            "| model | " + " | ".join(seen) + " |",
            "|---|" + "---|" * len(seen),
        ]
        for label, s in rows:
            lines.append(f"| {label} | " + " | ".join(f"{s['violation_rates'].get(c, 0):.0%}" for c in seen) + " |")
    return "\n".join(lines) + "\n"


def render_summary(cfg: PipelineConfig, task: Task, model: str, summary: dict[str, Any]) -> str:
    return f"# Held-out evaluation: {describe(cfg, model)}\n\n" + comparison_table(cfg, task, {model: summary})


def plot_comparison(cfg: PipelineConfig, task: Task, results: dict[str, dict[str, Any]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [(k, title) for k, title, _ in columns(task)[: 2 + len(task.agreement_titles)]]
    rows = table_rows(cfg, results)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (label, s) in enumerate(rows):
        ax.bar(x + i * width, [_get(s, k) for k, _ in metrics], width, label=label)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, [title for _, title in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{task.name}: held-out test inputs")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def write_comparison(cfg: PipelineConfig, task: Task) -> None:
    results = evaluated(cfg)
    if not results:
        return
    folder = stage_dir(cfg, "eval")
    atomic_write_text(folder / "comparison.md", "# Held-out evaluation\n\n" + comparison_table(cfg, task, results))
    plot_comparison(cfg, task, results, folder / "comparison.png")
