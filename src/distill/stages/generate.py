"""Stage 1: the teacher writes the training data.

Work is the task's deterministic list of inputs per split, each with a stable id. Accepted and rejected
records are appended to JSONL shard files, one write per batch, so a crash or kill -9 loses at most the
batch in flight; re-running continues after the last record. A training input whose group (the crew
task's profile, say) any held-out attempt may use is skipped, so no held-out group is ever trained on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.artifacts import StageRecord, atomic_dir, atomic_write_json, open_stage, stage_dir
from distill.config import SPLIT_KEYS, PipelineConfig
from distill.constrain import first_grammar, task_grammar
from distill.data import append_records, read_records
from distill.dedup import DEDUP_WORDS, ExampleDeduplicator
from distill.errors import ConfigError, DistillError
from distill.kd import COLUMNS, pack, unpack
from distill.models import ensure_models
from distill.tasks import Dedup, Labels, Task, load_task
from distill.teachers import check_backend, make_teacher, teacher_backend

log = logging.getLogger(__name__)

SPLITS = ("validation", "test", "train")  # held-out first: they are small and fix the reserved groups


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if text is None:
            return cls(0, 1)
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            raise DistillError(f"--shard {text}: expected i/N with 0 <= i < N, e.g. --shard 0/4")
        return cls(i, n)


def requested(cfg: PipelineConfig) -> dict[str, int | None]:
    """Examples asked for per split; None: every usable input whose answer passes (`all`)."""
    g = cfg.generate
    asked = {"train": g.num_examples, "validation": g.validation_examples, "test": g.test_examples}
    return {split: None if n == "all" else n for split, n in asked.items()}


def shard_quota(total: int, shard: Shard) -> int:
    return total // shard.count + (1 if shard.index < total % shard.count else 0)


def attempt_budget(cfg: PipelineConfig, quota: int) -> int:
    return math.ceil(quota * cfg.generate.max_attempts_factor)


def reserved_groups(cfg: PipelineConfig, task: Task, shard: Shard, splits: tuple[str, ...]) -> set[str]:
    """Groups any attempt of these held-out splits may use, across all shards."""
    groups: set[str] = set()
    for split in splits:
        total = requested(cfg)[split]
        span = (
            task.size(split)  # `all` tries every input
            if total is None
            else shard.count
            * max(attempt_budget(cfg, shard_quota(total, Shard(k, shard.count))) for k in range(shard.count))
        )
        for index in range(span):
            example = task.example(split, index)
            if example is None:
                break
            groups.add(example.group)
    return groups


def blocked_groups(cfg: PipelineConfig, task: Task, shard: Shard) -> dict[str, set[str]]:
    """Per split, the groups its inputs may not have: those a held-out split before it may use."""
    validation = reserved_groups(cfg, task, shard, ("validation",))
    return {"validation": set(), "test": validation, "train": validation | reserved_groups(cfg, task, shard, ("test",))}


def usable_inputs(task: Task, split: str, blocked: set[str], shard: Shard = Shard(0, 1)) -> int | None:
    """A shard's inputs of a split whose group is not blocked; None when the task makes as many as asked."""
    size = task.size(split)
    if size is None:
        return None
    return sum(task.example(split, index).group not in blocked for index in range(shard.index, size, shard.count))


@dataclass(frozen=True)
class Target:
    """What one shard does for one split."""

    quota: int  # examples to accept; with `take_all`, the usable inputs to try
    budget: int  # attempts allowed
    take_all: bool
    blocked: set[str]

    def progress(self, state: ShardState, split: str) -> int:
        """How much of the quota is done: examples accepted, or with `take_all` inputs tried."""
        return (state.attempts if self.take_all else state.accepted)[split]


