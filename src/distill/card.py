"""The model card: `README.md` beside the exported student (the merged or pruned HF folder, and the GGUF's
folder), laid out as the Hugging Face Hub and its peers expect a model folder: YAML metadata (base model,
library, licence, tags, `model-index` with the held-out task metrics) above a page a person reads (the task
and its checks, who taught it and how, held-out results, serving, how to run it, its limits).

Export writes the cards; serve, eval and `distill run` rewrite them as their results arrive, so a card never
claims more than the run's complete stages hold.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text, is_complete, stage_dir
from distill.comparison import comparison_table, evaluated
from distill.config import PipelineConfig
from distill.metrics import ExportMetrics, GenerateMetrics, ServeMetrics, TrainMetrics
from distill.report import objective_words, stage_metrics, teacher_words
from distill.stages import STAGES
from distill.tasks import Labels, Records, Task, load_task
from distill.variants import VARIANTS, of_stage

CARD = "README.md"


def hub_id(ref: str | None) -> str | None:
    """`ref` where it names a Hub model (owner/name, and no folder of that name here): the Hub refuses a
    `base_model` it cannot resolve, so a local folder is named in the text instead."""
    if not ref or Path(ref).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        return None
    return ref


def card_targets(cfg: PipelineConfig) -> list[tuple[Path, str, str]]:
    """(folder, library, model row) of each card: the HF folder export read, and the GGUF's folder."""
    (source,) = STAGES["export"].inputs(cfg)
    return [
        (stage_dir(cfg, source) / "model", "transformers", of_stage(source)[0].name),
        (stage_dir(cfg, "export"), "gguf", "gguf"),
    ]


def write_cards(cfg: PipelineConfig) -> list[Path]:
    """Every card of the run, from what its complete stages hold; none before export is complete."""
    if not is_complete(cfg, "export"):
        return []
    task = load_task(cfg)
    written = []
    for folder, library, row in card_targets(cfg):
        atomic_write_text(folder / CARD, render_card(cfg, task, folder, library, row))
        written.append(folder / CARD)
    return written


def eval_results(task: Task, summary: dict[str, Any] | None) -> list[Any]:
    """`model-index` entries of one model row: its held-out scores, free and under the grammar."""
    from huggingface_hub import EvalResult

    if not summary:
        return []
    dataset = {
        "task_type": "text-generation",
        "task_name": f"{task.name} ({task.unit}s checked by the task pack)",
        "dataset_type": task.name,
        "dataset_name": f"{task.name} held-out test inputs",
        "dataset_split": "test",
    }
    results = []
    for decoding, scores in (("free", summary), ("grammar", summary.get("constrained"))):
        if not scores:
            continue
        how = "free decoding" if decoding == "free" else "under the task's output grammar"
        metrics = [
            ("validity", f"valid {task.unit}s, {how}", scores["validity"]),
            ("quality", f"mean quality score, {how}", scores["mean_quality"]),
            *gold_metrics(task, scores.get("gold") or {}, how),
        ]
        if decoding == "free" and summary.get("perplexity") is not None:
            metrics.append(("perplexity", "perplexity on the teacher's held-out responses", summary["perplexity"]))
        results += [
            EvalResult(**dataset, metric_type=kind, metric_name=name, metric_value=round(float(value), 4))
            for kind, name, value in metrics
        ]
    return results


def gold_metrics(task: Task, gold: dict[str, Any], how: str) -> list[tuple[str, str, float]]:
    if isinstance(task.shape, Labels) and gold.get("labels"):
        g = gold["labels"]
        return [
            ("accuracy", f"accuracy against gold labels, {how}", g["accuracy"]),
            ("f1", f"macro-F1, {how}", g["macro_f1"]),
        ]
    if isinstance(task.shape, Records) and gold.get("records"):
        g = gold["records"]
        return [
            ("exact_match", f"{task.unit}s equal to gold, {how}", g["exact_match"]),
            ("f1", f"field F1 against gold, {how}", g["field_f1"]),
        ]
    if gold.get("exact_match") is not None:
        return [("exact_match", f"{task.unit}s equal to gold, {how}", gold["exact_match"])]
    return []


def front_matter(cfg: PipelineConfig, task: Task, library: str, summary: dict[str, Any] | None) -> Any:
    from huggingface_hub import ModelCardData

    tags = ["distillation", "distill", task.name, "gguf" if library == "gguf" else "safetensors"]
    if cfg.train.method == "lora":
        tags.append("lora")
    # the Hub's base_model is the checkpoint training started from; the teacher, which wrote the data, has no key
    # of its own there, so it gets one beside it
    teacher = None if cfg.generate.backend == "reference" else cfg.models.teacher
    return ModelCardData(
        base_model=cfg.card.base_model or hub_id(cfg.models.student),
        teacher=teacher,
        library_name=library,
        license=cfg.card.license,
        pipeline_tag="text-generation",
        tags=tags,
        model_name=cfg.run_name,
        eval_results=eval_results(task, summary) or None,
    )


