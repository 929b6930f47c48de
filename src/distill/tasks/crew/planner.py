"""The deterministic reference planner: valid programs by the rules in `rules.py`.

It is the offline teacher for demos and CI and the baseline for evaluation. Exercise choice keeps
continuity with the history (the exercises last done for the same focus come first), so loads can
progress; beginners get machines first.
"""

from __future__ import annotations

from distill.tasks.crew.catalog import Catalog, Exercise
from distill.tasks.crew.history import LEVEL_LOAD, LoggedExercise, LoggedWorkout
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import Prescription, Program, Workout
from distill.tasks.crew.rules import (
    GOAL_SCHEMES,
    load_step,
    next_focuses,
    progressed_load,
    round_load,
    scheme_for,
    select_exercises,
    unsafe_reasons,
)


def _prescribe(ex: Exercise, profile: Profile, last: LoggedExercise | None) -> Prescription:
    scheme = scheme_for(ex, profile.goal)
    if ex.unit == "seconds":
        return Prescription(ex.id, scheme.plan_sets, seconds=scheme.plan_reps, rest_s=scheme.rest_s)
    load = None
    if ex.loaded:
        step = load_step(ex)
        if last is not None and last.load_kg is not None:
            load = progressed_load(ex, last.load_kg, last.completed, last.rpe)
        else:
            load = round_load(max(step, ex.start_load_kg * LEVEL_LOAD[profile.level]), step)
    return Prescription(ex.id, scheme.plan_sets, reps=scheme.plan_reps, load_kg=load, rest_s=scheme.rest_s)


def _finisher(catalog: Catalog, profile: Profile) -> Prescription | None:
    minutes = GOAL_SCHEMES[profile.goal].cardio_minutes
    if minutes is None:
        return None
    cardio = next(ex for ex in catalog if ex.group == "cardio" and not unsafe_reasons(ex, profile))
    return Prescription(cardio.id, 1, minutes=minutes)


def plan_program(profile: Profile, history: list[LoggedWorkout], catalog: Catalog) -> Program:
    last_logs = {e.exercise_id: e for w in history for e in w.exercises}
    workouts = []
    for focus in next_focuses(profile, len(history)):
        recent = next((w for w in reversed(history) if w.focus == focus), None)
        preferred = tuple(e.exercise_id for e in recent.exercises) if recent else ()
        items = [
            _prescribe(ex, profile, last_logs.get(ex.id)) for ex in select_exercises(catalog, profile, focus, preferred)
        ]
        finisher = _finisher(catalog, profile)
        if finisher is not None:
            items.append(finisher)
        workouts.append(Workout(focus, tuple(items)))
    return Program(tuple(workouts))
