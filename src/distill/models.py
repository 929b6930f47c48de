"""Where the exported and served models of a run are, how big a model is; the tiny teacher/student built on
demand (`models.tiny`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from distill.artifacts import require_input, stage_dir
from distill.config import PipelineConfig, TinyModelsConfig
from distill.errors import DistillError
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


def weights_bytes(path: Path) -> int:
    """Bytes on disk of a model: the file itself (GGUF), or a folder's safetensors."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def exported(cfg: PipelineConfig, kind: str) -> Path:
    """The export stage's `gguf` file or `int8` folder, as its manifest names it."""
    manifest = require_input(cfg, "export")
    name = manifest.get("files", {}).get(kind)
    path = stage_dir(cfg, "export") / name if name else None
    if path is None or not path.exists():
        what, fix = ("GGUF file", "export.format=q8_0") if kind == "gguf" else ("int8 model", "--overwrite")
        raise DistillError(f"{stage_dir(cfg, 'export')}: no {what}; run `distill export {cfg.command_args} {fix}`")
    return path


def served_model(cfg: PipelineConfig) -> Path:
    """What the servers load: the GGUF for llama.cpp, the merged folder for vLLM."""
    from distill.serving.memory import check_backend

    check_backend(cfg)
    if cfg.serve.backend == "llama_cpp":
        return exported(cfg, "gguf")
    require_input(cfg, "merge")
    return stage_dir(cfg, "merge") / "model"
