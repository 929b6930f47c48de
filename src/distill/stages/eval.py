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
import time
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text, open_stage, read_manifest, require_inputs, stage_dir
from distill.card import write_cards
from distill.comparison import render_summary, write_comparison
from distill.config import PipelineConfig
from distill.constrain import first_grammar, task_grammar
from distill.data import append_records, read_records, test_rows
from distill.scoring import score, summarize
from distill.stages import eval_stage
from distill.tasks import Grammar, Task, load_task
from distill.variants import VARIANTS, check_variants

log = logging.getLogger(__name__)

RECORDS = "generations.jsonl"
CONSTRAINED = "generations.constrained.jsonl"


def _answer_ids(tokenizer: Any, prompt_ids: list[int], prompt: str, response: str) -> list[int]:
    from distill.sft_data import encode_example

    enc = encode_example(tokenizer, prompt, response, max_length=1 << 30, example_id="eval")
    return enc.input_ids[len(prompt_ids) :]


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for _, record in read_records(path)}


def _encode(tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[int]]]:
    """Each row's chat-formatted prompt ids and the ids of the teacher's answer after it (for perplexity)."""
    encoded = {}
    for r in rows:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        encoded[r["id"]] = (prompt_ids, _answer_ids(tokenizer, prompt_ids, r["prompt"], r["response"]))
    return encoded


def evaluate(
    cfg: PipelineConfig, task: Task, model: str, rows: list[dict[str, Any]], folder: Path, constrained: bool = False
) -> dict[bool, list[dict[str, Any]]]:
    """Generate and score every test prompt not yet in a records file, with one load of the model;
    returns all records of the free pass (False) and, with `constrained`, of the pass under each input's
    grammar (True). Perplexity does not depend on the decoding: it is measured on the free pass."""

    paths = {False: folder / RECORDS, **({True: folder / CONSTRAINED} if constrained else {})}
    done = {kind: _read_done(path) for kind, path in paths.items()}
    todo = {kind: [r for r in rows if r["id"] not in done[kind]] for kind in paths}
    if model == "teacher":  # the teacher's answers are the test split itself
        records = [
            {"id": r["id"], "split": "test", "text": r["response"], **score(r["response"], r, task)}
            for r in todo[False]
        ]
        append_records(paths[False], records)
        done[False].update((r["id"], r) for r in records)
        todo = {}
    if any(todo.values()):
        _decode(cfg, task, model, len(rows), todo, paths, done)
    return {kind: [done[kind][r["id"]] for r in rows] for kind in paths}


def _decode(
    cfg: PipelineConfig,
    task: Task,
    model: str,
    total: int,
    todo: dict[bool, list[dict[str, Any]]],
    paths: dict[bool, Path],
    done: dict[bool, dict[str, dict[str, Any]]],
) -> None:
    """One load of the model answers every pending row, free and (where asked) under the grammar; each
    record is appended as soon as it is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import AutoTokenizer

    from distill.runtimes import load_runtime

    tokenizer = AutoTokenizer.from_pretrained(VARIANTS[model].tokenizer_folder(cfg))
    encoded = _encode(tokenizer, list({r["id"]: r for pending in todo.values() for r in pending}.values()))
    context = max(len(p) + max(len(a), cfg.eval.max_new_tokens) for p, a in encoded.values()) + 8
    runner, close = load_runtime(cfg, model, tokenizer, context)
    try:
        for kind, pending in todo.items():
            label = f"eval {model}" + (" under the grammar" if kind else "")
            with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as progress:
                bar = progress.add_task("eval", total=total, completed=total - len(pending))
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
                    append_records(paths[kind], [record])
                    done[kind][row["id"]] = record
                    progress.advance(bar)
    finally:
        if close is not None:
            close()


def run(cfg: PipelineConfig, overwrite: bool = False, model: str = "merged") -> Path:
    check_variants(cfg, [model])
    stage = eval_stage(model)
    require_inputs(cfg, stage)
    task = load_task(cfg)  # a broken task or grammar fails before the output folder is touched
    rows = test_rows(cfg)
    grammar = None
    if cfg.eval.grammar and model != "teacher":  # the teacher's answers are the data, not decoded here
        grammar = first_grammar(task, json.loads(rows[0]["payload"]), "eval.grammar")
    record = open_stage(cfg, stage, overwrite)
    if record is None:
        write_comparison(cfg, task)
        write_cards(cfg)
        return stage_dir(cfg, stage)
    folder = record.folder
    record.files = {"generations": RECORDS}
    records = evaluate(cfg, task, model, rows, folder, constrained=grammar is not None)
    summary = summarize(records[False], task, rows)
    if grammar is not None:
        summary["constrained"] = summarize(records[True], task, rows)
        record.files["constrained generations"] = CONSTRAINED
    if model != "teacher":
        summary["grammar"] = grammar_use(cfg, grammar)
    summary["size_bytes"] = VARIANTS[model].size(cfg)
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
    write_cards(cfg)
    return out


def grammar_use(cfg: PipelineConfig, grammar: Grammar | None) -> str:
    """Which decodings a model's summary holds, in words for the report."""
    if grammar is not None:
        return "free and constrained"
    return "free only (eval.grammar is off)" if not cfg.eval.grammar else "free only (the task has no grammar)"
