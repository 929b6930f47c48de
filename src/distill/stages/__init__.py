"""The stage registry: which stages exist, in pipeline order, and everything that is a stage's own.

An entry names the stage's config section model (`PipelineConfig` gets one section per stage, in this order),
its metrics model (what its manifest's metrics may hold), its command's options and help, what it reads and
produces, and how `--dry-run` previews it. The CLI's stage commands, the config, config fingerprints, manifest
checks, the pipeline and the report's order all derive from this table; the models a stage makes for
`distill eval` are `distill.variants`. Adding a stage is one entry here plus its module
`distill/stages/<name>.py` with `run(cfg, overwrite, **options)`. Its config and metrics models may live there
too; a config model's module is imported while `distill.config` builds `PipelineConfig`, so it imports what
needs the config inside its functions.
Models and functions are named as "module:attribute" and imported when used, so `distill --help` stays instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.variants import VARIANTS

if TYPE_CHECKING:
    from distill.config import PipelineConfig


def resolve(reference: str) -> Any:
    """The attribute a "module:attribute" reference names."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Option:
    """One option of a stage's command, passed to its `run` as the keyword `name`."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str | None = None  # default: --<name with dashes>


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line: the CLI's help and the report's wording
    sections: tuple[str, ...]  # config sections its output depends on, upstream included: a change makes it stale
    inputs: Callable[[PipelineConfig], tuple[str, ...]]  # upstream stages whose complete output it reads
    produces: str  # what its folder holds, for the command's help
    config: str  # "module:Class" of its config section, `cfg.<name>`
    metrics: str  # "module:Class" (a distill.metrics.Metrics) of its manifest's metrics
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    options: tuple[Option, ...] = ()
    # "module:function" (cfg) -> (title, data, rows): what `--dry-run` prints as a table, or data with --json
    preview: str | None = None
    module: str | None = None  # where its `run` is; default distill.stages.<name>

    @property
    def help(self) -> str:
        return f"{self.summary} Writes {self.produces}."

    def run(self, cfg: PipelineConfig, **options: Any) -> Path:
        return importlib.import_module(self.module or f"distill.stages.{self.name}").run(cfg, **options)


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
            config="distill.config:GenerateConfig",
            metrics="distill.metrics:GenerateMetrics",
            options=(
                Option("shard", str | None, None, "Do only part I of N of the work, e.g. 0/4 (one job each)."),
                Option("merge_shards", bool, False, "Combine finished shards into the dataset."),
            ),
        ),
        Stage(
            "train",
            "Label-masked SFT or KD of the student (LoRA + 8-bit AdamW by default); resumes from checkpoints.",
            _UPSTREAM[:2],
            lambda cfg: ("generate",),
            "adapter/ (LoRA) or model/ (full), log.jsonl, loss.png, checkpoints/",
            config="distill.config:TrainConfig",
            metrics="distill.metrics:TrainMetrics",
            preview="distill.plan:preview",
        ),
        Stage(
            "merge",
            "Fold the LoRA adapter into the base model; checks the logits are unchanged.",
            _UPSTREAM[:3],
            lambda cfg: ("train",),
            "model/ (safetensors + tokenizer)",
            config="distill.config:MergeConfig",
            metrics="distill.metrics:MergeMetrics",
        ),
        Stage(
            "prune",
            "Compact variant: L1-prune every Linear/Conv1D weight of the merged model; sparsity per layer.",
            _UPSTREAM[:4],
            lambda cfg: ("merge",),
            "model/ (pruned safetensors + tokenizer)",
            enabled=lambda cfg: cfg.prune.enabled,
            config="distill.config:PruneConfig",
            metrics="distill.metrics:PruneMetrics",
        ),
        Stage(
            "export",
            "Write the merged model as GGUF (Q8_0 by default) and verify it in llama.cpp.",
            _UPSTREAM,
            _exported_from,
            "<run>-<format>.gguf, int8/ with export.torch_int8",
            config="distill.config:ExportConfig",
            metrics="distill.metrics:ExportMetrics",
        ),
        Stage(
            "serve",
            "Plan the paper's n processes and one server with N slots on the same GPU budget, then measure "
            "both under the same swept load (latency percentiles, goodput within serve.slo_ms, capacity, memory).",
            (*_UPSTREAM, "serve"),
            _served_from,
            "report.{json,md}, launch script and Modelfile of the winning fleet, logs/",
            config="distill.config:ServeConfig",
            metrics="distill.metrics:ServeMetrics",
            preview="distill.serving.memory:preview",
        ),
        Stage(
            "eval",
            "Score one model's answers to held-out test inputs: validity, violations, agreement, perplexity, latency.",
            (*_UPSTREAM, "eval"),
            lambda cfg: ("generate",),
            "<model>/ generations and summary per model, comparison.{md,png}",
            config="distill.config:EvalConfig",
            metrics="distill.metrics:EvalMetrics",
            options=(Option("model", str, "merged", "One of: " + ", ".join(VARIANTS) + "."),),
        ),
    )
}


def eval_stage(model: str) -> str:
    """Each evaluated model has its own output folder and manifest, `eval/<model>`."""
    return f"eval/{model}"


def sections(stage: str) -> tuple[str, ...]:
    """Config sections an output depends on; `eval/<model>` on the stage that made the model, and eval."""
    if stage.startswith("eval/"):
        return (*STAGES[VARIANTS[stage.removeprefix("eval/")].stage].sections, "eval")
    return STAGES[stage].sections


def inputs(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    """Upstream stages that must be complete before `stage` runs."""
    if stage.startswith("eval/"):
        return tuple(dict.fromkeys(("generate", VARIANTS[stage.removeprefix("eval/")].stage)))
    return STAGES[stage].inputs(cfg)
