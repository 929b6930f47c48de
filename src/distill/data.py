"""What later stages read of the generate stage's output: the dataset's splits, and JSONL record files
(shards, generations) written one fsync'd batch at a time."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.artifacts import stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError

log = logging.getLogger(__name__)


def load_dataset(cfg: PipelineConfig) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))


def check_prompts(cfg: PipelineConfig, tokenizer: Any, count: int) -> list[list[int]]:
    """Chat-formatted validation prompts (held-out inputs), as token ids."""
    data = load_dataset(cfg)
    split = data["validation"] if "validation" in data and len(data["validation"]) else data["train"]
    prompts = [split[i]["prompt"] for i in range(min(count, len(split)))]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)[
            "input_ids"
        ]
        for p in prompts
    ]


def test_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The first `eval.num_prompts` held-out test rows."""
    dataset = load_dataset(cfg)
    if "test" not in dataset or len(dataset["test"]) == 0:
        raise DistillError(
            f"{stage_dir(cfg, 'generate')}: no held-out test examples; set generate.test_examples > 0 and run "
            f"`distill generate {cfg.command_args} --overwrite`"
        )
    split = dataset["test"]
    return [split[i] for i in range(min(cfg.eval.num_prompts, len(split)))]


def held_out_requests(cfg: PipelineConfig, count: int) -> list[dict[str, Any]]:
    """`count` test prompts (validation where there is no test split) with their payloads, repeated as needed."""
    dataset = load_dataset(cfg)
    split = dataset["test"] if "test" in dataset else dataset["validation"]
    rows = [split[i % len(split)] for i in range(count)]
    return [{"prompt": r["prompt"], "payload": json.loads(r["payload"])} for r in rows]


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records with their line numbers. A torn last line (a write cut by a crash) is cut off; any
    other unreadable line is an error naming file and line, and nothing is changed."""
    if not path.exists():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, 1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "id" not in record or "split" not in record:
                raise ValueError("not a record")
        except ValueError as exc:
            raise DistillError(
                f"{path}:{number}: corrupt record ({exc}); fix or delete that line, or re-run with --overwrite"
            ) from None
        yield number, record
    if tail:
        log.warning("%s: dropping an unfinished last line left by an interrupted run", path)
        with path.open("r+b") as fh:
            fh.truncate(len(data) - len(tail))


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """One fsync'd write: a crash loses at most these records, and a torn line is cut on the next read."""
    with path.open("a", encoding="utf-8") as out:
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out.flush()
        os.fsync(out.fileno())
