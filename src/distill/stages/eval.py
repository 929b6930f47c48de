"""Held-out quality of any model of the run, on test inputs whose groups were never trained on.

For each model, through the task's interface: validity and the rate of every violated check, the
quality score, agreement with the teacher's answer to the same prompt (the task's own metrics),
perplexity on the teacher's held-out responses, latency per answer; where the task has an output
grammar, the same again with decoding constrained by it (`eval.grammar`), so the cost and the gain of
the constraint sit side by side. Each model gets `<run>/eval/<model>/`; `<run>/eval/comparison.{md,png}`
compares every model evaluated so far. Generations are appended one fsync'd line at a time, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from distill.artifacts import (
    StageRecord,
    atomic_write_text,
    prepare_output,
    read_manifest,
    require_input,
    stage_dir,
    stage_status,
)
from distill.config import EVAL_MODELS, PipelineConfig
from distill.constrain import HFGrammars, first_grammar, llama_grammar, task_grammar
from distill.errors import DistillError
from distill.tasks import Grammar, Task, load_task, quality_score

log = logging.getLogger(__name__)

RECORDS = "generations.jsonl"
CONSTRAINED = "generations.constrained.jsonl"
# How each evaluated model is named in tables and plots.
DESCRIPTIONS = {
    "teacher": "teacher (held-out responses)",
    "base": "student before training",
    "adapter": "student + LoRA adapter",
    "merged": "merged student",
    "pruned": "pruned student",
    "gguf": "GGUF in llama.cpp",
    "int8": "torch dynamic int8",
}


def eval_stage(model: str) -> str:
    return f"eval/{model}"


def test_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))
    if "test" not in dataset or len(dataset["test"]) == 0:
        raise DistillError(
            f"{stage_dir(cfg, 'generate')}: no held-out test examples; set generate.test_examples > 0 and run "
            f"`distill generate {cfg.command_args} --overwrite`"
        )
    split = dataset["test"]
    return [split[i] for i in range(min(cfg.eval.num_prompts, len(split)))]


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


class HFModel:
    """A transformers model (base, adapter, merged, pruned or int8) with its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, cfg: PipelineConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        eos = model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        self.grammars: HFGrammars | None = None

    def generate(self, ids: list[int], grammar: Grammar | None = None) -> tuple[str, int]:
        import torch

        e = self.cfg.eval
        sampling = {"do_sample": True, "temperature": e.temperature} if e.temperature > 0 else {"do_sample": False}
        processors = []
        if grammar is not None:
            self.grammars = self.grammars or HFGrammars(self.model, self.tokenizer, self.eos)
            processors.append(self.grammars.processor([grammar]))
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=e.max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.tokenizer.pad_token_id,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                **sampling,
            )
        new = out[0, len(ids) :].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)

    def nll(self, ids: list[int], answer: list[int]) -> float:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([ids + answer])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
        return float(-logp.gather(1, torch.tensor(answer)[:, None]).sum())


class GGUFModel:
    """The exported GGUF in llama.cpp, fed the same token ids as the HF models."""

    def __init__(self, path: Path, context: int, cfg: PipelineConfig):
        from distill.stages.export import llama_cpp

        self.cfg = cfg
        # logits_all keeps every position's logits for the perplexity: vocab x context floats of host memory.
        self.llm = llama_cpp("eval").Llama(
            model_path=str(path), n_ctx=context, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1
        )

    def generate(self, ids: list[int], grammar: Grammar | None = None) -> tuple[str, int]:
        self.llm.reset()
        out = self.llm.create_completion(
            prompt=ids,
            max_tokens=self.cfg.eval.max_new_tokens,
            temperature=self.cfg.eval.temperature,
            top_p=1.0,
            top_k=0 if self.cfg.eval.temperature > 0 else 1,
            seed=self.cfg.seed,
            grammar=llama_grammar(self.llm, grammar) if grammar is not None else None,
        )
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def nll(self, ids: list[int], answer: list[int]) -> float:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids + answer)
        scores = np.asarray(self.llm.scores[len(ids) - 1 : len(ids) + len(answer) - 1], dtype=np.float64)
        top = scores.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        return float((logz - scores[np.arange(len(answer)), answer]).sum())

    def close(self) -> None:
        self.llm.close()


def tokenizer_dir(cfg: PipelineConfig, model: str) -> Path:
    """Where a model's tokenizer is saved; every student variant shares the student's vocabulary."""
    if model == "base":
        return Path(cfg.models.student)
    if model == "adapter":
        return stage_dir(cfg, "train") / "adapter"
    return stage_dir(cfg, "prune" if model == "pruned" else "merge") / "model"


