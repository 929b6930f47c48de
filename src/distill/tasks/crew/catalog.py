"""The exercise catalog E: what crews can do in training-centre gyms, hotel gyms and hotel rooms."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distill.tasks import TaskError

DATA_DIR = Path(__file__).resolve().parent / "data"  # package data: found by a plain `pip install .` too
LEVELS = ("beginner", "intermediate", "advanced")
PATTERNS = ("push", "pull", "legs", "core", "full-body", "cardio", "mobility")
GROUPS = (
    "chest",
    "back",
    "shoulders",
    "biceps",
    "triceps",
    "quads",
    "posterior",
    "calves",
    "core",
    "cardio",
    "mobility",
)
EQUIPMENT = (
    "machines",
    "cable",
    "barbell",
    "rack",
    "bench",
    "dumbbells",
    "kettlebell",
    "pullup_bar",
    "band",
    "treadmill",
    "bike",
    "rower",
    "mat",
)
CONTRAINDICATIONS = ("lower_back", "knee", "shoulder", "wrist", "neck", "hypertension", "pregnancy")
UNITS = ("reps", "seconds", "minutes")


class TaskInputError(TaskError):
    """Unreadable task input (catalog, profile, history); the message names the file or key."""


@dataclass(frozen=True)
class Exercise:
    id: str
    name_en: str
    name_ru: str
    group: str  # primary target; decides which workouts of a split it belongs to
    muscles: tuple[str, ...]
    pattern: str
    equipment: frozenset[str]  # all of it is needed; empty = bodyweight
    min_level: str
    contraindications: frozenset[str]
    machine: bool
    unit: str  # reps, seconds (holds) or minutes (cardio)
    start_load_kg: float | None  # a beginner's first working load; None = not loaded

    @property
    def loaded(self) -> bool:
        return self.start_load_kg is not None

    def name(self, lang: str) -> str:
        return self.name_ru if lang == "ru" else self.name_en


class Catalog:
    """Exercises in file order, looked up by id."""

    def __init__(self, exercises: list[Exercise], source: str = "<memory>"):
        self.source = source
        self._by_id = {e.id: e for e in exercises}
        self.position = {e.id: i for i, e in enumerate(exercises)}  # a workout lists its exercises in this order

    def __getitem__(self, exercise_id: str) -> Exercise:
        return self._by_id[exercise_id]

    def __contains__(self, exercise_id: object) -> bool:
        return exercise_id in self._by_id

    def __iter__(self) -> Iterator[Exercise]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


def _choice(path: Path, n: int, key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise TaskInputError(f"{path}: exercise #{n} {key}={value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def _parse_exercise(path: Path, n: int, raw: object) -> Exercise:
    if not isinstance(raw, dict):
        raise TaskInputError(f"{path}: exercise #{n} is not an object")
    try:
        equipment = frozenset(_choice(path, n, "equipment", e, EQUIPMENT) for e in raw["equipment"])
        contra = frozenset(
            _choice(path, n, "contraindications", c, CONTRAINDICATIONS) for c in raw["contraindications"]
        )
        load = raw["start_load_kg"]
        if load is not None and (not isinstance(load, (int, float)) or load <= 0):
            raise TaskInputError(f"{path}: exercise #{n} start_load_kg={load!r}; use a positive number or null")
        ex_id = raw["id"]
        if not isinstance(ex_id, str) or not ex_id.replace("_", "").isalnum() or not ex_id.islower():
            raise TaskInputError(f"{path}: exercise #{n} id={ex_id!r}; use a lower-case snake_case id")
        return Exercise(
            id=ex_id,
            name_en=str(raw["name_en"]),
            name_ru=str(raw["name_ru"]),
            group=_choice(path, n, "group", raw["group"], GROUPS),
            muscles=tuple(raw["muscles"]),
            pattern=_choice(path, n, "pattern", raw["pattern"], PATTERNS),
            equipment=equipment,
            min_level=_choice(path, n, "min_level", raw["min_level"], LEVELS),
            contraindications=contra,
            machine=bool(raw["machine"]),
            unit=_choice(path, n, "unit", raw["unit"], UNITS),
            start_load_kg=None if load is None else float(load),
        )
    except KeyError as exc:
        raise TaskInputError(f"{path}: exercise #{n} has no key {exc.args[0]!r}") from None


def load_catalog(path: str | Path | None = None) -> Catalog:
    path = Path(path) if path is not None else DATA_DIR / "catalog.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskInputError(f"{path}: catalog file not found; set task.catalog to an existing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise TaskInputError(f"{path}: expected a non-empty JSON list of exercises")
    exercises = [_parse_exercise(path, n, item) for n, item in enumerate(raw, 1)]
    seen: set[str] = set()
    for ex in exercises:
        if ex.id in seen:
            raise TaskInputError(f"{path}: exercise id {ex.id!r} appears twice; ids must be unique")
        seen.add(ex.id)
    return Catalog(exercises, str(path))