def render_card(cfg: PipelineConfig, task: Task, folder: Path, library: str, row: str) -> str:
    from huggingface_hub import ModelCard

    results = evaluated(cfg)
    data = front_matter(cfg, task, library, results.get(row))
    export: ExportMetrics = stage_metrics(cfg, "export")
    gen: GenerateMetrics | None = stage_metrics(cfg, "generate")
    train: TrainMetrics | None = stage_metrics(cfg, "train")
    serve: ServeMetrics | None = stage_metrics(cfg, "serve")
    teacher = (
        "the task's own reference answers (no language model wrote the data)"
        if cfg.generate.backend == "reference"
        else f"`{cfg.models.teacher}`"
    )
    lines = [
        f"# {cfg.run_name}",
        "",
        f"A {export.student_params:,}-parameter student for the `{task.name}` task, distilled from {teacher} "
        "by `distill`. This folder holds "
        + (
            f"the {VARIANTS[row].description} as transformers safetensors."
            if library == "transformers"
            else f"it as a {export.format.upper()} GGUF for llama.cpp"
            + (" and as torchao dynamic int8 (`int8/`)." if export.int8_bytes else ".")
        ),
        "",
        "## Training",
        "",
        f"- Starting checkpoint: `{cfg.models.student}`.",
    ]
    if gen and gen.counts:
        c = gen.counts
        lines.append(
            f"- Data: written by {teacher_words(cfg, task)}; {c['train']:,} training, {c['validation']:,} "
            f"validation and {c['test']:,} held-out test examples"
            + (f" (acceptance {gen.acceptance_rate:.0%})." if gen.acceptance_rate is not None else ".")
        )
    if train:
        how = [f"LoRA r={cfg.train.lora.r}, alpha {cfg.train.lora.alpha}" if cfg.train.method == "lora" else "full"]
        how += [train.optimizer.rsplit(".", 1)[-1]] if train.optimizer else []
        how += [train.precision] if train.precision else []
        done = [f"{train.steps:,} steps"] if train.steps is not None else []
        done += [f"{train.examples:,} examples"] if train.examples is not None else []
        done += [f"final loss {train.final_loss:.3f}"] if train.final_loss is not None else []
        lines += [
            f"- Fine-tuning: {', '.join(how)}" + (f"; {', '.join(done)}." if done else "."),
            f"- {objective_words(train)}",
        ]
    grammar = _has_grammar(task)
    lines += ["", *_task_lines(task), "", "## Held-out results", ""]
    if results:
        lines += [
            (
                f"{next(iter(results.values()))['answers']} held-out test inputs (their groups never trained on), greedy "
                f"decoding, up to {cfg.eval.max_new_tokens} new tokens; `+ grammar` rows decode under each input's "
                "output grammar. This folder's model is the "
                f"*{VARIANTS[row].description}* row."
            ),
            "",
            comparison_table(cfg, task, results).rstrip(),
        ]
    else:
        lines.append(f"Not evaluated yet: `distill eval {cfg.command_args} --model {row}` (or `distill run`).")
    # read once, and only where serve is complete for this config: a stale report is another run's
    report = json.loads((stage_dir(cfg, "serve") / "report.json").read_text(encoding="utf-8")) if serve else None
    lines += ["", "## Serving", "", *_serving_lines(cfg, task, serve, report)]
    lines += ["", "## How to run it", "", *_how_to_run(cfg, task, folder, library, grammar)]
    lines += ["", "## Limits", "", *_limits(cfg, task, results.get(row), grammar, report)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"))


def _task_lines(task: Task) -> list[str]:
    checks = ", ".join(f"`{check}` ({weight:g})" for check, weight in task.weights.items())
    lines = [
        "## The task and its checks",
        "",
        (
            f"Each answer is one {task.unit}. The `{task.name}` task pack checks every {task.unit}; an answer with no "
            f"violation is valid, and each violated check costs its weight in the quality score: {checks}."
        ),
    ]
    if isinstance(task.shape, Labels):
        lines.append(f"Answers are one of {len(task.shape.classes)} labels: {', '.join(task.shape.classes)}.")
    if isinstance(task.shape, Records):
        lines.append(f"Answers are JSON records with the fields {', '.join(task.shape.fields)}.")
    return lines


def _serving_lines(
    cfg: PipelineConfig, task: Task, serve: ServeMetrics | None, report: dict[str, Any] | None
) -> list[str]:
    if serve is None:
        return [f"Not measured yet: `distill serve {cfg.command_args}` (or `distill run`)."]
    fleet = "one llama-server with its slots" if serve.best_fleet == "slots" else "the paper's separate processes"
    device = "the CPU" if report.get("device") == "cpu" else report.get("device") or "this machine"
    verdict = (
        f"{serve.capacity} concurrent users with p95 end-to-end latency within {serve.slo_ms:g} ms"
        if serve.meets_slo
        else f"no configuration met the {serve.slo_ms:g} ms SLO (closest shown)"
    )
    return [
        f"Measured by `distill serve` on {device}: best {fleet}, {verdict}; goodput {serve.goodput_per_s} valid "
        f"{task.unit}s/s"
        + (f" under the grammar ({serve.goodput_per_s_free} free)" if serve.grammar else "")
        + f"; end to end p50 {serve.e2e_p50_ms:g} ms, p95 {serve.e2e_p95_ms:g} ms; {serve.valid_share:.0%} valid. "
        f"The memory plan for {report['plan']['v_gpu_source']} ({report['plan']['v_gpu_bytes'] / 2**30:.1f} GiB): "
        f"{serve.instances_planned} processes, or one server with {serve.slots_planned} slots.",
    ]


def _how_to_run(cfg: PipelineConfig, task: Task, folder: Path, library: str, grammar: bool) -> list[str]:
    if library == "transformers":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'messages = [{"role": "user", "content": prompt}]  # prompt: as `distill task sample CONFIG` prints',
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
            f"out = model.generate(ids, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
            "```",
        ]
    serve_dir = stage_dir(cfg, "serve")
    script, modelfile = serve_dir / "llama-server.sh", serve_dir / "Modelfile"
    gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
    lines = []
    if script.is_file():
        lines += [
            (
                f"`{os.path.relpath(script, folder)}` starts llama-server as `distill serve` measured best "
                "(`PORT` and `LLAMA_SERVER` override the port and binary):"
            ),
            "",
            "```sh",
            f"PORT=8080 sh {os.path.relpath(script, folder)}",
            "```",
        ]
    else:
        lines += [
            "```sh",
            f"llama-server --model {gguf.name if gguf else 'MODEL.gguf'} --alias student --port 8080",
            "```",
        ]
    if modelfile.is_file():
        lines += [
            "",
            (
                f"Ollama, with the GGUF's chat template, stop tokens and the sampling it was evaluated with: "
                f"`ollama create student -f {os.path.relpath(modelfile, folder)}`."
            ),
        ]
    lines += [
        "",
        "Any OpenAI client, against llama-server"
        + (
            "; the grammar of an input (`distill task grammar CONFIG --payload input.json > grammar.gbnf`) holds the "
            "answer to the task's form:"
            if grammar
            else ":"
        ),
        "",
        "```python",
        "from openai import OpenAI",
        "",
        'client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")',
        "reply = client.chat.completions.create(",
        '    model="student",',
        '    messages=[{"role": "user", "content": prompt}],  # prompt: as `distill task sample CONFIG` prints',
        f"    max_tokens={cfg.eval.max_new_tokens},",
        "    temperature=0,",
        *(['    extra_body={"grammar": open("grammar.gbnf").read()},'] if grammar else []),
        ")",
        "print(reply.choices[0].message.content)",
        "```",
    ]
    return lines


def _has_grammar(task: Task) -> bool:
    example = task.example("test", 0)
    return example is not None and task.grammar(example.payload) is not None


def _limits(
    cfg: PipelineConfig, task: Task, summary: dict[str, Any] | None, grammar: bool, report: dict[str, Any] | None
) -> list[str]:
    lines = [f"- Trained and tested on the `{task.name}` task's inputs alone; on other inputs it is untested."]
    leaves = task.grammar_leaves
    if grammar:
        left = "; ".join(f"`{check}` ({why})" for check, why in leaves.items())
        lines.append(
            "- The grammar holds the answer's form, not its content: "
            + (
                f"it cannot enforce {left}, which only the task's checks catch."
                if left
                else "the task's checks still apply."
            )
        )
    if summary and summary.get("constrained"):
        lines.append(
            f"- Held out, {summary['validity']:.0%} of its {task.unit}s were valid decoded free and "
            f"{summary['constrained']['validity']:.0%} under the grammar: send the grammar."
        )
    fp16 = (report or {}).get("fp16")
    if fp16:
        lines.append(f"- fp16: {fp16['note']}.")
    if cfg.generate.backend == "reference":
        lines.append("- Its data are the task pack's reference answers: it imitates them, not a language model.")
    return lines
