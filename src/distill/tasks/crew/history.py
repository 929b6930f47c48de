"""The last workouts H = {w1..w5}: what the crew member actually did, consistent with the profile."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from distill.tasks.crew.catalog import Catalog, TaskInputError
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.rules import GOAL_SCHEMES, load_step, next_focuses, round_load, scheme_for, select_exercises


@dataclass(frozen=True)
class LoggedExercise:
    exercise_id: str
    sets: int
    reps: int  # seconds for holds, minutes for cardio
    load_kg: float | None
    completed: bool
    rpe: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoggedWorkout:
    day: int
    focus: str
    exercises: tuple[LoggedExercise, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, "focus": self.focus, "exercises": [e.to_dict() for e in self.exercises]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoggedWorkout:
        try:
            return cls(
                day=int(data["day"]),
                focus=str(data["focus"]),
                exercises=tuple(LoggedExercise(**e) for e in data["exercises"]),
            )
        except (KeyError, TypeError) as exc:
            raise TaskInputError(f"history: malformed logged workout ({exc})") from None


LEVEL_LOAD = {"beginner": 1.0, "intermediate": 1.4, "advanced": 1.8}


def sample_history(profile: Profile, catalog: Catalog, seed: int, index: int, n: int = 5) -> list[LoggedWorkout]:
    """n past sessions following the profile's split, with loads rising over time, the odd missed
    set and RPE 5-10. Exercise choice varies by seed so histories differ between crew members."""
    rng = random.Random(f"history:{seed}:{index}")
    days_between = max(1, 7 // profile.frequency)
    loads: dict[str, float] = {}
    workouts = []
    for number, focus in enumerate(next_focuses(profile, 0, n)):
        chosen = select_exercises(catalog, profile, focus, preferred=(), rng=rng)
        logged = []
        for ex in chosen:
            scheme = scheme_for(ex, profile.goal)
            completed = rng.random() < 0.85
            rpe = rng.randint(5, 8) if completed else rng.randint(8, 10)
            if ex.unit == "minutes":
                amount, sets = GOAL_SCHEMES[profile.goal].cardio_minutes or 15, 1
            else:
                amount, sets = scheme.plan_reps, scheme.plan_sets
            load = None
            if ex.loaded:
                step = load_step(ex)
                start = ex.start_load_kg * LEVEL_LOAD[profile.level] * rng.uniform(0.8, 1.2)
                load = loads.get(ex.id, round_load(max(step, start), step))
                loads[ex.id] = round_load(load + step, step) if completed and rpe <= 8 else load
            logged.append(LoggedExercise(ex.id, sets, amount, load, completed, rpe))
        workouts.append(LoggedWorkout(day=1 + number * days_between, focus=focus, exercises=tuple(logged)))
    return workouts
