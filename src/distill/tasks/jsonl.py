"""Your own task from JSONL files, configured in YAML alone.

Each line of `task.files` is one input. The prompt is a template filled from the row (or a column);
the split comes from a column or from a hash of a group column, so a group never spans two splits;
answers are checked by a JSON Schema (one violation per schema error, named by its keyword, with its
JSON path), a regular expression or a list of allowed answers. A gold-answer column gives reference
answers: the `reference` teacher, and in eval the scores of the answers' shape against it (a list of
allowed answers: classification; a schema for a JSON object: extraction, field by field). Different rows may
share a gold answer, so near-duplicate filtering compares whole examples by default, never answers alone.
The same schema, expression or list is the answers' grammar: llama.cpp's schema converter, with each
regex read by Python's own parser (regex_gbnf.py), writes the GBNF.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from functools import cached_property
from pathlib import Path
from typing import Any

from distill.tasks import SPLITS, Example, Grammar, Labels, Records, TaskBase, TaskError, Violation

# What a failure of each JSON Schema keyword costs: a missing or mistyped field breaks a consumer,
# a value outside its enum or pattern is wrong data in the right shape.
SCHEMA_WEIGHTS = {"required": 0.4, "type": 0.4, "additionalProperties": 0.1}
OTHER_SCHEMA_WEIGHT = 0.2
# what llama.cpp's schema converter turns into grammar; any other keyword is left to the checks
GRAMMAR_KEYWORDS = frozenset(
    {
        "$schema",
        "$id",
        "$ref",
        "$defs",
        "definitions",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "type",
        "anyOf",
        "allOf",
        "const",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "pattern",
        "minLength",
        "maxLength",
        "format",
    }
)
# keywords that only hold subschemas: their errors are reported by the keyword inside
CONTAINERS = frozenset(
    {
        "properties",
        "patternProperties",
        "items",
        "prefixItems",
        "if",
        "then",
        "else",
        "allOf",
        "$ref",
        "$dynamicRef",
        "dependentSchemas",
    }
)


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"task.files: {path} not found; point task.files at your JSONL inputs") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path}: not UTF-8 text; task.files must be JSONL (one JSON object per line)") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(
                f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); fix or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _template_fields(template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise TaskError(
            f"task.prompt_template: {exc}; write fields as {{name}} and a literal brace as {{{{ or }}}}"
        ) from None


def _bucket(group: str) -> float:
    """A group's place in [0, 1): the same on every machine and in every run."""
    return int(hashlib.sha256(group.encode()).hexdigest()[:12], 16) / 16**12


