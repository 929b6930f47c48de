"""`distill run`: every stage in order, skipping complete ones and resuming partial ones, then REPORT.md."""

from __future__ import annotations

import logging
from pathlib import Path

from distill.artifacts import stage_status
from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.models import ensure_models
from distill.stages import STAGES, eval_stage

log = logging.getLogger(__name__)


def select_stages(start: str | None, until: str | None) -> tuple[str, ...]:
    order = tuple(STAGES)
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in STAGES:
            raise DistillError(f"{name} {value}: unknown stage; use one of {', '.join(order)}")
    first = order.index(start) if start else 0
    last = order.index(until) if until else len(order) - 1
    if first > last:
        raise DistillError(f"--from {start} comes after --until {until}; swap them")
    return order[first : last + 1]


def run_pipeline(cfg: PipelineConfig, start: str | None = None, until: str | None = None) -> Path:
    """Each selected stage in order; a complete one is skipped, a partial one resumes. Returns REPORT.md."""
    from distill.card import write_cards
    from distill.report import write_report
    from distill.variants import check_variants

    stages = select_stages(start, until)
    check_variants(cfg, cfg.eval.models)
    ensure_models(cfg)
    for name in stages:
        stage = STAGES[name]
        if not stage.enabled(cfg):
            continue
        if name == "eval":  # one output per model the config evaluates
            for model in cfg.eval.models:
                log.info("── eval %s (%s)", model, stage_status(cfg, eval_stage(model)))
                stage.run(cfg, model=model)
            continue
        log.info("── %s (%s)", name, stage_status(cfg, name))
        stage.run(cfg)
    write_cards(cfg)  # the last word on what the run's stages hold, also where every stage was complete already
    return write_report(cfg)
