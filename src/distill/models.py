"""Where the pipeline's models come from: local folders, built on demand when `models.tiny` is set."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from distill.config import PipelineConfig, TinyModelsConfig
from distill.tasks import Task, load_task

log = logging.getLogger(__name__)


def build_tiny(out_dir: Path, spec: TinyModelsConfig, task: Task) -> dict[str, Path]:
    """Tiny teacher + student in `out_dir`, tokenizers trained on the task's own text."""
    from distill.tiny import build_tiny_models

    return build_tiny_models(Path(out_dir), task.corpus(spec.corpus_size, spec.seed), spec)


def ensure_models(cfg: PipelineConfig) -> None:
    """Build the tiny teacher/student into their configured folders if `models.tiny` asks for it."""
    from distill.tiny import SPEC_FILE, spec_json

    spec = cfg.models.tiny
    targets = {"teacher": Path(cfg.models.teacher), "student": Path(cfg.models.student)}
    if spec is None:
        return
    task = load_task(cfg)
    wanted = spec_json(spec, task.corpus(spec.corpus_size, spec.seed))
    if all((p / "config.json").is_file() and _read(p / SPEC_FILE) == wanted for p in targets.values()):
        return
    log.info("building tiny models (seed %d) into %s", spec.seed, ", ".join(map(str, targets.values())))
    with tempfile.TemporaryDirectory(prefix="distill-tiny-") as tmp:
        built = build_tiny(Path(tmp), spec, task)
        for role, target in targets.items():
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built[role]), target)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
