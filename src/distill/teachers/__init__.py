"""Teacher backends: one interface, `generate(instances) -> completions`, chosen by `generate.backend`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.kd import TokenLogprobs
from distill.tasks import Grammar

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclass(frozen=True)
class Completion:
    text: str
    output_tokens: int
    logprobs: TokenLogprobs | None = None  # with generate.logprobs: every generated token's top-k


class Teacher(Protocol):
    name: str

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        """One completion per instance (its `prompt` is the user turn), in order; with `grammars`, instance
        i's answer is decoded under grammars[i]; with generate.logprobs, each carries its tokens' top-k."""
        ...

    def close(self) -> None: ...


def strip_think(text: str) -> tuple[str, int, bool]:
    """(answer without think blocks, blocks removed, whether only reasoning was there).

    Qwen3 may think even when asked not to, and an empty think block is always inserted; an answer
    cut off inside a think block has no program at all."""
    blocks = len(_THINK.findall(text))
    answer = _THINK.sub("", text)
    if "<think>" in answer:
        return "", blocks + 1, True
    answer = answer.replace("</think>", "").strip()
    return answer, blocks, blocks > 0 and not answer


def check_backend(cfg: PipelineConfig) -> None:
    """Settings the chosen backend cannot honour; checked before anything is written."""
    g = cfg.generate
    if g.backend == "reference" and g.grammar:
        raise DistillError(
            "generate.grammar: the reference backend writes the pack's reference answers and decodes nothing to "
            "constrain; set generate.grammar=false or pick a language-model backend"
        )
    if g.backend == "reference" and g.logprobs:
        raise DistillError(
            "generate.logprobs: the reference backend writes the pack's reference answers and has no distribution to "
            "keep; set generate.logprobs=0 or pick a language-model backend"
        )
    if g.backend == "openai" and g.logprobs > 20:
        raise DistillError(
            f"generate.logprobs={g.logprobs}: OpenAI-compatible endpoints return at most 20 top log-probabilities "
            "per token; set generate.logprobs=20 or lower"
        )


def make_teacher(cfg: PipelineConfig, task: Any) -> Teacher:
    backend = cfg.generate.backend
    check_backend(cfg)
    if backend == "reference":
        from distill.teachers.reference import ReferenceTeacher

        return ReferenceTeacher(task)
    if backend == "vllm":
        from distill.teachers.vllm_backend import VllmTeacher

        return VllmTeacher(cfg)
    if backend == "openai":
        from distill.teachers.openai_backend import OpenAITeacher

        return OpenAITeacher(cfg)
    if backend == "transformers":
        from distill.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(cfg)
    raise DistillError(f"generate.backend: unknown backend {backend!r}; use vllm, openai, transformers or reference")


def local_model_dir(name: str, key: str) -> str:
    """A teacher given as a folder must exist; a hub id is passed through for machines with hub access."""
    from pathlib import Path

    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        raise DistillError(f"{key}: model folder {name} not found (no config.json); build or download it first")
    return name