def _answer_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class JsonlTask(TaskBase):
    # each row is the user's own input: two rows may share their right answer (a label, a record)
    dedup = "both"

    def __init__(self, cfg: Any, seed: int):
        self.cfg = cfg
        self.name, self.unit = cfg.name, cfg.unit
        if (cfg.prompt_template is None) == (cfg.prompt_field is None):
            raise TaskError("task: set exactly one of task.prompt_template and task.prompt_field")
        if cfg.split_field is None and cfg.group_field is None:
            raise TaskError(
                "task: set task.split_field (a train/validation/test column) or task.group_field (split by hash)"
            )
        if cfg.json_schema is None and cfg.regex is None and cfg.choices is None:
            raise TaskError("task: set task.json_schema, task.regex or task.choices so answers can be checked")
        self.validator = self._load_schema(cfg.json_schema) if cfg.json_schema else None
        try:
            self.pattern = re.compile(cfg.regex, re.DOTALL) if cfg.regex is not None else None
        except re.error as exc:
            raise TaskError(f"task.regex: not a valid regular expression ({exc})") from None
        self.weights = self._weights()
        self.grammar_leaves = self._leaves()
        self.reference_source = (
            f"the gold answers in column '{cfg.reference_field}' of {', '.join(map(str, cfg.files))}"
            if cfg.reference_field
            else None
        )
        self.shape = self._shape()
        self.splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for path in cfg.files:
            for number, row in _read_rows(Path(path)):
                split, example = self._example(Path(path), number, row)
                self.splits[split].append(example)

    def _shape(self) -> Labels | Records | None:
        """Labels for a list of allowed answers; a record for a schema whose answers are objects."""
        if self.cfg.choices is not None:
            return Labels(tuple(self.cfg.choices))
        schema = self.validator.schema if self.validator is not None else {}
        if isinstance(schema, dict) and (schema.get("type") == "object" or "properties" in schema):
            return Records(tuple(schema.get("properties", {})))
        return None

    def _load_schema(self, path: Path) -> Any:
        from jsonschema import SchemaError
        from jsonschema.validators import validator_for

        try:
            schema = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TaskError(f"task.json_schema: {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TaskError(
                f"{path}: the JSON Schema is not valid JSON ({exc}); task.json_schema must name a JSON file"
            ) from None
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(map(str, exc.path)) or "the top level"
            raise TaskError(f"{path}: invalid JSON Schema at {where}: {exc.message}") from None
        return cls(schema)

    def _leaves(self) -> dict[str, str]:
        """What the grammar leaves to the checks: one of choices, schema, regex makes it (in that order)."""
        if self.cfg.choices is not None:
            also = [k for k, v in (("task.json_schema", self.validator), ("task.regex", self.pattern)) if v is not None]
            return {key: "the grammar follows task.choices" for key in also}
        leaves = {}
        if self.validator is not None:
            used: set[str] = set()

            def walk(node: Any) -> None:
                if isinstance(node, dict):
                    used.update(node)
                    for key, value in node.items():
                        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
                            value = list(value.values()) if isinstance(value, dict) else value
                        if key not in ("enum", "const", "default", "examples"):
                            walk(value)
                elif isinstance(node, list):
                    for value in node:
                        walk(value)

            walk(self.validator.schema)
            for keyword in sorted(used - GRAMMAR_KEYWORDS):
                leaves[f"schema {keyword}"] = "the grammar converter has no rule for it"
            if self.pattern is not None:
                leaves["task.regex"] = "the grammar follows task.json_schema"
        return leaves

    def _weights(self) -> dict[str, float]:
        weights = {}
        if self.validator is not None:
            weights["invalid_json"] = 1.0
            keywords = set(self.validator.VALIDATORS) - CONTAINERS
            used: set[str] = set()

            def walk(node: Any) -> None:
                if isinstance(node, dict):
                    used.update(k for k in node if k in keywords)
                    for value in node.values():
                        walk(value)
                elif isinstance(node, list):
                    for value in node:
                        walk(value)

            walk(self.validator.schema)
            weights |= {f"schema_{k}": SCHEMA_WEIGHTS.get(k, OTHER_SCHEMA_WEIGHT) for k in sorted(used)}
        if self.pattern is not None:
            weights["regex_mismatch"] = 1.0
        if self.cfg.choices is not None:
            weights["not_a_choice"] = 1.0
        return weights

    def _example(self, path: Path, number: int, row: dict[str, Any]) -> tuple[str, Example]:
        c, where = self.cfg, f"{path}:{number}"

        def column(name: str, key: str) -> Any:
            if name not in row:
                raise TaskError(f"{where}: no column '{name}' ({key}); add it to every row or change {key}")
            return row[name]

        if c.prompt_template is not None:
            for field in _template_fields(c.prompt_template):
                if field not in row:
                    raise TaskError(
                        f"{where}: task.prompt_template uses {{{field}}} but the row has no '{field}'; add it or change the template"
                    )
            values = {k: _answer_text(v) for k, v in row.items()}
            prompt = c.prompt_template.format(**values)
        else:
            prompt = str(column(c.prompt_field, "task.prompt_field"))
        group = str(column(c.group_field, "task.group_field")) if c.group_field else None
        if c.split_field:
            split = column(c.split_field, "task.split_field")
            if split not in SPLITS:
                raise TaskError(f"{where}: {c.split_field}={split!r}; use one of {', '.join(SPLITS)}")
        else:
            place = _bucket(group)
            split = (
                "test"
                if place < c.test_share
                else "validation"
                if place < c.test_share + c.validation_share
                else "train"
            )
        index = len(self.splits[split])
        ex_id = str(column(c.id_field, "task.id_field")) if c.id_field else f"{split}-{index:06d}"
        reference = _answer_text(column(c.reference_field, "task.reference_field")) if c.reference_field else None
        return split, Example(id=ex_id, prompt=prompt, group=group or ex_id, payload=row, reference=reference)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def example(self, split: str, index: int) -> Example | None:
        rows = self.splits[split]
        return rows[index] if index < len(rows) else None

    def grammar(self, payload: dict[str, Any]) -> Grammar:
        return self._grammar  # one grammar for every input: the schema, expression or list is the task's

    @cached_property
    def _grammar(self) -> Grammar:
        from llama_cpp.llama_grammar import SchemaConverter

        from distill.tasks.regex_gbnf import literal, regex_gbnf

        class Converter(SchemaConverter):
            # llama.cpp's converter, with each "pattern" read by Python's regex parser as jsonschema reads it
            def visit(self, schema: Any, name: str) -> str:
                if isinstance(schema, dict) and isinstance(schema.get("type"), list):
                    # a list of types keeps its other keywords (a pattern on a nullable string)
                    rest = {k: v for k, v in schema.items() if k != "type"}
                    schema = {"anyOf": [{**rest, "type": kind} for kind in schema["type"]]}
                return super().visit(schema, name)

            def _visit_pattern(self, pattern: str, name: str) -> str:
                return self._add_rule(
                    name, f'"\\"" ({regex_gbnf(pattern, dotall=False, json_string=True)}) "\\"" space'
                )

        c = self.cfg
        if c.choices is not None:
            return Grammar(gbnf="root ::= " + " | ".join(literal(choice) for choice in c.choices) + "\n")
        key = "task.json_schema" if self.validator is not None else "task.regex"
        try:
            if self.validator is None:
                return Grammar(gbnf=f"root ::= {regex_gbnf(c.regex)}\n")
            converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            converter.visit(self.validator.schema, "")
            if "char" in converter._rules:  # the port lets raw control characters into strings; JSON does not
                converter._rules["char"] = r'[^"\\\u0000-\u001F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
            return Grammar(gbnf=converter.format_grammar(), json_schema=self.validator.schema)
        except Exception as exc:  # noqa: BLE001 - ours and the converter's, which raises bare exceptions
            raise TaskError(
                f"{key}: cannot be turned into a grammar ({exc}); simplify it, or set eval.grammar=false, "
                "serve.grammar=false and generate.grammar=false"
            ) from None

    def check(self, answer: str, payload: dict[str, Any]) -> list[Violation]:
        text = answer.strip()
        found = []
        if self.validator is not None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                found.append(Violation("invalid_json", f"{exc.msg} at line {exc.lineno}, column {exc.colno}"))
            else:
                for error in sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
                    found.append(Violation(f"schema_{error.validator}", f"{error.json_path}: {error.message}"))
        if self.pattern is not None and not self.pattern.fullmatch(text):
            found.append(Violation("regex_mismatch", f"does not match task.regex: {text[:60]!r}"))
        if self.cfg.choices is not None and text not in self.cfg.choices:
            found.append(Violation("not_a_choice", f"{text[:60]!r} is not one of task.choices"))
        return found

    def gold(self, payload: dict[str, Any]) -> str | None:
        field = self.cfg.reference_field
        return _answer_text(payload[field]) if field and field in payload else None

    def corpus(self, n: int, seed: int) -> list[str]:
        # the allowed answers too: without gold answers in the corpus, a label could be left to byte pieces
        return super().corpus(n, seed) + list(self.cfg.choices or ())
