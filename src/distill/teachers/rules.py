"""The task's reference planner as a teacher: offline, deterministic, always valid."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.task import LoggedWorkout, Profile, load_catalog, plan_program, render_program
from distill.teachers import Completion


class RulesTeacher:
    name = "rules"

    def __init__(self, cfg: PipelineConfig):
        self.catalog = load_catalog(cfg.task.catalog)
        self.lang = cfg.task.language

    def generate(self, instances: list[dict[str, Any]]) -> list[Completion]:
        out = []
        for inst in instances:
            history = [LoggedWorkout.from_dict(w) for w in inst["history"]]
            program = plan_program(Profile.from_dict(inst["profile"]), history, self.catalog)
            text = render_program(program, self.lang)
            out.append(Completion(text, len(text.split())))
        return out

    def close(self) -> None:
        return None
