"""The response format: the next workouts as regular, line-oriented text (and JSON).

    Workout 1: push
    - chest_press_machine: 3x10 @ 27.5 kg, rest 90 s
    - push_up: 3x12, rest 90 s
    - plank: 3x30 s, rest 45 s
    - stationary_bike: 1x20 min

Russian uses "Тренировка", "кг", "отдых", "с", "мин"; focus names and exercise ids stay as they are so
that parsing needs no fuzzy matching. Exactly one of reps / seconds / minutes is set per line.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

WORDS = {
    "en": {"workout": "Workout", "kg": "kg", "rest": "rest", "s": "s", "min": "min"},
    "ru": {"workout": "Тренировка", "kg": "кг", "rest": "отдых", "s": "с", "min": "мин"},
}
_HEADER = re.compile(r"^(Workout|Тренировка) (\d+): ([a-z_]+)$")
_LINE = re.compile(
    r"^- ([a-z0-9_]+): (\d+)x(\d+)"
    r"(?:(?P<reps_tail>(?: @ (?P<load>\d+(?:\.\d+)?) (?:kg|кг))?, (?:rest|отдых) (?P<rest>\d+) (?:s|с))"
    r"|(?P<hold> (?:s|с), (?:rest|отдых) (?P<hold_rest>\d+) (?:s|с))"
    r"|(?P<cardio> (?:min|мин)))$"
)


class ProgramParseError(ValueError):
    def __init__(self, line_no: int, message: str):
        self.line_no = line_no
        super().__init__(f"line {line_no}: {message}")


@dataclass(frozen=True)
class Prescription:
    exercise_id: str
    sets: int
    reps: int | None = None
    seconds: int | None = None
    minutes: int | None = None
    load_kg: float | None = None
    rest_s: int | None = None

    @property
    def amount(self) -> int:
        return next(v for v in (self.reps, self.seconds, self.minutes) if v is not None)


@dataclass(frozen=True)
class Workout:
    focus: str
    exercises: tuple[Prescription, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Program:
    workouts: tuple[Workout, ...]


def render_load(load: float) -> str:
    return str(int(load)) if float(load).is_integer() else f"{load:.1f}"


def render_line(p: Prescription, lang: str = "en") -> str:
    w = WORDS[lang]
    if p.minutes is not None:
        return f"- {p.exercise_id}: {p.sets}x{p.minutes} {w['min']}"
    if p.seconds is not None:
        return f"- {p.exercise_id}: {p.sets}x{p.seconds} {w['s']}, {w['rest']} {p.rest_s} {w['s']}"
    load = f" @ {render_load(p.load_kg)} {w['kg']}" if p.load_kg is not None else ""
    return f"- {p.exercise_id}: {p.sets}x{p.reps}{load}, {w['rest']} {p.rest_s} {w['s']}"


def render_program(program: Program, lang: str = "en") -> str:
    lines = []
    for number, workout in enumerate(program.workouts, 1):
        lines.append(f"{WORDS[lang]['workout']} {number}: {workout.focus}")
        lines.extend(render_line(p, lang) for p in workout.exercises)
    return "\n".join(lines)


def parse_program(text: str) -> Program:
    """Strict parse of a rendered program (either language); unknown ids are left to the checks."""
    workouts: list[tuple[str, list[Prescription]]] = []
    for line_no, raw in enumerate(text.strip().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        header = _HEADER.match(line)
        if header:
            if int(header.group(2)) != len(workouts) + 1:
                raise ProgramParseError(line_no, f"expected workout number {len(workouts) + 1}, got {header.group(2)}")
            workouts.append((header.group(3), []))
            continue
        item = _LINE.match(line)
        if not item:
            raise ProgramParseError(line_no, f"expected a workout header or an exercise line, got {line[:60]!r}")
        if not workouts:
            raise ProgramParseError(line_no, "exercise line before the first workout header")
        ex_id, sets, amount = item.group(1), int(item.group(2)), int(item.group(3))
        if item.group("cardio"):
            p = Prescription(ex_id, sets, minutes=amount)
        elif item.group("hold"):
            p = Prescription(ex_id, sets, seconds=amount, rest_s=int(item.group("hold_rest")))
        else:
            load = item.group("load")
            p = Prescription(
                ex_id, sets, reps=amount, load_kg=float(load) if load else None, rest_s=int(item.group("rest"))
            )
        workouts[-1][1].append(p)
    if not workouts:
        raise ProgramParseError(1, "no 'Workout N: focus' header found")
    return Program(tuple(Workout(focus, tuple(items)) for focus, items in workouts))


def program_to_json(program: Program) -> dict[str, Any]:
    return {
        "workouts": [
            {
                "focus": w.focus,
                "exercises": [{k: v for k, v in asdict(p).items() if v is not None} for p in w.exercises],
            }
            for w in program.workouts
        ]
    }


def program_from_json(data: dict[str, Any]) -> Program:
    return Program(
        tuple(Workout(w["focus"], tuple(Prescription(**p) for p in w["exercises"])) for w in data["workouts"])
    )