def targets(cfg: PipelineConfig, task: Task, shard: Shard) -> dict[str, Target]:
    blocked = blocked_groups(cfg, task, shard)
    out = {}
    for split, total in requested(cfg).items():
        if total is None:
            usable = usable_inputs(task, split, blocked[split], shard) or 0
            out[split] = Target(usable, usable, True, blocked[split])
        else:
            quota = shard_quota(total, shard)
            out[split] = Target(quota, attempt_budget(cfg, quota), False, blocked[split])
    return out


def input_counts(cfg: PipelineConfig, task: Task) -> dict[str, tuple[int | None, int | None]]:
    """Per split, (inputs, usable): the task's inputs, and of them those whose group no held-out attempt may use
    (None for both where the task makes as many as asked)."""
    if all(task.size(split) is None for split in SPLIT_KEYS):
        return {split: (None, None) for split in SPLIT_KEYS}
    blocked = blocked_groups(cfg, task, Shard(0, 1))
    return {split: (task.size(split), usable_inputs(task, split, blocked[split])) for split in SPLIT_KEYS}


def size_problems(cfg: PipelineConfig, task: Task, counts: dict[str, tuple[int | None, int | None]]) -> list[str]:
    """Splits that ask for more than the task's usable inputs, or for `all` of a task without an end."""
    problems = []
    for split, total in requested(cfg).items():
        inputs, usable = counts[split]
        if usable is None:
            if total is None:
                problems.append(
                    f"{SPLIT_KEYS[split]}=all: task '{task.name}' makes as many inputs as asked; give a number instead"
                )
        elif total is not None and total > usable:
            shared = f"; {inputs - usable} share a group with held-out inputs" if usable < inputs else ""
            problems.append(
                f"{SPLIT_KEYS[split]}={total} but task '{task.name}' has only {usable} usable {split} inputs "
                f"({inputs} in all{shared}); lower it, set {SPLIT_KEYS[split]}=all to take every input that passes, "
                "or add inputs"
            )
    return problems


@dataclass
class ShardState:
    """What a shard's record file already holds."""

    path: Path
    done: set[tuple[str, int]] = field(default_factory=set)
    accepted: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    accepted_records: list[dict[str, Any]] = field(default_factory=list)


def load_state(path: Path) -> ShardState:
    state = ShardState(path)
    for _, record in read_records(path):
        key = (record["split"], record["index"])
        if key in state.done:
            raise DistillError(
                f"{path}: {record['id']} appears twice; delete the later line or re-run with --overwrite"
            )
        state.done.add(key)
        state.attempts[record["split"]] += 1
        if record["status"] == "accepted":
            state.accepted[record["split"]] += 1
            state.accepted_records.append(record)
    return state


def split_candidates(
    task: Task, shard: Shard, split: str, state: ShardState, target: Target, requests: list[str] | None
) -> Iterator[dict[str, Any]]:
    """This shard's untried inputs of one split, in index order, within its attempt budget."""
    budget = target.budget - state.attempts[split]
    index = shard.index
    while budget > 0:
        if (split, index) not in state.done:
            example = task.example(split, index)
            if example is None:
                return  # the task has no more inputs for this split
            if example.group not in target.blocked:
                prompt = example.prompt
                if requests:
                    prompt = task.self_instruct().with_request(prompt, requests[index % len(requests)])
                budget -= 1
                yield {
                    "id": example.id,
                    "split": split,
                    "index": index,
                    "group": example.group,
                    "payload": example.payload,
                    "prompt": prompt,
                    "reference": example.reference,
                }
        index += shard.count


