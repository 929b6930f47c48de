import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, invoke_cli, run_cli, write_config


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    probe = (
        "import sys, time; t = time.perf_counter(); import distill.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'datasets') if m in sys.modules]; "
        "print(heavy, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] "), out
    start = time.perf_counter()
    result = run_cli("--help")
    assert result.returncode == 0
    assert time.perf_counter() - start < 5
    for command in ("validate", "plan", "tiny-models", "task"):
        assert command in result.stdout


def test_validate_prints_resolved_config() -> None:
    result = run_cli("validate", "configs/tiny.yaml", "train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0001" in result.stdout


def test_validate_reports_every_problem_without_traceback(tmp_path: Path) -> None:
    bad = write_config(tmp_path, run_name="x", run_dir=None, train={"lr": -1, "optimm": "adamw_8bit"})
    result = run_cli("validate", str(bad), "generate.backend=nope")
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, result.stderr
    assert "train.optimm: unknown key (did you mean 'optim'?)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path / "none.yaml"))
    assert result.returncode == 1 and "config file not found" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_name: [x\n")
    result = run_cli("validate", str(broken))
    assert result.returncode == 1 and "invalid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_paper_config_exact_numbers() -> None:
    result = invoke_cli("plan", "configs/paper.yaml", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["base_params"] == 268_098_176
    assert plan["trainable_params"] == 30_375_936
    assert plan["all_params"] == 298_474_112
    assert plan["steps"] == 8_424
    mem = plan["memory_bytes"]
    assert mem["logits_full_vocab"] == 4 * 4096 * 262_144 * 4 * 2
    assert mem["total_chunked"] < mem["total_full_logits"]


def test_plan_recomputes_activations_only_where_the_card_needs_it(monkeypatch) -> None:
    """train.gradient_checkpointing=auto: always on CPU; on CUDA by the planned memory of training without it
    against half the card (the paper's shape plans 6.4 GiB without it: off on an 80 GiB card, on for 6 GiB)."""
    import torch

    from distill.config import load_config
    from distill.plan import build_plan

    cfg = load_config(REPO / "configs/paper.yaml", ["train.gradient_checkpointing=auto"])
    on_cpu = build_plan(cfg)
    assert on_cpu["gradient_checkpointing"] is True
    chosen = {}
    for card_gib in (80, 6):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda i, g=card_gib: type("P", (), {"total_memory": g * 2**30})
        )
        plan = build_plan(cfg)
        chosen[card_gib] = plan["gradient_checkpointing"]
        if not plan["gradient_checkpointing"]:
            kept = plan["memory_bytes"]["activations"]
            assert kept > on_cpu["memory_bytes"]["activations"]  # every layer's activations, not only inputs
            assert 2 * plan["memory_bytes"]["total_chunked"] <= card_gib * 2**30
    assert chosen == {80: False, 6: True}
    explicit = load_config(REPO / "configs/paper.yaml", ["train.gradient_checkpointing=false"])
    assert build_plan(explicit)["gradient_checkpointing"] is False  # a setting is a setting, on any machine


def test_plan_counts_the_vllm_sampler_beside_training() -> None:
    on_policy = ["train.objective=on_policy", "train.on_policy.teacher.backend=openai"]
    plans = [
        json.loads(invoke_cli("plan", "configs/paper.yaml", *on_policy, *extra, "--json").stdout)["memory_bytes"]
        for extra in ([], ["train.on_policy.sampler=vllm"])
    ]
    engine = 268_098_176 * 2 + 2**30  # on CPU: a bf16 copy of the student and a 1 GiB KV cache
    assert "sampler_engine" not in plans[0] and plans[1]["sampler_engine"] == engine
    assert plans[1]["total_chunked"] - plans[0]["total_chunked"] == engine


def test_plan_table_and_overrides() -> None:
    result = invoke_cli("plan", "configs/paper.yaml", "train.lora.r=64", "train.grad_accum=4", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "15,187,968" in result.stdout  # half the r=128 adapter
    assert "4,212" in result.stdout


def test_plan_without_local_model_or_arch_is_a_clear_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"teacher": "a", "student": "org/not-local"}, run_name="x", run_dir=None)
    result = invoke_cli("plan", str(cfg))
    assert result.returncode == 1
    assert "models.student_arch" in result.stderr and "Traceback" not in result.stderr


def test_task_sample_prints_prompts() -> None:
    result = run_cli("task", "sample", "configs/tiny.yaml", "--n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Plan the next 3 workouts") == 2


def _planner_files(tmp_path: Path, index: int = 4) -> tuple[Path, Path, str]:
    from distill.config import load_config
    from distill.tasks import load_task

    example = load_task(load_config(REPO / "configs/tiny.yaml")).example("test", index)
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"id": example.id, "payload": json.dumps(example.payload)}))  # a dataset row
    text = tmp_path / "program.txt"
    text.write_text(example.reference)
    return record, text, example.reference


