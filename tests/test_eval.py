"""`distill eval`: metrics on known programs, and real evaluations of every student variant."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli, trained_run_config

from distill.config import CrewTaskConfig, load_config
from distill.tasks.crew.pack import CrewTask
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import parse_program, render_program

EVAL = {"num_prompts": 3, "max_new_tokens": 24}
TASK = CrewTask(CrewTaskConfig(), 0)


def _row(index: int) -> tuple[dict, object]:
    example = TASK.example("train", index)
    row = {"prompt": example.prompt, "payload": json.dumps(example.payload), "response": example.reference}
    return row, parse_program(example.reference)


def test_scores_of_known_programs() -> None:
    from distill.scoring import score, summarize

    catalog = TASK.catalog
    row, program = _row(3)
    teacher = score(row["response"], row, TASK)
    assert teacher == {
        "valid": True,
        "violations": [],
        "quality": 1.0,
        "agreement": {"split_match": 1.0, "exercise_overlap": 1.0},
    }

    # Swap the first exercise for one the profile cannot do and drop the last workout.
    profile = Profile.from_dict(json.loads(row["payload"])["profile"])
    forbidden = next(
        ex for ex in catalog if profile.contraindications & ex.contraindications or ex.equipment - profile.equipment
    )
    first = program.workouts[0]
    broken = replace(
        program,
        workouts=(
            replace(first, exercises=(replace(first.exercises[0], exercise_id=forbidden.id), *first.exercises[1:])),
            *program.workouts[1:2],
        ),
    )
    result = score(render_program(broken), row, TASK)
    assert not result["valid"] and "wrong_workout_count" in result["violations"]
    assert {"contraindicated_exercise", "unavailable_equipment"} & set(result["violations"])
    assert result["agreement"]["split_match"] == 0.0 and 0 < result["agreement"]["exercise_overlap"] < 1
    assert 0 < result["quality"] < 1

    garbage = score("Workout one", row, TASK)
    assert garbage["violations"] == ["unparseable"] and garbage["quality"] == 0.0

    summary = summarize([teacher, result, garbage, teacher], TASK, [row] * 4)
    assert summary["validity"] == 0.5
    assert summary["violation_rates"]["unparseable"] == 0.25
    assert summary["violation_rates"]["wrong_workout_count"] == 0.25
    assert summary["agreement"]["split_match"] == 0.5
    assert "perplexity" not in summary  # the teacher's own answers are not generated
    assert "gold" not in summary  # a program has no gold answer to be scored against


@pytest.fixture(scope="module")
def exported(exported_run, tiny_models) -> Path:
    """The session's exported run, evaluated under this module's own config beside it."""
    return trained_run_config(exported_run.parent, tiny_models, name="eval.yaml", eval=EVAL)


def test_every_variant_evaluated_and_compared(exported) -> None:
    from distill.artifacts import read_manifest
    from distill.data import test_rows
    from distill.stages.eval import run as evaluate

    cfg = load_config(exported)
    results = {}
    for model in ("teacher", "base", "adapter", "merged", "gguf"):
        folder = evaluate(cfg, model=model)
        results[model] = read_manifest(folder)["metrics"]
        records = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
        assert len(records) == 3 == results[model]["answers"]
    assert results["teacher"]["validity"] == 1.0 and results["teacher"]["teacher_acceptance_rate"] == 1.0
    # The adapter folds into the merged model exactly, and Q8_0 barely moves the perplexity.
    assert results["adapter"]["perplexity"] == pytest.approx(results["merged"]["perplexity"], rel=1e-4)
    assert results["gguf"]["perplexity"] == pytest.approx(results["merged"]["perplexity"], rel=0.02)
    assert results["base"]["perplexity"] != pytest.approx(results["merged"]["perplexity"], rel=1e-3)
    for model in ("base", "merged", "gguf"):
        m = results[model]
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
        assert m["latency_s_mean"] > 0 and m["tokens_per_s"] > 0 and m["size_bytes"] > 0
    assert results["gguf"]["size_bytes"] < results["merged"]["size_bytes"]

    # every generated model is decoded a second time under each input's grammar: what it writes then is
    # always the start of a valid program (24 tokens are not a whole one), which free decoding is not
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["<eos>"], stop_token_ids=[0]))
    payloads = {r["id"]: json.loads(r["payload"]) for r in test_rows(cfg)}
    assert "grammar" not in results["teacher"] and "constrained" not in results["teacher"]
    for model in ("base", "merged", "gguf"):
        assert results[model]["grammar"] == "free and constrained"
        assert results[model]["constrained"]["answers"] == 3 and results[model]["constrained"]["latency_s_mean"] > 0
        folder = cfg.run_path / "eval" / model
        for name, in_grammar in (("generations.constrained.jsonl", True), ("generations.jsonl", False)):
            records = [json.loads(line) for line in (folder / name).read_text().splitlines()]
            matched = [
                xgr.GrammarMatcher(compiler.compile_grammar(TASK.grammar(payloads[r["id"]]).gbnf)).accept_string(
                    r["text"]
                )
                for r in records
            ]
            assert all(matched) if in_grammar else not all(matched), (model, name)

    comparison = (cfg.run_path / "eval" / "comparison.md").read_text()
    for title in (
        "reference answers (held-out)",
        "student before training",
        "merged student",
        "GGUF in llama.cpp",
        "merged student + grammar",
        "GGUF in llama.cpp + grammar",
    ):
        assert f"| {title} |" in comparison
    assert (cfg.run_path / "eval" / "comparison.png").stat().st_size > 5000


def test_interrupted_eval_resumes_and_keeps_finished_programs(exported) -> None:
    from distill.artifacts import read_manifest
    from distill.stages.eval import run as evaluate

    cfg = load_config(exported, ["eval.max_new_tokens=16"])
    folder = cfg.run_path / "eval" / "merged"
    evaluate(cfg, model="merged", overwrite=True)
    lines = (folder / "generations.jsonl").read_text().splitlines()
    # As if killed while writing the third program: the manifest is gone and the last line is torn.
    (folder / "manifest.json").unlink()
    first = json.loads(lines[0])
    first["text"] = "kept from the first run"
    (folder / "generations.jsonl").write_text(json.dumps(first) + "\n" + lines[1] + "\n" + lines[2][:20])

    evaluate(cfg, model="merged")
    records = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in lines]
    assert records[0]["text"] == "kept from the first run" and records[2]["text"] == json.loads(lines[2])["text"]
    assert read_manifest(folder)["metrics"]["answers"] == 3


def test_eval_input_errors(exported) -> None:
    result = run_cli("eval", str(exported), "--model", "student")
    assert result.returncode == 1 and "unknown model" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", str(exported), "--model", "pruned")
    assert result.returncode == 1 and "prune.enabled" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", str(exported), "train.lr=0.5", "--model", "merged")
    assert result.returncode == 1 and "different config" in result.stderr and "Traceback" not in result.stderr


def test_grammar_off(exported) -> None:
    from distill.artifacts import read_manifest
    from distill.stages.eval import run as evaluate

    off = read_manifest(evaluate(load_config(exported, ["eval.grammar=false"]), model="gguf", overwrite=True))[
        "metrics"
    ]
    assert off["grammar"] == "free only (eval.grammar is off)" and "constrained" not in off
    assert not (exported.parent / "runs/e/eval/gguf/generations.constrained.jsonl").exists()
