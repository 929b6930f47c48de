"""`<run>/REPORT.md`: one page with the pipeline's key numbers, read from the stages' manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text, read_manifest, stage_dir, stage_status
from distill.config import SPLIT_KEYS, PipelineConfig
from distill.dedup import DEDUP_WORDS
from distill.metrics import (
    ExportMetrics,
    GenerateMetrics,
    KdSummary,
    MergeMetrics,
    PruneMetrics,
    ServeMetrics,
    TrainMetrics,
    stage_model,
)
from distill.scoring import shares
from distill.tasks import Task, load_task

MIB = 2**20


def stage_metrics(cfg: PipelineConfig, stage: str) -> Any:
    """A stage's typed metrics when it is complete for this config (a stale result would misreport this run)."""
    if stage_status(cfg, stage) != "complete":
        return None
    return stage_model(stage).model_validate((read_manifest(stage_dir(cfg, stage)) or {}).get("metrics", {}))


def _wall(cfg: PipelineConfig, stage: str) -> float:
    return (read_manifest(stage_dir(cfg, stage)) or {}).get("wall_s", 0.0)


def _missing(cfg: PipelineConfig, stage: str) -> list[str]:
    return [f"Not run yet: `distill {stage} {cfg.command_args}` (or `distill run {cfg.command_args}`).", ""]


def teacher_words(cfg: PipelineConfig, task: Task) -> str:
    """Who really wrote the data: a model through a backend, or the task's own reference answers."""
    if cfg.generate.backend == "reference":
        return f"reference answers of the `{task.name}` task ({task.reference_source}); no language-model teacher ran"
    constrained = ", decoding under the task's output grammar" if cfg.generate.grammar else ""
    return f"teacher `{cfg.models.teacher}` through the `{cfg.generate.backend}` backend{constrained}"


def _generate(cfg: PipelineConfig, task: Task, m: GenerateMetrics) -> list[str]:
    counts = m.counts
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(m.reject_reasons.items(), key=lambda kv: -kv[1])) or "none"
    who = teacher_words(cfg, task)
    lines = [
        (
            f"Written by {who}: {counts['train']} training, {counts['validation']} validation and {counts['test']} "
            f"test examples (held-out groups, never trained on) from {counts['attempts']} attempts; acceptance "
            f"{m.acceptance_rate:.0%}; rejected for: {reasons}."
            + (f" Near-duplicates: {DEDUP_WORDS[m.dedup]} compared." if m.dedup else "")
        ),
        "",
    ]
    if m.inputs:
        taken = "; ".join(
            f"{split} {counts[split]:,} of {n.usable:,} usable"
            + (
                f" (every one that passed: `{SPLIT_KEYS[split]}: all`)"
                if (m.requested or {}).get(split) == "all"
                else ""
            )
            for split, n in m.inputs.items()
            if n.usable is not None
        )
        lines += [f"The task's inputs: {taken}.", ""]
    if m.class_balance:
        balance = "; ".join(f"{split} {shares(c)}" for split, c in m.class_balance.items() if c)
        lines += [f"Class balance (answers per label): {balance}.", ""]
    if m.prompt_tokens:
        p, r = m.prompt_tokens, m.response_tokens
        lines += [
            (
                f"Student-tokenizer lengths: prompt mean {p.mean:.0f} (p95 {p.p95}), response mean {r.mean:.0f} "
                f"(p95 {r.p95})"
                # reference answers are looked up, not generated: their rate says nothing
                + (
                    f"; teacher output {m.output_tokens_per_s:,.0f} tokens/s."
                    if cfg.generate.backend != "reference"
                    else "."
                )
            ),
            "",
        ]
    if m.logprobs:
        d = m.logprobs
        lines += [
            (
                f"The teacher's top-{d.k} log-probabilities were kept at each of its {d.teacher_tokens:,} "
                f"tokens in accepted answers: {d.bytes / 2**20:,.1f} MiB ({d.bytes_per_token} B/token)."
            ),
            "",
        ]
    return lines


def _train(cfg: PipelineConfig, m: TrainMetrics) -> list[str]:
    lines = [
        f"{cfg.train.method} fine-tuning with `{m.backend}`, {m.optimizer.rsplit('.', 1)[-1]} ({m.optimizer}), "
        f"{m.precision}: {m.trainable_params:,} trainable of {m.all_params:,} parameters "
        f"({m.trainable_params / m.all_params:.1%}), {m.steps} steps over {m.examples} examples in "
        f"{m.wall_s / 60:.1f} min ({m.tokens_per_s:,.0f} tokens/s); "
        + (
            f"final loss {m.final_loss:.3f}"
            if m.final_loss is not None
            else f"no loss logged (fewer steps than train.logging_steps={cfg.train.logging_steps})"
        )
        + (f"; {m.truncated} examples truncated" if m.truncated else "")
        + (
            f"; {m.skipped_too_long} left out (prompt longer than train.max_length={cfg.train.max_length})"
            if m.skipped_too_long
            else ""
        )
        + ".",
        "",
        objective_words(m),
        "",
    ]
    if (stage_dir(cfg, "train") / "loss.png").is_file():
        lines += ["![training loss](train/loss.png)", ""]
    return lines


