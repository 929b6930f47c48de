"""The stage registry: which stages exist, in pipeline order, what each reads and produces.

The pipeline, config fingerprints, the CLI's help, eval's model list and the report all read this table;
adding a stage is one entry here plus its module `distill/stages/<name>.py` with `run(cfg, overwrite, ...)`.
Nothing here imports a stage module or torch, so `distill --help` stays instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line: the CLI's help and the report's wording
    sections: tuple[str, ...]  # config sections its output depends on, upstream included: a change makes it stale
    inputs: Callable[[PipelineConfig], tuple[str, ...]]  # upstream stages whose complete output it reads
    produces: str  # what its folder holds, for the command's help
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    models: dict[str, str] = field(default_factory=dict)  # models `distill eval --model` can load once it is done

    @property
    def help(self) -> str:
        return f"{self.summary} Writes {self.produces}."

    def run(self, cfg: PipelineConfig, **options: Any) -> Path:
        return importlib.import_module(f"distill.stages.{self.name}").run(cfg, **options)


def _exported_from(cfg: PipelineConfig) -> tuple[str, ...]:
    """The compact variant exports the pruned model, the LoRA pipeline the merged one."""
    return ("prune",) if cfg.prune.enabled else ("merge",)


def _served_from(cfg: PipelineConfig) -> tuple[str, ...]:
    """llama.cpp serves the GGUF, vLLM the merged folder; both send held-out prompts."""
    return ("export" if cfg.serve.backend == "llama_cpp" else "merge", "generate")


_UPSTREAM = ("generate", "train", "merge", "prune", "export")
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "generate",
            "The teacher writes the training data: accepted/rejected examples, splits, statistics.",
            _UPSTREAM[:1],
            lambda cfg: (),
            "dataset/ (train, validation, test), shards/*/records.jsonl, rejected.jsonl",
            models={"teacher": "teacher (held-out responses)", "base": "student before training"},
        ),
        Stage(
            "train",
            "Label-masked SFT or KD of the student (LoRA + 8-bit AdamW by default); resumes from checkpoints.",
            _UPSTREAM[:2],
            lambda cfg: ("generate",),
            "adapter/ (LoRA) or model/ (full), log.jsonl, loss.png, checkpoints/",
            models={"adapter": "student + LoRA adapter"},
        ),
        Stage(
            "merge",
            "Fold the LoRA adapter into the base model; checks the logits are unchanged.",
            _UPSTREAM[:3],
            lambda cfg: ("train",),
            "model/ (safetensors + tokenizer)",
            models={"merged": "merged student"},
        ),
        Stage(
            "prune",
            "Compact variant: L1-prune every Linear/Conv1D weight of the merged model; sparsity per layer.",
            _UPSTREAM[:4],
            lambda cfg: ("merge",),
            "model/ (pruned safetensors + tokenizer)",
            enabled=lambda cfg: cfg.prune.enabled,
            models={"pruned": "pruned student"},
        ),
        Stage(
            "export",
            "Write the merged model as GGUF (Q8_0 by default) and verify it in llama.cpp.",
            _UPSTREAM,
            _exported_from,
            "<run>-<format>.gguf, int8/ with export.torch_int8",
            models={"gguf": "GGUF in llama.cpp", "int8": "torch dynamic int8"},
        ),
        Stage(
            "serve",
            "Plan the paper's n processes and one server with N slots on the same GPU budget, then measure "
            "both under the same swept load (latency percentiles, goodput within serve.slo_ms, capacity, memory).",
            (*_UPSTREAM, "serve"),
            _served_from,
            "report.{json,md}, launch script and Modelfile of the winning fleet, logs/",
        ),
        Stage(
            "eval",
            "Score one model's answers to held-out test inputs: validity, violations, agreement, perplexity, latency.",
            (*_UPSTREAM, "eval"),
            lambda cfg: ("generate",),
            "<model>/ generations and summary per model, comparison.{md,png}",
        ),
    )
}
# Every model `distill eval` scores -> the stage that makes it, in table order.
MODELS: dict[str, str] = {model: stage.name for stage in STAGES.values() for model in stage.models}
MODEL_DESCRIPTIONS: dict[str, str] = {model: text for stage in STAGES.values() for model, text in stage.models.items()}


def eval_stage(model: str) -> str:
    """Each evaluated model has its own output folder and manifest, `eval/<model>`."""
    return f"eval/{model}"


def sections(stage: str) -> tuple[str, ...]:
    """Config sections an output depends on; `eval/<model>` on the stage that made the model, and eval."""
    if stage.startswith("eval/"):
        return (*STAGES[MODELS[stage.removeprefix("eval/")]].sections, "eval")
    return STAGES[stage].sections


def inputs(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    """Upstream stages that must be complete before `stage` runs."""
    if stage.startswith("eval/"):
        return tuple(dict.fromkeys(("generate", MODELS[stage.removeprefix("eval/")])))
    return STAGES[stage].inputs(cfg)
