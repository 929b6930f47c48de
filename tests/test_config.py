from pathlib import Path

import pytest
from conftest import REPO, write_config

from distill.config import PipelineConfig, load_config
from distill.errors import ConfigError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run_name


def test_shipped_configs_exist() -> None:
    assert {"paper.yaml", "tiny.yaml"} <= {p.name for p in CONFIGS}


def test_paper_config_is_the_reference_workload() -> None:
    cfg = load_config(REPO / "configs/paper.yaml")
    t = cfg.train
    assert cfg.generate.num_examples == 67392
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (128, 128, 0.0)
    assert set(t.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (t.batch_size, t.grad_accum, t.lr, t.warmup_steps, t.scheduler) == (4, 2, 2e-5, 20, "linear")
    assert (t.optim, t.weight_decay, t.max_length, t.precision) == ("adamw_8bit", 0.01, 4096, "bf16")
    assert t.gradient_checkpointing and t.epochs == 1
    s = cfg.generate.sampling
    assert (s.temperature, s.top_p, s.top_k, s.enable_thinking) == (0.7, 0.8, 20, False)


def test_precedence_defaults_yaml_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_dir=None, train={"lr": 0.5, "batch_size": 3})
    cfg = load_config(path, ["train.lr=1e-4", "generate.num_examples=64", "generate.sampling.top_k=5"])
    assert cfg.train.lr == 1e-4  # override beats YAML
    assert cfg.train.batch_size == 3  # YAML beats default
    assert cfg.train.grad_accum == 2  # default
    assert cfg.generate.num_examples == 64
    assert cfg.generate.sampling.top_k == 5


def test_all_problems_reported_at_once_with_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_dir=None, train={"lr": "fast", "batch_sise": 4}, generate={"backend": "magic"})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["serve.parallel=0"])
    problems = info.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "train.lr" in text and '"fast"' in text
    assert "train.batch_sise: unknown key (did you mean 'batch_size'?)" in text
    assert "generate.backend" in text and "'reference'" in text
    assert "override: serve.parallel: got 0; input should be greater than or equal to 1" in text
    assert sum(p.startswith(str(path)) for p in problems) == 3


def test_overrides_are_type_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_dir=None)
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(path, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.lr"])


def test_missing_file_bad_yaml_and_missing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"  # text no config writer would produce
    path.write_text("run_name: t\nmodels: [a\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: invalid YAML: expected"):
        load_config(path)
    path.write_text("run_name: t\n")
    with pytest.raises(ConfigError, match="models: required key is missing"):
        load_config(path)


def test_stage_fingerprint_tracks_upstream_only(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_dir=None)
    base = load_config(path)
    changed_train = load_config(path, ["train.lr=1e-3"])
    assert base.stage_fingerprint("generate") == changed_train.stage_fingerprint("generate")
    assert base.stage_fingerprint("train") != changed_train.stage_fingerprint("train")
    assert base.stage_fingerprint("merge") != changed_train.stage_fingerprint("merge")
    changed_serve = load_config(path, ["serve.requests=3"])
    assert base.stage_fingerprint("export") == changed_serve.stage_fingerprint("export")
    # how batches are laid out and which attention kernel runs train the same model (tests/test_train.py)
    packed = load_config(path, ["train.packing=true", "train.attention=eager"])
    assert base.stage_fingerprint("train") == packed.stage_fingerprint("train")


def test_train_seed_reseeds_training_alone(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_dir=None, seed=3)
    base, reseeded = load_config(path), load_config(path, ["train.seed=7"])
    assert (base.train_seed, reseeded.train_seed) == (3, 7)
    # the same data: generate's output stays valid, training's does not
    assert base.stage_fingerprint("generate") == reseeded.stage_fingerprint("generate")
    assert base.stage_fingerprint("train") != reseeded.stage_fingerprint("train")


def test_every_field_is_documented() -> None:
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for cand in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(cand, type) and issubclass(cand, BaseModel):
                    walk(cand)

    walk(PipelineConfig)
    assert len(seen) > 10


def test_task_section_picks_a_pack_and_is_strict(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, run_dir=None)).task.kind == "crew"  # no task section: the crew pack
    path = write_config(
        tmp_path, run_dir=None, task={"kind": "jsonl", "files": ["x.jsonl"], "prompt_templat": "Q: {q}"}
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["task.unit=3"])
    text = "\n".join(info.value.problems)
    assert "task.prompt_templat: unknown key (did you mean 'prompt_template'?)" in text
    assert "override: task.unit: got 3" in text
    with pytest.raises(ConfigError, match=r"override: task.kind: got \"magic\"; use one of crew, jsonl, python"):
        load_config(path, ["task.kind=magic"])
    with pytest.raises(ConfigError, match="task.language: unknown key"):
        load_config(write_config(tmp_path, run_dir=None, task={"kind": "python", "factory": "a:b", "language": "en"}))