def objective_words(m: TrainMetrics) -> str:
    kd, op = m.kd, m.on_policy
    if m.objective == "on_policy" and op:
        c = op.coverage
        where = "in the training process" if op.teacher == "transformers" else "on a vLLM server"
        offline = offline_words(kd) if kd else "cross-entropy on the teacher's text (the data has no distribution)"
        judged = op.teacher_nll_per_token
        judgement = f"; {judged:.3f} nats per student token" if judged is not None else ""
        return (
            f"Objective: on-policy distillation. {op.share:.0%} of {op.on_policy_batches + op.offline_batches:,} "
            f"micro-batches (lmbda {op.lmbda}{f' from step {op.start_step}' if op.start_step else ''}) were the "
            f"student's own answers: {op.rows:,} sampled "
            f"{'under the task grammar' if op.grammar else 'free'} at temperature {op.temperature} "
            f"({op.sampled_tokens:,} tokens), scored by the teacher {where} ({op.scored_tokens:,} tokens"
            f"{judgement}) and "
            f"trained on {op.divergence}{f' (beta {op.beta})' if op.divergence == 'jsd' else ''} alone; "
            f"{c.share:.0%} of the sampled tokens had the teacher's judgement (same tokenizer {c.direct:,}, mapped "
            f"by text {c.mapped:,}, a run of the teacher's tokens {c.span or 0:,}, ULD {c.uld:,}; none {c.none:,}). "
            f"Time: sampling {op.sampling_s:,.0f} s, "
            f"scoring {op.scoring_s:,.0f} s, training {op.training_s:,.0f} s. The other micro-batches: {offline}."
        )
    if m.objective != "kd" or not kd:
        return "Objective: cross-entropy on the teacher's text (SFT)."
    return f"Objective: {offline_words(kd)}."


def offline_words(kd: KdSummary) -> str:
    """How the stored answers' distribution was distilled, and how much of it reached the student."""
    c = kd.coverage
    beta = f", beta {kd.beta}" if kd.divergence == "jsd" else ""
    return (
        f"distillation of the teacher's top-k distribution ({kd.divergence}{beta}, temperature "
        f"{kd.temperature}, cross-entropy weight {kd.alpha}); {c.share:.0%} of {c.tokens:,} response "
        f"tokens had a teacher distribution (same tokenizer {c.direct:,}, mapped by text {c.mapped:,}, "
        f"ULD {c.uld:,}; none {c.none:,})"
    )


def _sizes(
    cfg: PipelineConfig, merge: MergeMetrics | None, prune: PruneMetrics | None, export: ExportMetrics | None
) -> list[str]:
    lines = ["| artifact | parameters | bytes | vs teacher (bf16) |", "|---|---|---|---|"]
    # only a teacher that wrote the data, with a known size, gets a row and a ratio
    teacher = export.teacher_bf16_bytes if export else None
    if teacher:
        lines.append(f"| teacher (bf16) | {export.teacher_params:,} | {teacher / MIB:,.1f} MiB | 1x |")

    def ratio(size: int) -> str:
        if not teacher:
            return "–"
        return f"{teacher / size:,.1f}x smaller" if size <= teacher else f"{size / teacher:,.1f}x larger"

    if merge:
        lines.append(
            f"| merged student ({merge.dtype}) | {merge.params:,} | {merge.safetensors_bytes / MIB:,.2f} MiB | {ratio(merge.safetensors_bytes)} |"
        )
    if prune:
        lines.append(
            f"| pruned student ({prune.overall_sparsity:.0%} of Linear weights zero) | {prune.params:,} "
            f"| {prune.safetensors_bytes / MIB:,.2f} MiB | {ratio(prune.safetensors_bytes)} |"
        )
    if export:
        lines.append(f"| GGUF {export.format} | – | {export.file_bytes / MIB:,.2f} MiB | {ratio(export.file_bytes)} |")
        if export.int8_bytes:
            lines.append(
                f"| torch dynamic int8 | – | {export.int8_bytes / MIB:,.2f} MiB | {ratio(export.int8_bytes)} |"
            )
    lines.append("")
    if not export:
        lines += _missing(cfg, "export")
    if merge:
        folded = (
            f"adapter folded with max |Δlogit| {merge.fold_max_abs_logit_diff:.2g}"
            if merge.method == "lora"
            else "fully fine-tuned weights, no adapter to fold"
        )
        lines += [
            f"Merge: {folded}; saving as {merge.dtype} adds max |Δlogit| {merge.saved_dtype_max_abs_logit_diff:.2g}.",
            "",
        ]
    if export:
        v = export.verification
        lines += [
            (
                f"Export verified in llama.cpp on {v.prompts} validation prompts: tokenization identical for "
                f"{v.tokenization_match:.0%}, next-token top-1 agreement {v.top1_agreement:.0%}, max |Δlogit| "
                f"{v.max_abs_logit_diff:.3g}."
            ),
            "",
        ]
    return lines


