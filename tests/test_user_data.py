"""The data shapes users bring: labels and records whose gold answers repeat across inputs, files with fewer inputs
than asked for, prompts of a few words and prompts longer than train.max_length."""

import json
from pathlib import Path

import pytest
from conftest import invoke_cli, run_cli, write_config

from distill.config import load_config

SHAPE = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
TINY = {"seed": 0, "vocab_size": 512, "corpus_size": 200, "teacher": SHAPE, "student": SHAPE}


def yes_no_rows(n: int = 120) -> list[dict]:
    """Yes/no questions with gold labels, as a user's file has them: two labels for every question, a handful of
    question frames, near-identical questions with different answers."""
    frames = [
        ("Is flight XQ{i} delayed today?", "yes"),
        ("Is flight XQ{i} on time today?", "no"),
        ("Does crew member {i} have a valid medical?", "yes"),
        ("Has crew member {i} missed the recurrent training?", "no"),
    ]
    rows = []
    for i in range(n):
        text, label = frames[i % len(frames)]
        rows.append({"id": f"q{i:03d}", "asker": f"asker-{i % 40}", "question": text.format(i=i), "label": label})
    return rows


def intent_rows(n: int = 90) -> list[dict]:
    """Utterances and their gold intent-and-slots records: different words, one record ("cancel" has no slots)."""
    rows = []
    for i in range(n):
        if i % 3 == 0:
            text, gold = f"please cancel booking number {i}", {"intent": "cancel", "people": None}
        elif i % 3 == 1:
            text, gold = f"I can't make it to reservation {i}, cancel it", {"intent": "cancel", "people": None}
        else:
            text, gold = f"table for {i % 4 + 1} tonight, ref {i}", {"intent": "book", "people": i % 4 + 1}
        rows.append({"id": f"u{i:03d}", "caller": f"c{i % 30}", "utterance": text, "gold": gold})
    return rows


INTENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["intent"],
    "properties": {"intent": {"enum": ["book", "cancel"]}, "people": {"type": ["integer", "null"], "minimum": 1}},
}


def intent_task(root: Path, template: str) -> dict:
    """The jsonl task options of `intent_rows`, their gold records checked by INTENT_SCHEMA."""
    (root / "schema.json").write_text(json.dumps(INTENT_SCHEMA))
    return {
        "prompt_template": template,
        "group_field": "caller",
        "reference_field": "gold",
        "json_schema": str(root / "schema.json"),
    }


