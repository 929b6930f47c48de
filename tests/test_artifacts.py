import json
from pathlib import Path

import pytest
from conftest import write_config

from distill.artifacts import (
    StageRecord,
    atomic_write_json,
    is_complete,
    prepare_output,
    read_manifest,
    require_input,
    stage_status,
)
from distill.config import load_config
from distill.errors import DistillError, StageInputError


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(write_config(tmp_path, name="c.yaml"))


def test_missing_input_names_file_and_command(cfg) -> None:
    with pytest.raises(StageInputError) as info:
        require_input(cfg, "generate")
    msg = str(info.value)
    assert "runs/t/generate/manifest.json not found" in msg
    assert "distill generate" in msg and "c.yaml" in msg


def test_stage_lifecycle(cfg) -> None:
    assert stage_status(cfg, "generate") == "missing"
    assert prepare_output(cfg, "generate", overwrite=False) == "fresh"
    assert stage_status(cfg, "generate") == "partial"
    with pytest.raises(StageInputError, match="incomplete"):
        require_input(cfg, "generate")
    assert prepare_output(cfg, "generate", overwrite=False) == "resume"

    record = StageRecord(cfg, "generate")
    record.metrics["acceptance_rate"] = 0.75
    folder = record.finish()
    manifest = read_manifest(folder)
    assert manifest["complete"] is True and manifest["metrics"] == {"acceptance_rate": 0.75}
    assert manifest["packages"]["pydantic"]
    assert manifest["config"]["run_name"] == "t"
    assert is_complete(cfg, "generate")
    assert prepare_output(cfg, "generate", overwrite=False) == "skip"

    # train records the hash of the manifest it consumed
    prepare_output(cfg, "train", overwrite=False)
    train = StageRecord(cfg, "train")
    assert len(train.inputs["generate"]["manifest_sha256"]) == 64


def test_changed_config_makes_stage_stale(cfg, tmp_path: Path) -> None:
    prepare_output(cfg, "generate", overwrite=False)
    StageRecord(cfg, "generate").finish()
    changed = load_config(cfg._source, ["generate.num_examples=7"])
    assert stage_status(changed, "generate") == "stale"
    with pytest.raises(DistillError, match="--overwrite"):
        prepare_output(changed, "generate", overwrite=False)
    with pytest.raises(StageInputError, match="different config"):
        require_input(changed, "generate")
    assert prepare_output(changed, "generate", overwrite=True) == "fresh"
    assert not (tmp_path / "runs/t/generate/manifest.json").exists()


def test_atomic_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object.__new__(type("X", (), {"__str__": None}))})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_corrupt_manifest_is_a_clear_error(cfg) -> None:
    folder = cfg.run_path / "generate"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DistillError, match="unreadable manifest"):
        stage_status(cfg, "generate")


def test_partial_output_of_another_config_is_not_resumed(cfg) -> None:
    prepare_output(cfg, "generate", overwrite=False)
    changed = load_config(cfg._source, ["generate.num_examples=7"])
    # nothing written yet: the new config simply takes the folder over
    assert prepare_output(changed, "generate", overwrite=False) == "fresh"
    (cfg.run_path / "generate" / "part.jsonl").write_text("{}\n")
    with pytest.raises(DistillError, match="different config"):
        prepare_output(cfg, "generate", overwrite=False)
    assert prepare_output(changed, "generate", overwrite=False) == "resume"