def _serve(task: Task, m: ServeMetrics, report_md: Path) -> list[str]:
    fleet = "one server with its slots" if m.best_fleet == "slots" else "the paper's processes"
    held = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in m.budget_held.items())
    served = (
        f"best: {fleet}, {m.capacity} concurrent users within {m.slo_ms:g} ms"
        if m.meets_slo
        else f"no configuration meets the {m.slo_ms:g} ms SLO; closest: {fleet}"
    )
    lines = [
        (
            f"Plan: {m.instances_planned} processes or one server with {m.slots_planned} slots fit the GPU "
            f"budget; {served}, goodput {m.goodput_per_s} valid {task.unit}s/s"
            + (f" under the grammar ({m.goodput_per_s_free} free)" if m.grammar else "")
            + f", end to end p50 {m.e2e_p50_ms:g} ms / p95 {m.e2e_p95_ms:g} ms, {m.valid_share:.0%} valid; "
            f"plan held: {held}."
        ),
        "",
    ]
    if report_md.is_file():
        body = report_md.read_text(encoding="utf-8").split("\n", 2)[-1]  # drop its own title
        lines += [body.strip(), ""]
    return lines


def _grammar_note(task: Task, results: dict[str, Any]) -> str:
    uses = {s["grammar"] for s in results.values() if "grammar" in s}
    if uses != {"free and constrained"}:
        return "Decoding: " + "; ".join(sorted(uses)) + "." if uses else ""
    leaves = "; ".join(f"{check} ({why})" for check, why in task.grammar_leaves.items())
    return (
        "Rows marked `+ grammar` decode under the task's output grammar for each input (GBNF: xgrammar for the "
        "transformers models, llama.cpp's grammar sampler for the GGUF)"
        + (f"; it cannot enforce {leaves}, which the checks still count." if leaves else ".")
    )


def _eval(cfg: PipelineConfig, task: Task) -> list[str]:
    from distill.comparison import comparison_table, evaluated

    results = evaluated(cfg)
    if not results:
        return _missing(cfg, "eval")
    lines = [
        (
            f"{next(iter(results.values()))['answers']} held-out test inputs of the `{task.name}` task (their groups "
            f"never trained on), greedy decoding, up to {cfg.eval.max_new_tokens} new tokens; perplexity is on the "
            "teacher's responses to the same prompts."
        ),
        "",
        comparison_table(cfg, task, results),
        _grammar_note(task, results),
        "",
    ]
    if (
        "teacher" in results
        and results["teacher"].get("teacher_acceptance_rate") is not None
        and cfg.generate.backend != "reference"
    ):
        lines += [
            (
                f"The teacher row scores the accepted test answers, so it is valid by construction; the teacher's own "
                f"first-try validity was its acceptance rate, {results['teacher']['teacher_acceptance_rate']:.0%}."
            ),
            "",
        ]
    if (stage_dir(cfg, "eval") / "comparison.png").is_file():
        lines += ["![held-out comparison](eval/comparison.png)", ""]
    if (stage_dir(cfg, "eval") / "confusion.png").is_file():
        lines += ["![confusion matrices](eval/confusion.png)", ""]
    return lines


def render_report(cfg: PipelineConfig) -> str:
    task = load_task(cfg)
    found = {s: stage_metrics(cfg, s) for s in ("generate", "train", "merge", "prune", "export", "serve")}
    gen, train, merge, export, serve = (found[s] for s in ("generate", "train", "merge", "export", "serve"))
    prune = found["prune"] if cfg.prune.enabled else None
    walls = {s: _wall(cfg, s) for s, m in found.items() if m is not None}
    lines = [
        f"# {cfg.run_name}: distillation report",
        "",
        f"Task `{task.name}`; teacher "
        + (f"`{cfg.models.teacher}`" if cfg.generate.backend != "reference" else "none (the task's reference answers)")
        + f" -> student `{cfg.models.student}`; config `{cfg.command_args}`.",
        "Stage wall times: " + (", ".join(f"{s} {w / 60:.1f} min" for s, w in walls.items()) or "none yet") + ".",
        "",
        "## Data",
        "",
        *(_generate(cfg, task, gen) if gen else _missing(cfg, "generate")),
        "## Training",
        "",
        *(_train(cfg, train) if train else _missing(cfg, "train")),
        "## Sizes and export",
        "",
        *(_sizes(cfg, merge, prune, export) if merge or export else _missing(cfg, "export")),
        "## Serving",
        "",
        *(_serve(task, serve, stage_dir(cfg, "serve") / "report.md") if serve else _missing(cfg, "serve")),
        "## Held-out quality",
        "",
        *_eval(cfg, task),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(cfg: PipelineConfig) -> Path:
    target = cfg.run_path / "REPORT.md"
    atomic_write_text(target, render_report(cfg))
    return target
