"""The task interface: everything a stage may know about a task, and the registry that picks a pack.

A pack makes the i-th input of a split (`Example`), checks an answer against that input's payload
(named violations, weighted into a quality score), and may compare an answer with the teacher's,
give reference answers, feed the tiny models' tokenizer corpus, bootstrap Self-Instruct requests and
give each input an output grammar (what a valid answer may look like) for constrained decoding. It says
what near-duplicate filtering compares for it by default (`dedup`), and what shape its answers have
(`shape`: one of fixed labels, or a JSON record) with each input's gold answer (`gold`), from which eval
scores classification and extraction as such (accuracy, per-class and per-field F1, confusion matrix).
Stages, teachers, the CLI and the report reach a task only through `load_task(cfg)`; nothing outside
a pack knows its domain.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from distill.errors import DistillError

SPLITS = ("train", "validation", "test")
# What generate's near-duplicate filter compares: the teacher's answers, the inputs (prompts), both together
# (an example repeated: its input and its answer each near-duplicates of one accepted example's), or nothing.
Dedup = Literal["answer", "input", "both", "none"]


class TaskError(DistillError):
    """Unreadable task input or a broken pack; the message names the file/line or key and the fix."""


@dataclass(frozen=True)
class Example:
    """One input of a split, exactly as teacher and student see it."""

    id: str  # stable across runs
    prompt: str
    group: str  # held-out isolation: no group is in two splits
    payload: dict[str, Any]  # what the checks need (JSON-serialisable)
    reference: str | None = None  # a known-good answer, where the pack has one


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str


@dataclass(frozen=True)
class Grammar:
    """What a valid answer to one input may look like, as llama.cpp GBNF (xgrammar and vLLM read it too)."""

    gbnf: str
    json_schema: dict[str, Any] | None = None  # the JSON Schema it came from: what `response_format` carries


@dataclass(frozen=True)
class Labels:
    """Every answer is exactly one of these labels (classification): eval reports accuracy against the gold
    label, per-class precision, recall and F1, macro-F1 and a confusion matrix; generate, each split's balance."""

    classes: tuple[str, ...]


@dataclass(frozen=True)
class Records:
    """Every answer is a JSON object with these top-level fields (extraction): eval reports exact record match,
    and per field the accuracy and the F1 of its presence with the gold value (an absent or null field counts
    as no value, so a field the answer adds or drops where the gold has none or one shows in precision or recall)."""

    fields: tuple[str, ...]


@dataclass(frozen=True)
class SelfInstruct:
    """How a pack bootstraps free-form requests: the ask (with `{examples}`), and where a request goes."""

    ask: str
    seeds: Path
    with_request: Callable[[str, str], str]  # (prompt, request) -> prompt carrying the request


class Task(Protocol):
    name: str  # shown in reports, e.g. "crew"
    unit: str  # what one answer is called in reports: "program", "answer"
    weights: Mapping[str, float]  # every check this task can report, and its cost in the quality score
    agreement_titles: Mapping[str, str]  # agreement metric -> column title (empty: none)
    reference_source: str | None  # who writes reference answers, in words; None: the pack has none
    grammar_leaves: Mapping[str, str]  # check -> why its grammar cannot enforce it (left to the checks)
    # generate.dedup's default: "answer" where answers to different inputs should differ (a generative task),
    # "both" where different inputs may share their correct answer (a label, a record)
    dedup: Dedup
    shape: Labels | Records | None  # the answers' shape, where eval can score them as such against gold

    def size(self, split: str) -> int | None:
        """How many inputs the split has; None when the pack makes as many as asked."""
        ...

    def example(self, split: str, index: int) -> Example | None:
        """The index-th input of a split; None past its end."""
        ...

    def check(self, answer: str, payload: dict[str, Any]) -> list[Violation]: ...

    def agreement(self, answer: str, reference: str, payload: dict[str, Any]) -> dict[str, float]:
        """Metrics in [0, 1] named in `agreement_titles`: how the answer agrees with the reference one."""
        ...

    def corpus(self, n: int, seed: int) -> list[str]:
        """Task text (prompts and answers) for training the tiny models' tokenizers."""
        ...

    def self_instruct(self) -> SelfInstruct | None: ...

    def grammar(self, payload: dict[str, Any]) -> Grammar | None:
        """The output grammar for this input; None when the pack has none (then for every input)."""
        ...

    def gold(self, payload: dict[str, Any]) -> str | None:
        """This input's gold answer, where the pack has one (what `shape`'s metrics are measured against)."""
        ...


class TaskBase:
    """Defaults for every part of `Task` but `name`, `weights`, `example` and `check`; a pack (or your own python
    task) overrides what it has."""

    unit = "answer"
    agreement_titles: Mapping[str, str] = {}
    reference_source: str | None = None
    grammar_leaves: Mapping[str, str] = {}
    dedup: Dedup = "answer"
    shape: Labels | Records | None = None

    def size(self, split: str) -> int | None:
        return None

    def agreement(self, answer: str, reference: str, payload: dict[str, Any]) -> dict[str, float]:
        return {}

    def corpus(self, n: int, seed: int) -> list[str]:
        texts = []
        for index in range(n):
            example = self.example("train", index)  # type: ignore[attr-defined]
            if example is None:
                break
            texts += [example.prompt, *([example.reference] if example.reference else [])]
        return texts

    def self_instruct(self) -> SelfInstruct | None:
        return None

    def grammar(self, payload: dict[str, Any]) -> Grammar | None:
        return None

    def gold(self, payload: dict[str, Any]) -> str | None:
        return None


def interface() -> tuple[str, ...]:
    """Every attribute and method of the task interface, as `Task` states it: what a pack must have."""
    methods = [name for name, value in vars(Task).items() if callable(value) and not name.startswith("_")]
    return (*Task.__annotations__, *methods)


def quality_score(violations: list[Violation], weights: Mapping[str, float]) -> float:
    """1 for a valid answer; each distinct violated check costs its weight (floored at 0)."""
    checks = {v.check for v in violations}
    if unknown := checks - weights.keys():
        raise TaskError(
            f"the task reported checks without a weight ({', '.join(sorted(unknown))}); give every check one"
        )
    # sorted: a set's order changes with the hash seed, and with it the float sum's last bit
    return max(0.0, 1.0 - sum(weights[c] for c in sorted(checks)))


# task.kind -> "module:factory"; each factory takes (task config, seed).
PACKS = {
    "crew": "distill.tasks.crew.pack:CrewTask",
    "jsonl": "distill.tasks.jsonl:JsonlTask",
    "python": "distill.tasks.python:load_python_task",
}


def load_task(cfg: Any) -> Task:
    """The pack `cfg.task.kind` names, built from `cfg.task` and the run's seed."""
    return _build(cfg.task, cfg.seed)


def default_task(seed: int = 0) -> Task:
    """The task of a config without a `task` section: the crew pack with its defaults."""
    from distill.config import CrewTaskConfig

    return _build(CrewTaskConfig(), seed)


def _build(task_cfg: Any, seed: int) -> Task:
    module, _, factory = PACKS[task_cfg.kind].partition(":")
    return getattr(importlib.import_module(module), factory)(task_cfg, seed)
