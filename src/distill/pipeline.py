"""`distill run`: every stage in order, skipping complete ones and resuming partial ones, then REPORT.md."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from distill.artifacts import stage_status
from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.models import ensure_models

log = logging.getLogger(__name__)

PIPELINE = ("generate", "train", "merge", "prune", "export", "serve", "eval")


def select_stages(start: str | None, until: str | None) -> tuple[str, ...]:
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in PIPELINE:
            raise DistillError(f"{name} {value}: unknown stage; use one of {', '.join(PIPELINE)}")
    first = PIPELINE.index(start) if start else 0
    last = PIPELINE.index(until) if until else len(PIPELINE) - 1
    if first > last:
        raise DistillError(f"--from {start} comes after --until {until}; swap them")
    return PIPELINE[first : last + 1]


def enabled(cfg: PipelineConfig, stage: str) -> bool:
    """Pruning belongs to the compact variant only."""
    return stage != "prune" or cfg.prune.enabled


def run_pipeline(cfg: PipelineConfig, start: str | None = None, until: str | None = None) -> Path:
    """Each selected stage in order; a complete one is skipped, a partial one resumes. Returns REPORT.md."""
    from distill.report import write_report
    from distill.stages.eval import check_eval_models, eval_stage
    from distill.stages.eval import run as evaluate

    stages = select_stages(start, until)
    check_eval_models(cfg)
    ensure_models(cfg)
    for stage in stages:
        if not enabled(cfg, stage):
            continue
        if stage == "eval":
            for model in cfg.eval.models:
                log.info("── eval %s (%s)", model, stage_status(cfg, eval_stage(model)))
                evaluate(cfg, model=model)
            continue
        log.info("── %s (%s)", stage, stage_status(cfg, stage))
        importlib.import_module(f"distill.stages.{stage}").run(cfg)
    return write_report(cfg)
