"""The model variants of a run: every model `distill eval` can score, one entry each.

An entry says which stage makes the variant, how tables and cards name it, where it lives, how eval loads it
(one of `distill.runtimes.LOADERS`) and when a config never makes it. Eval, the comparison, the model card,
model sizes and `eval.models` all read this table: a new variant loaded like an existing one is one entry here.
Nothing here imports torch or a stage module, so the config and `distill --help` stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.config import PipelineConfig


def _stage_folder(stage: str, name: str) -> Callable[[PipelineConfig], Path]:
    def folder(cfg: PipelineConfig) -> Path:
        from distill.artifacts import stage_dir

        return stage_dir(cfg, stage) / name

    return folder


def _exported(kind: str) -> Callable[[PipelineConfig], Path]:
    def path(cfg: PipelineConfig) -> Path:
        from distill.models import exported

        return exported(cfg, kind)

    return path


@dataclass(frozen=True)
class Variant:
    name: str
    stage: str  # the stage that makes it: eval/<name> needs that stage complete
    description: str  # how the comparison, the report and the model card name it
    # How eval answers with it: a loader of `distill.runtimes.LOADERS`; "answers" = the stored answers are its own.
    runtime: str
    location: Callable[[PipelineConfig], Path] | None  # what it is loaded from; None: nothing on disk to load
    tokenizer_from: str | None = None  # a variant whose folder holds the tokenizer, where this one's has none
    # Why this config never makes it, with the fix; None where it does.
    missing: Callable[[PipelineConfig], str | None] = lambda cfg: None

    def tokenizer_folder(self, cfg: PipelineConfig) -> Path:
        source = VARIANTS[self.tokenizer_from] if self.tokenizer_from else self
        assert source.location is not None, f"variant {self.name} has no tokenizer folder"
        return source.location(cfg)

    def size(self, cfg: PipelineConfig) -> int | None:
        """Bytes on disk of what it is loaded from; None for the teacher, whose answers are data."""
        from distill.models import weights_bytes

        return weights_bytes(self.location(cfg)) if self.location is not None else None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("teacher", "generate", "teacher (held-out responses)", "answers", None),
        Variant("base", "generate", "student before training", "transformers", lambda cfg: Path(cfg.models.student)),
        Variant(
            "adapter",
            "train",
            "student + LoRA adapter",
            "peft",
            _stage_folder("train", "adapter"),
            missing=lambda cfg: (
                None
                if cfg.train.method == "lora"
                else f"train.method is {cfg.train.method}, so there is no adapter; use 'merged'"
            ),
        ),
        Variant("merged", "merge", "merged student", "transformers", _stage_folder("merge", "model")),
        Variant(
            "pruned",
            "prune",
            "pruned student",
            "transformers",
            _stage_folder("prune", "model"),
            missing=lambda cfg: (
                None
                if cfg.prune.enabled
                else "pruning is off; set prune.enabled=true or drop 'pruned' from eval.models"
            ),
        ),
        Variant("gguf", "export", "GGUF in llama.cpp", "llama_cpp", _exported("gguf"), tokenizer_from="merged"),
        Variant(
            "int8",
            "export",
            "torch dynamic int8",
            "int8",
            _exported("int8"),
            tokenizer_from="merged",
            missing=lambda cfg: (
                None
                if cfg.export.torch_int8
                else "no int8 export; set export.torch_int8=true or drop 'int8' from eval.models"
            ),
        ),
    )
}


def variant(name: str) -> Variant:
    from distill.errors import DistillError

    if name not in VARIANTS:
        raise DistillError(f"eval --model {name}: unknown model; use one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def of_stage(stage: str) -> list[Variant]:
    """The variants a stage makes, in table order."""
    return [v for v in VARIANTS.values() if v.stage == stage]


def check_variants(cfg: PipelineConfig, names: list[str]) -> None:
    """Refuse, before any work, a model this config never produces."""
    from distill.errors import DistillError

    for name in names:
        if problem := variant(name).missing(cfg):
            raise DistillError(f"eval model '{name}': {problem}")
