"""The held-out comparison of every evaluated model: the markdown tables and the plot that eval writes and the
report embeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text, read_manifest, stage_dir, stage_status
from distill.config import PipelineConfig
from distill.scoring import INVALID
from distill.stages import eval_stage
from distill.tasks import Labels, Records, Task
from distill.variants import VARIANTS


def evaluated(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Summaries of every model whose evaluation is complete for this config, in the registry's order."""
    return {
        m: read_manifest(stage_dir(cfg, eval_stage(m)))["metrics"]
        for m in VARIANTS
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
    return VARIANTS[model].description


def gold_columns(task: Task, results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The shape's scores against gold answers, where some model has them."""
    if not any("gold" in s for s in results.values()):
        return []
    if isinstance(task.shape, Labels):
        return [("gold.labels.accuracy", "accuracy", "pct"), ("gold.labels.macro_f1", "macro-F1", "num")]
    if isinstance(task.shape, Records):
        return [
            ("gold.records.exact_match", f"{task.unit} = gold", "pct"),
            ("gold.records.field_accuracy", "fields = gold", "pct"),
            ("gold.records.field_f1", "field F1", "num"),
        ]
    return [("gold.exact_match", f"{task.unit} = gold", "pct")]


def columns(task: Task, results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(summary key, title, format) of the comparison table; keys are dotted paths into a summary."""
    return [
        ("validity", "valid", "pct"),
        ("mean_quality", "quality", "num"),
        *((f"agreement.{m}", title, "pct") for m, title in task.agreement_titles.items()),
        *gold_columns(task, results),
        ("perplexity", "perplexity", "num"),
        ("latency_s_mean", f"s / {task.unit}", "num"),
        ("tokens_per_s", "tokens/s", "num"),
        ("size_bytes", "size", "bytes"),
    ]


def _get(summary: dict[str, Any], key: str) -> Any:
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


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
    cols = columns(task, results)
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
    return "\n".join(lines + gold_tables(task, rows)) + "\n"


def gold_tables(task: Task, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Per class or per field, each model row against the gold answers; for labels, the last row's confusion
    matrix (the model evaluated last: the student as served, where it was)."""
    kind = "labels" if isinstance(task.shape, Labels) else "records" if isinstance(task.shape, Records) else None
    scored = [(label, s["gold"][kind]) for label, s in rows if kind and (s.get("gold") or {}).get(kind)]
    if not scored:
        return []
    if kind == "records":
        fields = scored[0][1]["fields"]
        lines = [
            "",
            f"Per field against the gold {task.unit}s: accuracy / F1 of the field's value (gold has a value in n):",
            "",
            "| model | " + " | ".join(f"{name} (n={f['support']})" for name, f in fields.items()) + " |",
            "|---|" + "---|" * len(fields),
        ]
        for label, g in scored:
            cells = [f"{g['fields'][n]['accuracy']:.0%} / {g['fields'][n]['f1']:.2f}" for n in fields]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines
    classes = list(dict.fromkeys(c for _, g in scored for c in g["classes"]))
    support = {c: next(g["classes"][c]["support"] for _, g in scored if c in g["classes"]) for c in classes}
    lines = [
        "",
        "F1 per class (precision / recall in the model's summary; n: gold labels of the class):",
        "",
        "| model | " + " | ".join(f"{c} (n={support[c]})" for c in classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for label, g in scored:
        cells = [f"{g['classes'][c]['f1']:.2f}" if c in g["classes"] else "–" for c in classes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    label, last = scored[-1]
    return lines + ["", f"Confusion matrix of {label} (rows: gold label, columns: answer):", "", *confusion_table(last)]


def confusion_table(scores: dict[str, Any]) -> list[str]:
    matrix = scores["confusion"]
    answers = list(next(iter(matrix.values())))
    lines = ["| gold \\ answer | " + " | ".join(answers) + " |", "|---|" + "---|" * len(answers)]
    lines += [f"| {gold} | " + " | ".join(str(row[a]) for a in answers) + " |" for gold, row in matrix.items()]
    return lines


def render_summary(cfg: PipelineConfig, task: Task, model: str, summary: dict[str, Any]) -> str:
    text = f"# Held-out evaluation: {describe(cfg, model)}\n\n" + comparison_table(cfg, task, {model: summary})
    for label, s in table_rows(cfg, {model: summary}):
        labels = (s.get("gold") or {}).get("labels")
        if labels:
            text += (
                f"\n## {label}\n\n| class | precision | recall | F1 | gold | answered |\n|---|---|---|---|---|---|\n"
            )
            text += "".join(
                f"| {c} | {v['precision']:.2f} | {v['recall']:.2f} | {v['f1']:.2f} | {v['support']} | {v['predicted']} |\n"
                for c, v in labels["classes"].items()
            )
            text += "\n" + "\n".join(confusion_table(labels)) + "\n"
    return text


def plot_comparison(cfg: PipelineConfig, task: Task, results: dict[str, dict[str, Any]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scored = columns(task, results)[: 2 + len(task.agreement_titles) + len(gold_columns(task, results))]
    metrics = [(k, title) for k, title, _ in scored]
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
    if isinstance(task.shape, Labels):
        plot_confusion(cfg, task, results, folder / "confusion.png")


def plot_confusion(cfg: PipelineConfig, task: Task, results: dict[str, dict[str, Any]], target: Path) -> None:
    """One confusion matrix per model row (free and under the grammar), as shares of each gold label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        (label, s["gold"]["labels"]) for label, s in table_rows(cfg, results) if (s.get("gold") or {}).get("labels")
    ]
    if not panels:
        return
    width = min(4, len(panels))
    height = -(-len(panels) // width)
    fig, axes = plt.subplots(height, width, figsize=(3.4 * width, 3.2 * height), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, scores) in zip(axes.flat, panels):
        matrix = scores["confusion"]
        answers = list(next(iter(matrix.values())))
        counts = np.array([[row[a] for a in answers] for row in matrix.values()], dtype=float)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for (i, j), n in np.ndenumerate(counts):
            ax.text(
                j, i, f"{int(n)}", ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black"
            )
        ax.set_xticks(
            range(len(answers)), ["none" if a == INVALID else a for a in answers], rotation=45, ha="right", fontsize=7
        )
        ax.set_yticks(range(len(matrix)), list(matrix), fontsize=7)
        ax.set_title(f"{label}\naccuracy {scores['accuracy']:.0%}, macro-F1 {scores['macro_f1']:.2f}", fontsize=7)
    fig.supxlabel("answer", fontsize=8)
    fig.supylabel("gold label", fontsize=8)
    fig.suptitle(f"{task.name}: held-out test inputs", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
