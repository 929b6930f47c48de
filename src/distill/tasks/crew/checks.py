"""Checks on a generated program: named violations and a quality score."""

from __future__ import annotations

from distill.tasks import Violation
from distill.tasks.crew.catalog import Catalog
from distill.tasks.crew.history import LoggedWorkout
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import Program, ProgramParseError, parse_program
from distill.tasks.crew.rules import (
    CARDIO_MINUTES,
    FOCUS_GROUPS,
    MAX_EXERCISES,
    MIN_EXERCISES,
    WORKOUTS,
    fits_pattern,
    next_focuses,
    progression_ok,
    scheme_for,
    split_for,
    unsafe_reasons,
)

# Weight of each check in the quality score: safety first, then structure, then dosing.
WEIGHTS = {
    "unparseable": 1.0,
    "wrong_workout_count": 0.3,
    "unknown_exercise": 0.3,
    "contraindicated_exercise": 0.4,
    "unavailable_equipment": 0.2,
    "level_too_low": 0.15,
    "duplicate_exercise": 0.1,
    "exercise_count": 0.1,
    "split_mismatch": 0.2,
    "sets_reps_out_of_range": 0.1,
    "no_progression": 0.1,
}
CHECKS = tuple(WEIGHTS)


def check_program(
    text: str, profile: Profile, catalog: Catalog, history: list[LoggedWorkout] | None = None
) -> list[Violation]:
    try:
        program = parse_program(text)
    except ProgramParseError as exc:
        return [Violation("unparseable", str(exc))]
    return check_program_obj(program, profile, catalog, history)


def _expected_focuses(profile: Profile, history: list[LoggedWorkout] | None) -> list[list[str]]:
    """With a history the rotation position is known; without one any position of the split is fine."""
    if history is not None:
        return [next_focuses(profile, len(history))]
    return [next_focuses(profile, start) for start in range(len(split_for(profile.level, profile.frequency)))]


def check_program_obj(
    program: Program, profile: Profile, catalog: Catalog, history: list[LoggedWorkout] | None = None
) -> list[Violation]:
    found: list[Violation] = []
    if len(program.workouts) != WORKOUTS:
        found.append(Violation("wrong_workout_count", f"{len(program.workouts)} workouts, expected {WORKOUTS}"))
    focuses = [w.focus for w in program.workouts]
    expected = _expected_focuses(profile, history)
    if len(program.workouts) == WORKOUTS and focuses not in expected:
        found.append(
            Violation(
                "split_mismatch",
                f"focuses {focuses}, expected {expected[0]} for {profile.level} {profile.frequency}/week",
            )
        )
    last_logs = {e.exercise_id: e for w in history or [] for e in w.exercises}

    for number, workout in enumerate(program.workouts, 1):
        where = f"workout {number}"
        allowed = FOCUS_GROUPS.get(workout.focus)
        if allowed is None:
            found.append(Violation("split_mismatch", f"{where}: unknown focus {workout.focus!r}"))
        seen: set[str] = set()
        main = cardio = 0
        for p in workout.exercises:
            if p.exercise_id not in catalog:
                found.append(Violation("unknown_exercise", f"{where}: {p.exercise_id!r} is not in the catalog"))
                continue
            ex = catalog[p.exercise_id]
            if ex.id in seen:
                found.append(Violation("duplicate_exercise", f"{where}: {ex.id} appears twice"))
            seen.add(ex.id)
            for reason in unsafe_reasons(ex, profile):
                detail = {
                    "contraindicated_exercise": f"{ex.id} is contraindicated with {', '.join(sorted(ex.contraindications & profile.contraindications))}",
                    "unavailable_equipment": f"{ex.id} needs {', '.join(sorted(ex.equipment - profile.equipment))}",
                    "level_too_low": f"{ex.id} needs level {ex.min_level}, profile is {profile.level}",
                }[reason]
                found.append(Violation(reason, f"{where}: {detail}"))
            if ex.group == "cardio":
                cardio += 1
            else:
                main += 1
                if allowed is not None and ex.group not in allowed:
                    found.append(
                        Violation(
                            "split_mismatch",
                            f"{where}: {ex.id} ({ex.group}) does not belong in a {workout.focus} workout",
                        )
                    )
                elif not fits_pattern(ex, workout.focus):
                    found.append(
                        Violation(
                            "split_mismatch",
                            f"{where}: {ex.id} is {ex.pattern} work, not for a {workout.focus} workout",
                        )
                    )
            found.extend(
                Violation("sets_reps_out_of_range", f"{where}: {msg}") for msg in _dosing_problems(p, ex, profile.goal)
            )
            last = last_logs.get(ex.id)
            known = last is not None and last.load_kg is not None and p.load_kg is not None
            if known and not progression_ok(ex, last.load_kg, last.completed, last.rpe, p.load_kg):
                state = f"completed at RPE {last.rpe}" if last.completed else "not completed"
                found.append(
                    Violation(
                        "no_progression", f"{where}: {ex.id} {last.load_kg} kg last time ({state}) -> {p.load_kg} kg"
                    )
                )
        if not MIN_EXERCISES <= main <= MAX_EXERCISES or cardio > 1:
            found.append(
                Violation(
                    "exercise_count",
                    f"{where}: {main} exercises and {cardio} cardio; expected {MIN_EXERCISES}-{MAX_EXERCISES} and at most 1",
                )
            )
    return found


def _dosing_problems(p, ex, goal: str) -> list[str]:
    unit = "minutes" if p.minutes is not None else "seconds" if p.seconds is not None else "reps"
    if unit != ex.unit:
        return [f"{ex.id} is measured in {ex.unit}, got {unit}"]
    if unit == "minutes":
        low, high = CARDIO_MINUTES
        ok = p.sets == 1 and low <= p.minutes <= high
        return [] if ok else [f"{ex.id}: {p.sets}x{p.minutes} min, expected 1x{low}-{high} min"]
    scheme = scheme_for(ex, goal)
    (s_lo, s_hi), (r_lo, r_hi) = scheme.sets, scheme.reps
    if s_lo <= p.sets <= s_hi and r_lo <= p.amount <= r_hi:
        return []
    return [f"{ex.id}: {p.sets}x{p.amount}, expected {s_lo}-{s_hi} x {r_lo}-{r_hi} for {goal}"]