def write_task(
    root: Path, rows: list[dict], task: dict, generate: dict, models: bool = True, **sections: object
) -> Path:
    """A jsonl task over `rows` with the reference teacher; `models`: tiny models of the task's text, built by the
    pipeline (without them the reference teacher still writes the data, with no token statistics)."""
    (root / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_config(
        root,
        {"teacher": root / "models/teacher", "student": root / "models/student"} if models else None,
        run_name="u",
        tiny=TINY if models else None,
        task={"kind": "jsonl", "files": [str(root / "inputs.jsonl")], **task},
        generate={"backend": "reference", "batch_size": 32, **generate},
        **sections,
    )


def error_line(stderr: str) -> str:
    """The command's one error, as one line (the console wraps it to its width)."""
    return " ".join(stderr[stderr.index("error:") :].split())


YES_NO = {
    "prompt_template": "Answer yes or no. {question}",
    "group_field": "asker",
    "reference_field": "label",
    "choices": ["yes", "no"],
}


def test_label_scores_against_hand_computed_values() -> None:
    from distill.scoring import INVALID, label_scores

    scores = label_scores([" a\n", "a", "b", "b", "zzz", "a"], ["a", "a", "a", "b", "b", "c"], ("a", "b", "c", "d"))
    assert scores["answers"] == 6 and scores["accuracy"] == 0.5
    a, b, c = (scores["classes"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"], a["predicted"]) == (2 / 3, 2 / 3, 3, 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"], c["support"], c["predicted"]) == (0, 0, 0, 1, 0)
    assert "d" not in scores["classes"]  # neither gold nor answered: not part of the macro average
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert scores["confusion"] == {
        "a": {"a": 2, "b": 1, "c": 0, INVALID: 0},
        "b": {"a": 0, "b": 1, "c": 0, INVALID: 1},
        "c": {"a": 1, "b": 0, "c": 0, INVALID: 0},
    }


def test_record_scores_against_hand_computed_values() -> None:
    from distill.scoring import record_scores

    gold = [
        {"name": "x", "qty": 1, "note": None},
        {"name": "y", "qty": 2, "note": "gift"},
        {"name": "z", "qty": 3},
        {"name": "w", "qty": 4, "note": "rush"},
    ]
    answers = [
        {"name": "x", "qty": 1},  # leaves out the field the gold has as null: the same, no value
        {"name": "y", "qty": 2, "note": "gift"},  # exact
        {"name": "z", "qty": True, "note": "extra"},  # true is not 3 (nor 1); adds a field the gold has not
    ]
    scores = record_scores([json.dumps(a) for a in answers] + ["not json"], [json.dumps(g) for g in gold], ())
    assert scores["answers"] == 4 and scores["exact_match"] == 0.25
    assert scores["field_accuracy"] == pytest.approx((1 + 1 + 1 / 2 + 0) / 4)
    name, qty, note = (scores["fields"][k] for k in ("name", "qty", "note"))  # field order: as the gold has them
    assert list(scores["fields"]) == ["name", "qty", "note"]
    assert (name["accuracy"], name["precision"], name["recall"], name["support"]) == (0.75, 1.0, 0.75, 4)
    assert name["f1"] == pytest.approx(6 / 7)
    assert (qty["accuracy"], qty["precision"], qty["recall"]) == (0.5, 2 / 3, 0.5)
    assert qty["f1"] == pytest.approx(4 / 7)
    assert (note["accuracy"], note["precision"], note["recall"], note["f1"], note["support"]) == (0.5, 0.5, 0.5, 0.5, 2)
    # pooled over the fields: 6 right values, 2 values where none or another was due, 4 values missed
    assert scores["field_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # the schema's fields, in its order, whatever the gold records hold
    assert list(record_scores(["{}"], ['{"b": 1}'], ("a", "b"))["fields"]) == ["a", "b"]


def test_answers_of_no_known_shape_are_scored_whole_against_gold(tmp_path) -> None:
    """A regex task with a gold column: no labels, no records, but each answer still right or wrong."""
    from distill.scoring import score, summarize
    from distill.tasks import load_task

    rows = [{"id": f"r{i}", "shop": f"s{i}", "text": f"{i} apples", "count": f"{i} items"} for i in range(40)]
    task_options = {"prompt_template": "{text}", "group_field": "shop", "reference_field": "count"}
    path = write_task(tmp_path, rows, {**task_options, "regex": "[0-9]+ items?"}, {}, models=False)
    task = load_task(load_config(path))
    examples = [task.example("train", i) for i in range(3)]
    table = [{"payload": json.dumps(e.payload), "response": e.reference} for e in examples]
    answers = [examples[0].reference + "\n", "1 item", "not a count"]
    summary = summarize([{**score(a, r, task), "text": a} for a, r in zip(answers, table)], task, table)
    assert task.shape is None and summary["gold"] == {"exact_match": 1 / 3} and summary["validity"] == 2 / 3


def test_what_near_duplicate_filtering_compares() -> None:
    from distill.dedup import ExampleDeduplicator

    instructions = " ".join(f"rule{i}" for i in range(60))  # a long prompt template: most of every input
    long_input = f"{instructions} The flight is delayed."
    twin = f"{instructions} The flight is cancelled."  # near-identical input, another answer
    both = ExampleDeduplicator("both", 0.9)
    both.add(long_input, "delay")
    assert not both.is_duplicate(twin, "cancellation")  # same-looking inputs with different answers are kept
    assert not both.is_duplicate("Another question entirely?", "delay")  # a shared answer is no duplicate
    assert both.is_duplicate(long_input, "delay")  # the example itself, sent twice
    inputs = ExampleDeduplicator("input", 0.9)
    inputs.add(long_input, "delay")
    assert inputs.is_duplicate(twin, "cancellation") and not inputs.is_duplicate("Another question?", "delay")
    answers = ExampleDeduplicator("answer", 0.9)
    answers.add("q1", "a long program of many words " * 5)
    assert answers.is_duplicate("q2", "a long program of many words " * 5) and not answers.is_duplicate("q3", "x y z")
    none = ExampleDeduplicator("none", 0.9)
    none.add(long_input, "delay")
    assert not none.is_duplicate(long_input, "delay")


def test_repeated_gold_labels_are_kept_and_counts_are_exact(tmp_path) -> None:
    """The case a new user hit: 120 yes/no questions, 80 asked for, answers that repeat by nature."""
    from datasets import load_from_disk

    from distill.artifacts import read_manifest
    from distill.stages.generate import run as generate

    rows = yes_no_rows() + [dict(yes_no_rows()[2], id="again")]  # one question sent twice, by the same asker
    path = write_task(
        tmp_path,
        rows,
        YES_NO,
        {"num_examples": 80, "validation_examples": 8, "test_examples": 8},
        models=False,
    )
    validated = invoke_cli("validate", str(path))
    assert validated.returncode == 0, validated.stderr
    # 40 askers of 3 questions each, split by a hash of the asker: 3 of them held out for validation, 3 for test
    assert "train 103 usable, asks 80; validation 9 usable, asks 8; test 9 usable, asks 8" in validated.stderr
    folder = generate(load_config(path))
    data = load_from_disk(str(folder / "dataset"))
    assert {split: len(data[split]) for split in data} == {"train": 80, "validation": 8, "test": 8}
    stats = read_manifest(folder)["metrics"]
    assert stats["dedup"] == "both" and "near_duplicate" not in stats["reject_reasons"]
    assert stats["requested"] == {"train": 80, "validation": 8, "test": 8}
    assert stats["inputs"]["train"] == {"available": 103, "usable": 103}
    assert sum(stats["class_balance"]["train"].values()) == 80 and set(stats["class_balance"]["train"]) == {"yes", "no"}

    # every input, and the repeated one only once: it is the same example, not another input with the same answer
    every = load_config(path, ["generate.num_examples=all", "generate.test_examples=all", "run_name=every"])
    folder = generate(every)
    stats = read_manifest(folder)["metrics"]
    assert stats["reject_reasons"] == {"near_duplicate": 1} and stats["counts"]["train"] == 102
    assert stats["counts"]["test"] == 9 and stats["requested"]["train"] == "all"
    # the answers alone, as for a generative teacher: gold answers are still never compared with one another
    answers = load_config(path, ["generate.dedup=answer", "run_name=answers"])
    assert read_manifest(generate(answers))["metrics"]["dedup"] == "none"


def test_gold_records_that_repeat_are_kept(tmp_path) -> None:
    from distill.artifacts import read_manifest
    from distill.stages.generate import run as generate

    path = write_task(
        tmp_path,
        intent_rows(),
        intent_task(tmp_path, "Intent and party size, as JSON: {utterance}"),
        {"num_examples": 60, "validation_examples": 4, "test_examples": 8},
        models=False,
    )
    stats = read_manifest(generate(load_config(path)))["metrics"]
    assert stats["counts"]["train"] == 60 and stats["reject_reasons"] == {} and stats["dedup"] == "both"


def test_a_split_with_too_few_inputs_is_one_line_naming_the_setting(tmp_path) -> None:
    path = write_task(
        tmp_path,
        yes_no_rows(),
        YES_NO,
        {"num_examples": 200, "validation_examples": 8, "test_examples": 8},
        models=False,
    )
    kept = tmp_path / "runs/u/generate/shards/shard-0-of-1/records.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"id": "x", "split": "train"}\n')
    for command in ("validate", "generate"):
        result = run_cli(command, str(path)) if command == "generate" else invoke_cli(command, str(path))
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
        line = error_line(result.stderr)
        assert "generate.num_examples=200 but task 'jsonl' has only 102 usable train inputs (102 in all)" in line
        assert "generate.num_examples=all" in line
    assert kept.read_text() == '{"id": "x", "split": "train"}\n'
    crew = write_config(tmp_path, name="crew.yaml", generate={"num_examples": "all"})
    result = invoke_cli("validate", str(crew))
    assert (
        result.returncode == 1
        and "generate.num_examples=all: task 'crew' makes as many inputs as asked" in result.stderr
    )


def test_inputs_that_run_out_say_so_and_all_takes_what_passes(tmp_path) -> None:
    from distill.artifacts import read_manifest
    from distill.stages.generate import run as generate

    rows = yes_no_rows()
    for row in rows:
        if row["asker"] in ("asker-2", "asker-4"):  # two askers of the training split, 3 questions each
            row["label"] = "maybe"  # gold labels the checks refuse: not one of the choices
    path = write_task(
        tmp_path,
        rows,
        YES_NO,
        {"num_examples": 102, "validation_examples": 8, "test_examples": 8},
        models=False,
    )
    result = run_cli("generate", str(path))
    line = error_line(result.stderr)
    assert result.returncode == 1 and result.stderr.count("error:") == 1, result.stderr
    assert (
        "task 'jsonl' has no more inputs (train 96 of 102 asked for, every one of its 102 usable inputs tried" in line
    )
    assert "rejected for: not_a_choice 6" in line and "set generate.num_examples=96" in line
    assert "max_attempts_factor" not in line
    every = load_config(path, ["generate.num_examples=all"])
    stats = read_manifest(generate(every, overwrite=True))["metrics"]
    assert stats["counts"]["train"] == 96 and stats["reject_reasons"] == {"not_a_choice": 6}


@pytest.mark.slow
def test_labels_from_jsonl_train_eval_and_serve_with_short_and_long_prompts(tmp_path) -> None:
    """A labels task end to end: prompts of a few words and a few longer than train.max_length, real training,
    eval's classification scores (free and under the grammar) in the report, and serving under the grammar."""
    from distill.artifacts import read_manifest
    from distill.plan import build_plan
    from distill.report import render_report
    from distill.stages.eval import run as evaluate
    from distill.stages.export import run as export
    from distill.stages.generate import run as generate
    from distill.stages.merge import run as merge
    from distill.stages.serve import run as serve
    from distill.stages.train import run as train

    rows = yes_no_rows(60)
    for i, row in enumerate(rows[1::8]):  # a few long messages: their prompts alone fill train.max_length
        row["question"] = f"Is this delayed? The crew bus {i} was late and gate {i} changed twice. " * 40
    path = write_task(
        tmp_path,
        rows,
        {**YES_NO, "prompt_template": "{question}"},
        {"num_examples": "all", "validation_examples": 2, "test_examples": "all"},
        train={"lora": {"r": 4, "alpha": 8}, "precision": "fp32", "max_length": 96, "max_steps": 6, "batch_size": 2},
        merge={"dtype": "float32", "check_prompts": 1},
        export={"check_prompts": 1},
        eval={"num_prompts": 20, "max_new_tokens": 4, "models": ["teacher", "gguf"]},
        serve={"max_instances": 1, "max_slots": 2, "concurrency": [2], "requests": 4, "max_tokens": 4, "context": 1024},
    )
    cfg = load_config(path)
    generate(cfg)
    data = read_manifest(cfg.run_path / "generate")["metrics"]
    assert data["reject_reasons"] == {}  # short questions share their answers, long ones their words: all kept
    assert data["example_tokens"]["max"] > 96 > data["example_tokens"]["p50"]  # a few words each, but for the long
    plan = build_plan(cfg)
    assert plan["tokens_source"] == "50 of the 50 training examples" and plan["longest_tokens_per_example"] == 96
    assert plan["mean_tokens_per_example"] < 96 and plan["examples"] == data["counts"]["train"]

    train(cfg)
    trained = read_manifest(cfg.run_path / "train")["metrics"]
    from datasets import load_from_disk

    train_split = load_from_disk(str(cfg.run_path / "generate/dataset"))["train"]
    long_train = sum("changed twice" in p for p in train_split["prompt"])
    assert long_train and trained["skipped_too_long"] == long_train and trained["truncated"] == 0
    assert trained["examples"] == len(train_split) - long_train

    merge(cfg)
    export(cfg)
    teacher = read_manifest(evaluate(cfg, model="teacher"))["metrics"]
    assert teacher["gold"]["labels"]["accuracy"] == 1.0 and teacher["gold"]["labels"]["macro_f1"] == 1.0
    gguf = read_manifest(evaluate(cfg, model="gguf"))["metrics"]
    test_size = data["counts"]["test"]
    for scores in (gguf["gold"]["labels"], gguf["constrained"]["gold"]["labels"]):
        matrix = scores["confusion"]
        assert sum(sum(row.values()) for row in matrix.values()) == scores["answers"] == test_size
        assert scores["accuracy"] == pytest.approx(sum(matrix[g].get(g, 0) for g in matrix) / test_size)
    # under the grammar every answer is a label: no column for answers that are none
    assert set(next(iter(gguf["constrained"]["gold"]["labels"]["confusion"].values()))) <= {"yes", "no"}
    report = render_report(cfg)
    assert "| accuracy | macro-F1 |" in report and "Confusion matrix of GGUF" in report
    assert "Class balance (answers per label): train " in report
    assert "left out (prompt longer than train.max_length=96)" in report
    assert (cfg.run_path / "eval/confusion.png").is_file()

    served = json.loads((serve(cfg) / "report.json").read_text())
    assert served["best"]["level"]["valid_share"] == 1.0  # under the grammar every answer is one of the labels


@pytest.mark.slow
def test_records_from_jsonl_train_eval_per_field_and_serve(tmp_path) -> None:
    from distill.artifacts import read_manifest
    from distill.comparison import comparison_table, evaluated
    from distill.stages.eval import run as evaluate
    from distill.stages.export import run as export
    from distill.stages.generate import run as generate
    from distill.stages.merge import run as merge
    from distill.stages.serve import run as serve
    from distill.stages.train import run as train
    from distill.tasks import load_task

    path = write_task(
        tmp_path,
        intent_rows(),
        intent_task(tmp_path, "{utterance}"),
        {"num_examples": 40, "validation_examples": 2, "test_examples": 6},
        train={"lora": {"r": 4, "alpha": 8}, "precision": "fp32", "max_steps": 4},
        merge={"dtype": "float32", "check_prompts": 1},
        export={"check_prompts": 1},
        eval={"num_prompts": 6, "max_new_tokens": 24},
        serve={"max_instances": 1, "max_slots": 2, "concurrency": [2], "requests": 4, "max_tokens": 64, "context": 512},
    )
    cfg = load_config(path)
    generate(cfg)
    train(cfg)
    adapter = read_manifest(evaluate(cfg, model="adapter"))["metrics"]
    for scores in (adapter["gold"]["records"], adapter["constrained"]["gold"]["records"]):
        assert scores["answers"] == 6 and list(scores["fields"]) == ["intent", "people"]
        # "people" has a value in the gold of the booking utterances only
        assert scores["fields"]["people"]["support"] == sum(json.loads(r)["intent"] == "book" for r in _gold(cfg))
    table = comparison_table(cfg, load_task(cfg), evaluated(cfg))
    assert "| answer = gold | fields = gold | field F1 |" in table and "| intent (n=6) | people (n=" in table

    merge(cfg)
    export(cfg)
    served = json.loads((serve(cfg) / "report.json").read_text())
    assert served["best"]["level"]["valid_share"] == 1.0  # under the schema's grammar every record is valid


def _gold(cfg) -> list[str]:
    from datasets import load_from_disk

    return [
        json.dumps(json.loads(p)["gold"])
        for p in load_from_disk(str(cfg.run_path / "generate/dataset"))["test"]["payload"]
    ]