def next_batch(
    cfg: PipelineConfig,
    plan: dict[str, Target],
    state: ShardState,
    candidates: dict[str, Iterator[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Up to batch_size instances, never more of a split than it still needs, so counts come out exact."""
    batch: list[dict[str, Any]] = []
    for split in SPLITS:
        need = plan[split].quota - plan[split].progress(state, split)
        room = cfg.generate.batch_size - len(batch)
        batch += itertools.islice(candidates[split], max(0, min(need, room)))
    return batch


def judge(
    completion_text: str, inst: dict[str, Any], task: Task, dedup: ExampleDeduplicator
) -> tuple[str, list[str], str, int]:
    """(status, reasons, answer, think blocks) for one teacher answer."""
    from distill.teachers import strip_think

    answer, blocks, only_reasoning = strip_think(completion_text)
    if only_reasoning:
        return "rejected", ["only_reasoning"], answer, blocks
    if not answer:
        return "rejected", ["empty"], answer, blocks
    violations = task.check(answer, inst["payload"])
    if violations:
        return "rejected", sorted({v.check for v in violations}), answer, blocks
    if dedup.is_duplicate(inst["prompt"], answer):
        return "rejected", ["near_duplicate"], answer, blocks
    dedup.add(inst["prompt"], answer)
    return "accepted", [], answer, blocks


def _record(
    cfg: PipelineConfig,
    task: Task,
    dedup: ExampleDeduplicator,
    inst: dict[str, Any],
    completion: Any,
    batch: str,
    wall: float,
) -> dict[str, Any]:
    """One attempt as its shard line: the teacher's answer judged, and with `generate.logprobs` (accepted answers
    only) its distribution, in the same line so it is written and resumed with the record."""
    status, reasons, answer, blocks = judge(completion.text, inst, task, dedup)
    record = {
        "id": inst["id"],
        "split": inst["split"],
        "index": inst["index"],
        "status": status,
        "reasons": reasons,
        "group": inst["group"],
        "payload": inst["payload"],
        "prompt": inst["prompt"],
        "response": answer,
        "raw": completion.text if completion.text != answer else None,
        "think_blocks": blocks,
        "output_tokens": completion.output_tokens,
        "batch": batch,
        "batch_s": round(wall, 4),
    }
    top_k = cfg.generate.logprobs
    if top_k and status == "accepted":
        if completion.logprobs is None:
            raise DistillError(f"generate.logprobs: the {cfg.generate.backend} backend returned no log-probabilities")
        record["teacher"] = pack(completion.logprobs, top_k)
    return record


def _replica_rates(teacher: Any) -> str:
    rates = teacher.throughput()
    return " · replicas " + ", ".join(f"{r['examples_per_s']:g} ex/s {r['tokens_per_s']:.0f} tok/s" for r in rates)


def dedup_mode(cfg: PipelineConfig, task: Task) -> Dedup:
    """What the near-duplicate filter compares in this run: `generate.dedup`, or the task's own default."""
    mode = task.dedup if cfg.generate.dedup == "auto" else cfg.generate.dedup
    if mode == "answer" and not teacher_backend(cfg).language_model:
        return "none"  # a reference answer is right by definition, however many inputs share it
    return mode


def run_shard(cfg: PipelineConfig, task: Task, shard: Shard, plan: dict[str, Target], folder: Path) -> ShardState:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shard_dir = folder / "shards" / shard.name
    shard_dir.mkdir(parents=True, exist_ok=True)
    records_path = shard_dir / "records.jsonl"
    state = load_state(records_path)
    dedup = ExampleDeduplicator(dedup_mode(cfg, task), cfg.generate.dedup_jaccard)
    for record in state.accepted_records:
        dedup.add(record["prompt"], record["response"])
    if not has_work(plan, state):
        return state
    columns = (
        TextColumn("[bold]generate[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("accept {task.fields[rate]:.0%} · {task.fields[tps]:.0f} tok/s{task.fields[replicas]}"),
        TimeElapsedColumn(),
    )
    if cfg.generate.engine == "ray":
        from distill.teachers.ray_pool import RayTeachers

        teacher: Any = RayTeachers(cfg)
    else:
        teacher = make_teacher(cfg, task)
    constrained = cfg.generate.grammar
    try:
        requests = None
        if cfg.generate.self_instruct.enabled:
            from distill.selfinstruct import request_pool

            requests = request_pool(cfg, task, folder, teacher)
        candidates = {s: split_candidates(task, shard, s, state, plan[s], requests) for s in SPLITS}
        pending = next_batch(cfg, plan, state, candidates)
        tokens = 0
        started = time.perf_counter()
        with Progress(*columns, transient=False) as progress:
            total = sum(t.quota for t in plan.values())
            bar = progress.add_task(
                shard.name, total=total, completed=_progress(plan, state), rate=0.0, tps=0.0, replicas=""
            )
            while pending:
                batch_start = time.perf_counter()
                grammars = [task_grammar(task, inst["payload"]) for inst in pending] if constrained else None
                completions = teacher.generate(pending, grammars)
                wall = time.perf_counter() - batch_start
                batch_id = f"{shard.name}/{pending[0]['id']}"
                records = []
                for inst, completion in zip(pending, completions):
                    record = _record(cfg, task, dedup, inst, completion, batch_id, wall)
                    records.append(record)
                    state.done.add((inst["split"], inst["index"]))
                    state.attempts[inst["split"]] += 1
                    tokens += completion.output_tokens
                    if record["status"] == "accepted":
                        state.accepted[inst["split"]] += 1
                append_records(records_path, records)  # one fsync'd write per batch: kill -9 loses at most this one
                attempts = sum(state.attempts.values())
                replicas = _replica_rates(teacher) if cfg.generate.engine == "ray" else ""
                progress.update(
                    bar,
                    completed=_progress(plan, state),
                    rate=sum(state.accepted.values()) / max(attempts, 1),
                    tps=tokens / max(time.perf_counter() - started, 1e-9),
                    replicas=replicas,
                )
                pending = next_batch(cfg, plan, state, candidates)
        if cfg.generate.engine == "ray":
            atomic_write_json(shard_dir / "engine.json", {**teacher.cluster, "replicas": teacher.throughput()})
    finally:
        teacher.close()
    return load_state(records_path)


def _progress(plan: dict[str, Target], state: ShardState) -> int:
    return sum(t.progress(state, s) for s, t in plan.items())


def has_work(plan: dict[str, Target], state: ShardState) -> bool:
    """Some split still needs examples and has attempts left."""
    return any(t.progress(state, s) < t.quota and state.attempts[s] < t.budget for s, t in plan.items())


def shard_complete(plan: dict[str, Target], state: ShardState) -> bool:
    return all(t.progress(state, s) >= t.quota for s, t in plan.items())


def _shortfall_message(task: Task, shard: Shard, plan: dict[str, Target], state: ShardState) -> str:
    """Why a split came up short, and the setting that fixes it: the task's inputs ran out (fewer pass than are
    asked for), or the attempt budget did (the teacher's answers fail too often)."""
    reasons = Counter(r for _, rec in read_records(state.path) for r in rec["reasons"])
    top = ", ".join(f"{name} {count}" for name, count in reasons.most_common(3)) or "none"
    where = f" ({shard.name})" if shard.count > 1 else ""
    short = [s for s, t in plan.items() if t.progress(state, s) < t.quota]
    exhausted = [s for s in short if usable_inputs(task, s, plan[s].blocked, shard) == state.attempts[s]]
    if exhausted:
        parts = ", ".join(
            f"{s} {state.accepted[s]} of {plan[s].quota} asked for, every one of its {state.attempts[s]} usable "
            "inputs tried"
            for s in exhausted
        )
        fixes = " and ".join(f"{SPLIT_KEYS[s]}={state.accepted[s]}" for s in exhausted)
        return (
            f"generate{where}: task '{task.name}' has no more inputs ({parts}; rejected for: {top}); set {fixes}, or "
            "=all to take every input that passes, or add inputs; then re-run with --overwrite"
        )
    parts = ", ".join(f"{s} {state.accepted[s]}/{plan[s].quota}" for s in short)
    return (
        f"generate{where}: the teacher's answers ran out of attempts ({parts} accepted; top reject reasons: {top}); "
        "raise generate.max_attempts_factor, fix the teacher or its sampling, then re-run to continue"
    )


def _check_grammar(cfg: PipelineConfig, task: Task) -> None:
    """generate.grammar needs a pack with a grammar that compiles and a backend that decodes."""
    example = next((task.example(s, 0) for s in SPLITS if task.example(s, 0) is not None), None)
    if example is not None and first_grammar(task, example.payload, "generate.grammar") is None:
        raise DistillError(f"generate.grammar: task '{task.name}' has no output grammar; set generate.grammar=false")


def run(cfg: PipelineConfig, overwrite: bool = False, shard: str | None = None, merge_shards: bool = False) -> Path:
    folder = stage_dir(cfg, "generate")
    part = Shard.parse(shard)
    if merge_shards and shard is not None:
        raise DistillError("--merge-shards combines finished shards; run it without --shard")
    task = load_task(cfg)  # a broken task fails here, before anything on disk is touched
    if problems := size_problems(cfg, task, input_counts(cfg, task)):
        raise ConfigError(problems)
    check_backend(cfg)
    if cfg.generate.grammar:
        _check_grammar(cfg, task)
    if cfg.generate.engine == "ray":
        from distill.teachers.ray_pool import check_cluster

        check_cluster(cfg)
    if cfg.generate.self_instruct.enabled and task.self_instruct() is None:
        raise DistillError(
            f"generate.self_instruct.enabled: task '{task.name}' has no Self-Instruct templates; turn it off"
        )
    if cfg.generate.self_instruct.enabled and not teacher_backend(cfg).language_model:
        raise DistillError(
            "generate.self_instruct.enabled needs a language-model teacher; the reference backend cannot write requests"
        )
    if shard is not None and overwrite:
        shutil.rmtree(folder / "shards" / part.name, ignore_errors=True)
    record = open_stage(cfg, "generate", overwrite and shard is None and not merge_shards)
    if record is None:
        return folder
    if merge_shards:
        return merge(cfg, task, record)
    ensure_models(cfg)
    plan = targets(cfg, task, part)
    state = run_shard(cfg, task, part, plan, folder)
    if not shard_complete(plan, state):
        raise DistillError(_shortfall_message(task, part, plan, state))
    atomic_write_json(
        folder / "shards" / part.name / "done.json",
        {"accepted": dict(state.accepted), "attempts": dict(state.attempts)},
    )
    if part.count > 1:  # the manifest waits for --merge-shards
        log.info(
            "shard %s done; when all %d shards are, run `distill generate %s --merge-shards`",
            part.name,
            part.count,
            cfg.command_args,
        )
        return folder / "shards" / part.name
    return merge(cfg, task, record)


def merge(cfg: PipelineConfig, task: Task, record: StageRecord) -> Path:
    """Combine finished shards into the dataset, checking that nothing is missing or doubled."""
    folder = record.folder
    shard_dirs = sorted((folder / "shards").glob("shard-*-of-*")) if (folder / "shards").exists() else []
    counts = {int(d.name.rsplit("-", 1)[1]) for d in shard_dirs}
    if len(counts) != 1:
        found = ", ".join(d.name for d in shard_dirs) or "none"
        raise DistillError(f"{folder / 'shards'}: expected shards of one run split N ways, found: {found}")
    n = counts.pop()
    missing = [f"{i}/{n}" for i in range(n) if not (folder / "shards" / f"shard-{i}-of-{n}" / "done.json").is_file()]
    if missing:
        raise DistillError(
            f"generate: shards {', '.join(missing)} are not finished; run `distill generate {cfg.command_args} --shard I/{n}` for each"
        )
    accepted: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    rejected: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for shard_dir in shard_dirs:
        for _, rec in read_records(shard_dir / "records.jsonl"):
            if rec["id"] in seen:
                raise DistillError(
                    f"{rec['id']} appears in both {seen[rec['id']]} and {shard_dir.name}; re-run the shards with --overwrite"
                )
            seen[rec["id"]] = shard_dir.name
            (accepted[rec["split"]] if rec["status"] == "accepted" else rejected).append(rec)
    for split, total in requested(cfg).items():
        if total is not None and len(accepted[split]) != total:
            raise DistillError(
                f"generate: {split} has {len(accepted[split])} accepted examples, expected {total}; re-run the shards"
            )
    train_groups = {r["group"] for r in accepted["train"]}
    leaked = [r["id"] for s in ("validation", "test") for r in accepted[s] if r["group"] in train_groups]
    if leaked:
        raise DistillError(
            f"generate: held-out examples share a group with train ({leaked[0]}, ...); re-run with --overwrite"
        )

    saved = save_dataset(accepted, folder / "dataset", cfg.generate.logprobs)
    with (folder / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    stats = statistics(cfg, task, accepted, rejected, n)
    if cfg.generate.logprobs:
        stats["logprobs"] = distribution_size(saved, cfg.generate.logprobs)
    engines = [json.loads(p.read_text()) for d in shard_dirs if (p := d / "engine.json").is_file()]
    if engines:  # the cluster each shard ran on, and its replicas' throughput
        stats["cluster"] = engines
    atomic_write_json(folder / "stats.json", stats)
    print_stats(stats)
    record.metrics = stats
    record.files = {"dataset": "dataset", "rejected": "rejected.jsonl", "stats": "stats.json", "shards": "shards"}
    return record.finish()


def save_dataset(accepted: dict[str, list[dict[str, Any]]], target: Path, top_k: int = 0) -> Any:
    """One encoding of a row for every task; the payload is JSON text (its shape is the pack's business). With
    the teacher's distribution, three more columns: its tokens, and each one's top-k ids and log-probabilities."""
    from datasets import Dataset, DatasetDict, Features, List, Value, disable_progress_bars

    disable_progress_bars()
    columns = ("id", "index", "group", "payload", "prompt", "response")
    features = Features(
        {
            "id": Value("string"),
            "index": Value("int64"),
            "group": Value("string"),
            "payload": Value("string"),
            "prompt": Value("string"),
            "response": Value("string"),
            **(
                {
                    "teacher_tokens": List(Value("int32")),
                    "teacher_top_ids": List(List(Value("int32"))),
                    "teacher_top_logprobs": List(List(Value("float16"))),
                }
                if top_k
                else {}
            ),
        }
    )

    def rows(records: list[dict[str, Any]]) -> Dataset:
        records = sorted(records, key=lambda r: r["index"])
        out: dict[str, list[Any]] = {c: [] for c in features}
        for r in records:
            for c in columns:
                out[c].append(json.dumps(r[c], ensure_ascii=False) if c == "payload" else r[c])
            if top_k:
                for c, array in zip(COLUMNS, unpack(r["teacher"])):
                    out[c].append(array)
        return Dataset.from_dict(out, features=features)

    # an empty split is left out: `datasets` writes it but cannot read it back
    data = DatasetDict({split: rows(accepted[split]) for split in ("train", "validation", "test") if accepted[split]})
    with atomic_dir(target) as tmp:
        data.save_to_disk(str(tmp))
    return data


def distribution_size(data: Any, top_k: int) -> dict[str, Any]:
    """What the teacher's distribution costs on disk, per teacher token, as stored (Arrow, all splits)."""
    import pyarrow.compute as pc

    # counted in Arrow: reading the column out would build a Python list per example
    tokens = sum(pc.sum(pc.list_value_length(data[s].data.column("teacher_tokens"))).as_py() or 0 for s in data)
    size = sum(data[s].data.column(c).nbytes for s in data for c in COLUMNS)
    return {"k": top_k, "teacher_tokens": tokens, "bytes": size, "bytes_per_token": round(size / max(tokens, 1), 1)}


def _lengths(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": round(sum(ordered) / len(ordered), 1), "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1]}


def statistics(
    cfg: PipelineConfig,
    task: Task,
    accepted: dict[str, list[dict[str, Any]]],
    rejected: list[dict[str, Any]],
    shards: int,
) -> dict[str, Any]:
    everything = [r for recs in accepted.values() for r in recs] + rejected
    wall = sum({r["batch"]: r["batch_s"] for r in everything}.values())
    output_tokens = sum(r["output_tokens"] for r in everything)
    stats: dict[str, Any] = {
        "backend": cfg.generate.backend,
        "engine": cfg.generate.engine,
        "grammar": cfg.generate.grammar,
        "shards": shards,
        "counts": {split: len(recs) for split, recs in accepted.items()}
        | {"rejected": len(rejected), "attempts": len(everything)},
        "acceptance_rate": round(sum(len(v) for v in accepted.values()) / max(len(everything), 1), 4),
        "reject_reasons": dict(Counter(reason for r in rejected for reason in r["reasons"]).most_common()),
        "think_blocks_stripped": sum(r["think_blocks"] for r in everything),
        "teacher_output_tokens": output_tokens,
        "teacher_seconds": round(wall, 3),
        "output_tokens_per_s": round(output_tokens / wall, 1) if wall else None,
        "examples_per_s": round(len(everything) / wall, 2) if wall else None,
        "requested": {split: "all" if n is None else n for split, n in requested(cfg).items()},
        "dedup": dedup_mode(cfg, task),
    }
    counts = input_counts(cfg, task)
    if any(inputs is not None for inputs, _ in counts.values()):
        stats["inputs"] = {split: {"available": inputs, "usable": usable} for split, (inputs, usable) in counts.items()}
    if isinstance(task.shape, Labels):
        stats["class_balance"] = {
            split: dict(Counter(r["response"].strip() for r in accepted[split]).most_common()) for split in SPLIT_KEYS
        }
    stats.update(token_lengths(cfg, [r for recs in accepted.values() for r in recs]))
    return stats


def token_lengths(cfg: PipelineConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt (chat-formatted) and response (+ end of turn) lengths under the student's tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    except OSError as exc:
        log.warning("student tokenizer unavailable (%s); token statistics skipped", exc)
        return {"student_tokenizer": None}
    prompts, responses = [], []
    for r in records:
        chat = [{"role": "user", "content": r["prompt"]}]
        prompts.append(len(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]))
        responses.append(len(tokenizer(r["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]))
    return {
        "student_tokenizer": cfg.models.student,
        "prompt_tokens": _lengths(prompts),
        "response_tokens": _lengths(responses),
        "example_tokens": _lengths([p + r for p, r in zip(prompts, responses)]),
    }


def print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from distill.scoring import shares

    table = Table(title="generate", show_header=False)
    inputs = stats.get("inputs", {})
    for split, count in stats["counts"].items():
        usable = inputs.get(split, {}).get("usable")
        of = f" of {usable:,} usable inputs" if usable is not None else ""
        table.add_row(f"examples: {split}", f"{count:,}{of}")
    table.add_row("acceptance", f"{stats['acceptance_rate']:.1%}")
    for reason, count in stats["reject_reasons"].items():
        table.add_row(f"  rejected: {reason}", f"{count:,}")
    table.add_row("near-duplicates compared", DEDUP_WORDS[stats["dedup"]])
    for split, counts in stats.get("class_balance", {}).items():
        table.add_row(f"classes: {split}", shares(counts))
    table.add_row("think blocks stripped", str(stats["think_blocks_stripped"]))
    for key in ("prompt_tokens", "response_tokens"):
        if key in stats:
            t = stats[key]
            table.add_row(key.replace("_", " "), f"mean {t['mean']} · p50 {t['p50']} · p95 {t['p95']} · max {t['max']}")
    table.add_row("teacher output tokens/s", str(stats["output_tokens_per_s"]))
    table.add_row("teacher time", f"{stats['teacher_seconds']} s")
    Console(stderr=True).print(table)
