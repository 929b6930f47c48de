"""The task interface: a toy python pack through generate, eval and serve; the jsonl pack; bad input."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_exported_run, run_cli, write_config

from distill.config import load_config
from distill.errors import DistillError
from distill.tasks import Labels, Records

TOY = {"kind": "python", "factory": "toy_task:make", "options": {"max_words": 1000}}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "qty"],
    "properties": {
        "name": {"type": "string"},
        "qty": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
}


def test_no_module_outside_the_crew_pack_imports_it() -> None:
    package = REPO / "src/distill"
    offenders = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[:2] == ("tasks", "crew") or rel == Path("tasks/__init__.py"):  # the pack, and the registry
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                n.startswith("distill.tasks.crew") for n in names
            ):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
    assert not (package / "task").exists()


@pytest.mark.slow
def test_toy_task_drives_generate_eval_and_serve(tmp_path) -> None:
    """No crew code: the toy pack's inputs, references, checks and agreement go through every stage."""
    from datasets import load_from_disk
    from toy_task import ToyTask

    from distill.artifacts import read_manifest
    from distill.scoring import score
    from distill.stages.eval import run as evaluate
    from distill.stages.serve import run as serve

    serve_cfg = {
        "max_instances": 1,
        "max_slots": 2,
        "concurrency": [2],
        "requests": 3,
        "max_tokens": 12,
        "context": 512,
        "ready_timeout_s": 60,
    }
    # tiny models of its own, with the toy task's tokenizers: no crew code anywhere
    path = make_exported_run(tmp_path, task=TOY, serve=serve_cfg, eval={"num_prompts": 3, "max_new_tokens": 12})
    cfg = load_config(path)
    data = load_from_disk(str(cfg.run_path / "generate/dataset"))
    row = data["test"][0]
    assert row["id"].startswith("toy-test-") and row["response"].startswith("my ")
    assert json.loads(row["payload"])["colour"] in row["response"]

    teacher = read_manifest(evaluate(cfg, model="teacher"))["metrics"]
    assert teacher["validity"] == 1.0 and teacher["agreement"] == {"same_colour": 1.0}
    gguf = read_manifest(evaluate(cfg, model="gguf"))["metrics"]
    assert set(gguf["violation_rates"]) == {"too_long"} and gguf["validity"] == 1.0  # 12 tokens never exceed 1000 words
    texts = [
        json.loads(line)["text"] for line in (cfg.run_path / "eval/gguf/generations.jsonl").read_text().splitlines()
    ]
    strict = [score(t, r, ToyTask(max_words=0)) for t, r in zip(texts, data["test"]) if t.split()]
    assert all(s["violations"] == ["too_long"] for s in strict)
    assert "| reference answers (held-out) |" in (cfg.run_path / "eval/comparison.md").read_text()

    report = json.loads((serve(cfg) / "report.json").read_text())
    assert report["unit"] == "note" and report["best"]["level"]["valid_share"] == 1.0
    assert (
        report["grammar"] == "free decoding (the task has no grammar)"
        and "free_levels" not in report["fleets"]["slots"]
    )
    assert "notes/s" in (cfg.run_path / "serve/report.md").read_text()


def _jsonl_config(
    tmp_path: Path, rows: list[dict] | str, task: str, schema: object = SCHEMA, tiny: dict | None = None
) -> Path:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "schema.json").write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return write_config(
        tmp_path,
        {"teacher": tmp_path / "t", "student": tmp_path / "s"},
        run_name="j",
        tiny=tiny,
        task=f"{{kind: jsonl, files: [{inputs}], {task}}}",
        generate={"backend": "reference", "num_examples": 4, "validation_examples": 1, "test_examples": 1},
    )


def _rows(n: int = 60) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "shop": f"shop{i % 12}",
            "text": f"buy {i % 5 + 1} of item{i}",
            "gold": {"name": f"item{i}", "qty": i % 5 + 1},
        }
        for i in range(n)
    ]


def _task(tmp_path: Path, task: str, rows: list[dict] | None = None):
    from distill.tasks import load_task

    return load_task(load_config(_jsonl_config(tmp_path, rows or _rows(), task)))


