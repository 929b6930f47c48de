"""The task's own reference answers as the teacher: offline and deterministic (demos, CI, gold data)."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.tasks import Grammar, Task
from distill.teachers import Completion


class ReferenceTeacher:
    name = "reference"

    def __init__(self, cfg: PipelineConfig, task: Task):
        if task.reference_source is None:
            raise DistillError(
                f"generate.backend=reference: task '{task.name}' has no reference answers "
                "(for a jsonl task set task.reference_field); use a model teacher (vllm, openai, transformers)"
            )
        self.task = task

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        # make_teacher refuses generate.grammar for this backend: there is nothing to constrain
        return [Completion(inst["reference"], len(inst["reference"].split())) for inst in instances]

    def close(self) -> None:
        return None
