"""Teacher backends: one interface, `generate(instances) -> completions`, chosen by `generate.backend`.

`BACKENDS` is the registry: each entry names the class that implements the interface and declares what the
backend can do, and the config's choices, the checks before any work and the Ray replicas read those
capabilities. A new backend is its module plus one entry here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from distill.errors import DistillError
from distill.kd import TokenLogprobs
from distill.tasks import Grammar

if TYPE_CHECKING:
    from distill.config import PipelineConfig

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


@dataclass(frozen=True)
class Backend:
    name: str
    implementation: str  # "module:Class", built with (cfg, task)
    language_model: bool  # a model writes the answers (not the pack's reference answers): it can write requests
    grammar: bool  # decodes under the task's grammar
    max_logprobs: int  # the most top log-probabilities per token it returns; 0: none
    local_model: bool  # loads the teacher's weights in this process, so a Ray replica sets torch's threads
    summary: str  # the config's description


NO_LIMIT = 1 << 20  # a backend that keeps as many top log-probabilities as asked (its engine is sized to k)
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "vllm",
            "distill.teachers.vllm_backend:VllmTeacher",
            language_model=True,
            grammar=True,
            max_logprobs=NO_LIMIT,
            local_model=True,
            summary="vLLM in process",
        ),
        Backend(
            "openai",
            "distill.teachers.openai_backend:OpenAITeacher",
            language_model=True,
            grammar=True,
            max_logprobs=20,  # the OpenAI API's `top_logprobs` limit, which compatible servers keep
            local_model=False,
            summary="an OpenAI-compatible endpoint",
        ),
        Backend(
            "transformers",
            "distill.teachers.transformers_backend:TransformersTeacher",
            language_model=True,
            grammar=True,
            max_logprobs=NO_LIMIT,
            local_model=True,
            summary="transformers in process",
        ),
        Backend(
            "reference",
            "distill.teachers.reference:ReferenceTeacher",
            language_model=False,
            grammar=False,
            max_logprobs=0,
            local_model=False,
            summary="the task's own reference answers (offline)",
        ),
    )
}


def teacher_backend(cfg: PipelineConfig) -> Backend:
    return BACKENDS[cfg.generate.backend]


def check_backend(cfg: PipelineConfig) -> None:
    """Settings the chosen backend cannot honour; checked before anything is written."""
    g, backend = cfg.generate, teacher_backend(cfg)
    if g.grammar and not backend.grammar:
        raise DistillError(
            f"generate.grammar: the {backend.name} backend ({backend.summary}) decodes nothing to constrain; "
            "set generate.grammar=false or pick a language-model backend"
        )
    if g.logprobs > backend.max_logprobs:
        if backend.max_logprobs == 0:
            raise DistillError(
                f"generate.logprobs: the {backend.name} backend ({backend.summary}) has no distribution to keep; "
                "set generate.logprobs=0 or pick a language-model backend"
            )
        raise DistillError(
            f"generate.logprobs={g.logprobs}: the {backend.name} backend ({backend.summary}) returns at most "
            f"{backend.max_logprobs} top log-probabilities per token; set generate.logprobs={backend.max_logprobs} "
            "or lower"
        )


def make_teacher(cfg: PipelineConfig, task: Any) -> Teacher:
    from distill.stages import resolve

    check_backend(cfg)
    return resolve(teacher_backend(cfg).implementation)(cfg, task)


def local_model_dir(name: str, key: str) -> str:
    """A teacher given as a folder must exist; a hub id is passed through for machines with hub access."""
    from pathlib import Path

    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        raise DistillError(f"{key}: model folder {name} not found (no config.json); build or download it first")
    return name