def test_jsonl_schema_violations_are_named_with_their_paths(tmp_path) -> None:
    task = _task(
        tmp_path,
        f"prompt_template: 'Order: {{text}}', group_field: shop, reference_field: gold, json_schema: {tmp_path}/schema.json",
    )
    example = task.example("train", 0)
    assert example.prompt.startswith("Order: buy ") and task.check(example.reference, example.payload) == []
    found = task.check('{"qty": 0, "tags": ["a", "z"], "extra": 1}', {})
    named = {(v.check, v.detail.split(":")[0]) for v in found}
    assert named == {
        ("schema_required", "$"),
        ("schema_minimum", "$.qty"),
        ("schema_enum", "$.tags[1]"),
        ("schema_additionalProperties", "$"),
    }
    assert [v.check for v in task.check("{not json", {})] == ["invalid_json"]
    assert set(task.weights) >= {"invalid_json", "schema_required", "schema_enum", "schema_minimum"}
    # scored against the gold answer in the payload (not whatever the teacher wrote), as a record of the schema's fields
    assert task.gold(example.payload) == example.reference and task.shape == Records(("name", "qty", "tags"))
    assert task.dedup == "both" and task.agreement_titles == {}


def test_jsonl_regex_and_choices(tmp_path) -> None:
    regex = _task(
        tmp_path,
        "prompt_field: text, split_field: split, regex: '[0-9]+ items?'",
        [{"text": f"t{i}", "split": ["train", "test", "validation"][i % 3]} for i in range(9)],
    )
    assert {regex.size(s) for s in ("train", "validation", "test")} == {3}
    assert regex.check("3 items", {}) == [] and regex.check(" 1 item\n", {}) == []
    assert [v.check for v in regex.check("3 items, thanks", {})] == ["regex_mismatch"]
    assert regex.reference_source is None and regex.agreement_titles == {}
    choices = _task(
        tmp_path,
        "prompt_field: text, group_field: text, choices: [approve, reject]",
        [{"text": f"q{i}"} for i in range(9)],
    )
    assert choices.check("approve", {}) == [] and [v.check for v in choices.check("maybe", {})] == ["not_a_choice"]
    assert choices.shape == Labels(("approve", "reject")) and choices.gold({"text": "q1"}) is None
    assert regex.shape is None and {"approve", "reject"} <= set(choices.corpus(3, 0))