def load_model(cfg: PipelineConfig, model: str, tokenizer: Any, context: int) -> tuple[Any, Any]:
    """(runner, close or None) for one of EVAL_MODELS; the upstream stage must be complete."""
    import torch
    from transformers import AutoModelForCausalLM

    require_input(cfg, EVAL_MODELS[model])
    if model == "gguf":
        from distill.stages.serve import find_gguf

        gguf = GGUFModel(find_gguf(cfg), context, cfg)
        return gguf, gguf.close
    if model == "int8":
        name = (read_manifest(stage_dir(cfg, "export")) or {}).get("files", {}).get("int8")
        if name is None:
            raise DistillError(
                f"{stage_dir(cfg, 'export')}: no int8 model; run `distill export {cfg.command_args} --overwrite`"
            )
        from distill.stages.export import load_int8

        return HFModel(load_int8(stage_dir(cfg, "export") / name), tokenizer, cfg), None
    if model == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
        return HFModel(
            PeftModel.from_pretrained(base, stage_dir(cfg, "train") / "adapter").eval(), tokenizer, cfg
        ), None
    folder = tokenizer_dir(cfg, model)  # base, merged, pruned: weights and tokenizer side by side
    return HFModel(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer, cfg), None


def model_size(cfg: PipelineConfig, model: str) -> int | None:
    """Bytes on disk of what the model is loaded from."""

    def folder_bytes(path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    if model == "base":
        return folder_bytes(Path(cfg.models.student))
    if model == "adapter":
        return folder_bytes(stage_dir(cfg, "train") / "adapter")
    if model in ("merged", "pruned"):
        return folder_bytes(stage_dir(cfg, "prune" if model == "pruned" else "merge") / "model")
    if model in ("gguf", "int8"):
        name = (read_manifest(stage_dir(cfg, "export")) or {}).get("files", {}).get(model)
        path = stage_dir(cfg, "export") / name if name else None
        return None if path is None else folder_bytes(path) if path.is_dir() else path.stat().st_size
    return None


def _answer_ids(tokenizer: Any, prompt_ids: list[int], prompt: str, response: str) -> list[int]:
    from distill.sft_data import encode_example

    enc = encode_example(tokenizer, prompt, response, max_length=1 << 30, example_id="eval")
    return enc.input_ids[len(prompt_ids) :]


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    from distill.stages.generate import read_records

    return {record["id"]: record for _, record in read_records(path)}


def evaluate(
    cfg: PipelineConfig, task: Task, model: str, rows: list[dict[str, Any]], folder: Path, constrained: bool = False
) -> dict[bool, list[dict[str, Any]]]:
    """Generate and score every test prompt not yet in a records file, with one load of the model;
    returns all records of the free pass (False) and, with `constrained`, of the pass under each input's
    grammar (True). Perplexity does not depend on the decoding: it is measured on the free pass."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    paths = {False: folder / RECORDS, **({True: folder / CONSTRAINED} if constrained else {})}
    done = {kind: _read_done(path) for kind, path in paths.items()}
    todo = {kind: [r for r in rows if r["id"] not in done[kind]] for kind in paths}
    if model == "teacher":  # the teacher's answers are the test split itself
        records = [
            {"id": r["id"], "split": "test", "text": r["response"], **score(r["response"], r, task)}
            for r in todo[False]
        ]
        _append(paths[False], records)
        done[False].update((r["id"], r) for r in records)
        todo = {}
    if any(todo.values()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg, model))
        encoded = {}
        for r in {r["id"]: r for pending in todo.values() for r in pending}.values():
            prompt_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=True, add_generation_prompt=True
            )["input_ids"]
            encoded[r["id"]] = (prompt_ids, _answer_ids(tokenizer, prompt_ids, r["prompt"], r["response"]))
        context = max(len(p) + max(len(a), cfg.eval.max_new_tokens) for p, a in encoded.values()) + 8
        runner, close = load_model(cfg, model, tokenizer, context)
        try:
            for kind, pending in todo.items():
                label = f"eval {model}" + (" under the grammar" if kind else "")
                with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as progress:
                    bar = progress.add_task("eval", total=len(rows), completed=len(rows) - len(pending))
                    for row in pending:
                        prompt_ids, answer = encoded[row["id"]]
                        grammar = task_grammar(task, json.loads(row["payload"])) if kind else None
                        start = time.perf_counter()
                        text, tokens = runner.generate(prompt_ids, grammar)
                        latency = time.perf_counter() - start
                        record = {
                            "id": row["id"],
                            "split": "test",
                            "text": text,
                            "tokens": tokens,
                            "latency_s": round(latency, 4),
                            **score(text, row, task),
                        }
                        if not kind:
                            record.update(nll=runner.nll(prompt_ids, answer), answer_tokens=len(answer))
                        _append(paths[kind], [record])
                        done[kind][row["id"]] = record
                        progress.advance(bar)
        finally:
            if close is not None:
                close()
    return {kind: [done[kind][r["id"]] for r in rows] for kind in paths}


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out.flush()
        os.fsync(out.fileno())


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


def check_eval_models(cfg: PipelineConfig, models: list[str] | None = None) -> None:
    """Refuse, before any work, a model this config never produces."""
    for model in cfg.eval.models if models is None else models:
        if model not in EVAL_MODELS:
            raise DistillError(f"eval --model {model}: unknown model; use one of {', '.join(EVAL_MODELS)}")
        if model == "adapter" and cfg.train.method != "lora":
            raise DistillError(
                f"eval model 'adapter': train.method is {cfg.train.method}, so there is no adapter; use 'merged'"
            )
        if model == "pruned" and not cfg.prune.enabled:
            raise DistillError(
                "eval model 'pruned': pruning is off; set prune.enabled=true or drop 'pruned' from eval.models"
            )
        if model == "int8" and not cfg.export.torch_int8:
            raise DistillError(
                "eval model 'int8': no int8 export; set export.torch_int8=true or drop 'int8' from eval.models"
            )


def run(cfg: PipelineConfig, overwrite: bool = False, model: str = "merged") -> Path:
    check_eval_models(cfg, [model])
    stage = eval_stage(model)
    folder = stage_dir(cfg, stage)
    require_input(cfg, "generate")
    require_input(cfg, EVAL_MODELS[model])
    task = load_task(cfg)  # a broken task or grammar fails before the output folder is touched
    rows = test_rows(cfg)
    grammar = None
    if cfg.eval.grammar and model != "teacher":  # the teacher's answers are the data, not decoded here
        grammar = first_grammar(task, json.loads(rows[0]["payload"]), "eval.grammar")
    if prepare_output(cfg, stage, overwrite) == "skip":
        log.info("eval %s: complete, skipping (%s)", model, folder)
        write_comparison(cfg, task)
        return folder
    log.info("eval config: %s", cfg.eval.model_dump())
    record = StageRecord(cfg, stage, inputs=tuple(dict.fromkeys(("generate", EVAL_MODELS[model]))))
    record.files = {"generations": RECORDS}
    records = evaluate(cfg, task, model, rows, folder, constrained=grammar is not None)
    summary = summarize(records[False], task)
    if grammar is not None:
        summary["constrained"] = summarize(records[True], task)
        record.files["constrained generations"] = CONSTRAINED
    if model != "teacher":
        summary["grammar"] = grammar_use(cfg, grammar)
    summary["size_bytes"] = model_size(cfg, model)
    if model == "teacher":
        generated = read_manifest(stage_dir(cfg, "generate"))["metrics"]
        # The test split holds only accepted answers; the teacher's own validity is its acceptance rate.
        summary["teacher_acceptance_rate"] = generated.get("acceptance_rate")
    record.metrics = summary
    atomic_write_text(folder / "summary.md", render_summary(cfg, task, model, summary))
    log.info(
        "eval %s: %d %ss, %.0f%% valid, quality %.2f%s%s",
        model,
        summary["answers"],
        task.unit,
        100 * summary["validity"],
        summary["mean_quality"],
        f", perplexity {summary['perplexity']:.2f}" if "perplexity" in summary else "",
        f"; under the grammar {summary['constrained']['validity']:.0%} valid" if "constrained" in summary else "",
    )
    out = record.finish()
    write_comparison(cfg, task)
    return out


def grammar_use(cfg: PipelineConfig, grammar: Grammar | None) -> str:
    """Which decodings a model's summary holds, in words for the report."""
    if grammar is not None:
        return "free and constrained"
    return "free only (eval.grammar is off)" if not cfg.eval.grammar else "free only (the task has no grammar)"


def evaluated(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Summaries of every model whose evaluation is complete for this config, in EVAL_MODELS order."""
    return {
        m: read_manifest(stage_dir(cfg, eval_stage(m)))["metrics"]
        for m in EVAL_MODELS
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
    return DESCRIPTIONS[model]


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