def test_task_check_exit_codes(tmp_path: Path) -> None:
    record, text, program = _planner_files(tmp_path)

    def check(payload: Path, answer: Path):
        return invoke_cli("task", "check", "configs/tiny.yaml", "--payload", str(payload), "--answer", str(answer))

    ok = check(record, text)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"valid": True, "violations": []}

    text.write_text(program.replace("Workout 3", "Workout 4"))
    bad = check(record, text)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["violations"][0]["check"] == "unparseable"

    payload = json.loads(json.loads(record.read_text())["payload"])
    profile_only = tmp_path / "profile.json"
    profile_only.write_text(json.dumps({"profile": payload["profile"]}))  # no history: any rotation start is fine
    text.write_text(program)
    assert check(profile_only, text).returncode == 0

    for broken, expected in (
        ("{nope", "invalid JSON at line 1"),
        ('{"profile": {"role": "pilot"}}', "profile.level: missing"),
    ):
        profile_only.write_text(broken)
        res = check(profile_only, text)
        assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr
    res = check(record, tmp_path / "missing.txt")
    assert res.returncode == 2 and "missing.txt: file not found" in res.stderr


def test_task_grammar_prints_the_inputs_gbnf(tmp_path: Path) -> None:
    record, _, _ = _planner_files(tmp_path)
    result = invoke_cli("task", "grammar", "configs/tiny.yaml", "--payload", str(record))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("root ::= workout-1-") and "\nline-" in result.stdout
    record.write_text("{nope")
    result = invoke_cli("task", "grammar", "configs/tiny.yaml", "--payload", str(record))
    assert result.returncode == 2 and "invalid JSON at line 1" in result.stderr and "Traceback" not in result.stderr


def test_tiny_models_command(tmp_path: Path) -> None:
    result = invoke_cli("tiny-models", str(tmp_path / "m"), "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m/teacher/config.json").is_file() and (tmp_path / "m/student/tokenizer.model").is_file()


def test_validate_reads_the_task_inputs(tmp_path: Path) -> None:
    ok = run_cli("validate", "configs/techlog.yaml")
    counts = "train 459 usable, asks 456; validation 84 usable, asks 16; test 57 usable, asks 24"
    assert ok.returncode == 0 and f"task 'techlog' (inputs: {counts})" in " ".join(ok.stderr.split())
    labels = run_cli("validate", "configs/crewdesk.yaml")
    counts = "train 561 usable, asks all; validation 73 usable, asks 16; test 86 usable, asks all"
    assert labels.returncode == 0 and f"task 'crewdesk' (inputs: {counts})" in " ".join(labels.stderr.split())
    (tmp_path / "s.json").write_text('{"type": "objekt"}')
    bad = run_cli("validate", "configs/techlog.yaml", f"task.json_schema={tmp_path / 's.json'}")
    assert bad.returncode == 1 and "s.json: invalid JSON Schema" in bad.stderr and "Traceback" not in bad.stderr