def test_jsonl_split_by_group_keeps_each_group_in_one_split(tmp_path) -> None:
    task = _task(
        tmp_path,
        f"prompt_template: '{{text}}', group_field: shop, test_share: 0.25, validation_share: 0.25, json_schema: {tmp_path}/schema.json",
        _rows(240),
    )
    splits = {s: [task.example(s, i) for i in range(task.size(s))] for s in ("train", "validation", "test")}
    assert sum(len(v) for v in splits.values()) == 240 and all(splits.values())
    groups = {s: {e.group for e in v} for s, v in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    other = tmp_path / "again"
    other.mkdir()
    again = _task(
        other,
        "prompt_template: '{text}', group_field: shop, test_share: 0.25, validation_share: 0.25, choices: [x]",
        _rows(240),
    )
    assert [again.example("test", i).id for i in range(again.size("test"))] == [e.id for e in splits["test"]]
    assert task.example("test", task.size("test")) is None


def test_jsonl_gold_answers_are_the_reference_teacher(tmp_path) -> None:
    from datasets import load_from_disk

    from distill.stages.generate import run as generate

    # the pipeline builds tiny models of this task's own text (`models.tiny`), the smallest shapes
    shape = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    path = _jsonl_config(
        tmp_path,
        _rows(),
        f"prompt_template: 'Order: {{text}}', id_field: id, group_field: shop, reference_field: gold, json_schema: {tmp_path}/schema.json",
        tiny={"seed": 0, "vocab_size": 512, "corpus_size": 40, "teacher": shape, "student": shape},
    )
    data = load_from_disk(str(generate(load_config(path)) / "dataset"))
    gold = {r["id"]: r for r in _rows()}
    for split in data.values():
        for row in split:
            assert json.loads(row["response"]) == gold[row["id"]]["gold"]
            assert row["group"] == gold[row["id"]]["shop"] and row["prompt"] == "Order: " + gold[row["id"]]["text"]
    assert not set(data["train"]["group"]) & (set(data["test"]["group"]) | set(data["validation"]["group"]))


@pytest.mark.parametrize(
    ("rows", "task", "schema", "expected"),
    [
        (
            '{"text": "a", "shop": "s"}\n{nope\n',
            "prompt_field: text, group_field: shop, choices: [x]",
            None,
            "inputs.jsonl:2: not valid JSON",
        ),
        (
            [{"text": "a", "shop": "s"}, {"shop": "s"}],
            "prompt_template: 'Q: {text}', group_field: shop, choices: [x]",
            None,
            "inputs.jsonl:2: task.prompt_template uses {text} but the row has no 'text'",
        ),
        (
            [{"text": "a"}],
            "prompt_field: text, group_field: shop, choices: [x]",
            None,
            "inputs.jsonl:1: no column 'shop' (task.group_field)",
        ),
        (
            [{"text": "a", "shop": "s"}],
            "prompt_field: text, group_field: shop, json_schema: SCHEMA",
            '{"type": 12}',
            "schema.json: invalid JSON Schema",
        ),
        (
            [{"text": "a", "shop": "s"}],
            "prompt_field: text, group_field: shop, json_schema: SCHEMA",
            "{oops",
            "schema.json: the JSON Schema is not valid JSON",
        ),
        (
            [{"text": "a", "shop": "s"}],
            "prompt_field: text, group_field: shop, regex: '(['",
            None,
            "task.regex: not a valid regular expression",
        ),
        ([{"text": "a", "shop": "s"}], "prompt_field: text, choices: [x]", None, "set task.split_field"),
    ],
)
def test_jsonl_bad_input_is_one_line_and_keeps_what_was_written(tmp_path, rows, task, schema, expected) -> None:
    path = _jsonl_config(tmp_path, rows, task.replace("SCHEMA", str(tmp_path / "schema.json")), schema or SCHEMA)
    kept = tmp_path / "runs/j/generate/shards/shard-0-of-1/records.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"id": "x", "split": "train"}\n')
    result = run_cli("generate", str(path), "--overwrite")
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert kept.read_text() == '{"id": "x", "split": "train"}\n'


def test_python_pack_errors_name_the_factory(tmp_path) -> None:
    from distill.tasks import TaskError, load_task

    for factory, expected in (
        ("no_such_module:make", "cannot import 'no_such_module'"),
        ("toy_task:missing", "has no callable 'missing'"),
        ("toy_task:not_a_task", "without name, unit, weights"),
    ):
        cfg = load_config(
            _jsonl_config(tmp_path, _rows(), "prompt_field: text, choices: [x]"),
            [f"task={{kind: python, factory: '{factory}'}}"],
        )
        with pytest.raises(TaskError, match=expected):
            load_task(cfg)
    # one statement of the interface: the python pack's check and TaskBase's defaults both derive from `Task`
    from distill.tasks import TaskBase, interface

    assert "grammar" in interface() and "grammar_leaves" in interface() and "gold" in interface()
    assert set(interface()) - set(dir(TaskBase)) == {"name", "weights", "example", "check"}
    with pytest.raises(DistillError):  # a factory that is not module:attr is refused by the config itself
        load_config(
            _jsonl_config(tmp_path, _rows(), "prompt_field: text, choices: [x]"), ["task={kind: python, factory: nope}"]
        )


def test_package_data_is_found_outside_the_checkout(tmp_path) -> None:
    """A plain (not editable) install finds the crew catalog and seed requests as package data."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import distill.tasks.crew.catalog as c, distill.tasks.crew.pack as p, pathlib;"
        f"assert pathlib.Path(c.__file__).is_relative_to({str(target)!r});"
        "print(len(c.load_catalog()), p.DATA_DIR.joinpath('seed_tasks.jsonl').is_file())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    count, seeds = out.stdout.split()
    assert int(count) >= 60 and seeds == "True"


def test_a_check_without_a_weight_is_named() -> None:
    from distill.tasks import TaskError, Violation, quality_score

    assert quality_score([Violation("a", ""), Violation("a", "again")], {"a": 0.25, "b": 0.5}) == 0.75
    with pytest.raises(TaskError, match=r"without a weight \(typo\)"):
        quality_score([Violation("typo", "")], {"a": 0.25})
