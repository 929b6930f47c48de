"""The coaching rules shared by the planner, the checks, the prompt and the history model.

Split by level and weekly frequency (a rotation; the next workouts continue it after the logged ones):

| level        | 1/week    | 2/week      | 3/week                       | 4/week      | 5-6/week                          |
|--------------|-----------|-------------|------------------------------|-------------|-----------------------------------|
| beginner     | full body | full body   | full body                    | upper/lower | upper/lower                       |
| intermediate | full body | full body   | push / pull / legs           | upper/lower | push / pull / legs                |
| advanced     | full body | upper/lower | chest / back / shoulders+arms| chest / back / legs / shoulders+arms (4-6) |

Beginners' full-body sessions are built on machines where the gym has them (the published rule for
1/week); loads progress from the history: an exercise completed at RPE <= 8 goes up one step, one that
was missed or felt at RPE >= 9 stays where it was.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from distill.tasks.crew.catalog import LEVELS, Catalog, Exercise
from distill.tasks.crew.profile import Profile

FOCUS_SLOTS: dict[str, tuple[str, ...]] = {
    "full_body": ("quads", "back", "chest", "posterior", "core"),
    "upper": ("chest", "back", "shoulders", "biceps", "triceps"),
    "lower": ("quads", "posterior", "quads", "calves", "core"),
    "push": ("chest", "shoulders", "chest", "triceps", "core"),
    "pull": ("back", "back", "biceps", "shoulders", "core"),
    "legs": ("quads", "posterior", "quads", "calves", "core"),
    "chest": ("chest", "chest", "chest", "triceps", "core"),
    "back": ("back", "back", "back", "biceps", "core"),
    "shoulders_arms": ("shoulders", "shoulders", "biceps", "triceps", "core"),
}
# Mobility fills a slot when nothing safe and available is left; cardio only closes a session.
ACCESSORY_GROUPS = frozenset({"mobility"})
FOCUS_GROUPS: dict[str, frozenset[str]] = {
    focus: frozenset(slots) | ACCESSORY_GROUPS for focus, slots in FOCUS_SLOTS.items()
}
FOCUS_GROUPS["full_body"] |= {"shoulders", "calves"}
FOCUS_GROUPS["pull"] |= {"posterior"}
# Push and pull days split the upper body by movement, not only by muscle: a shoulder press is push
# work and a face pull is pull work, so the shoulder slot of a pull day takes a face pull or a rear-delt
# fly (the paper's pull day: rows, pulldown, face pull, curls), never a press.
FOCUS_PATTERN = {"push": "push", "pull": "pull"}
UPPER_GROUPS = frozenset({"chest", "back", "shoulders", "biceps", "triceps"})
MIN_EXERCISES, MAX_EXERCISES = 4, 6
WORKOUTS = 3


def fits_pattern(exercise: Exercise, focus: str) -> bool:
    """An upper-body exercise in a push or pull workout must move that way."""
    pattern = FOCUS_PATTERN.get(focus)
    return pattern is None or exercise.group not in UPPER_GROUPS or exercise.pattern == pattern


def split_for(level: str, frequency: int) -> tuple[str, ...]:
    if level == "beginner":
        return ("full_body",) if frequency <= 3 else ("upper", "lower")
    if level == "intermediate":
        if frequency <= 2:
            return ("full_body",)
        return ("upper", "lower") if frequency == 4 else ("push", "pull", "legs")
    if frequency == 1:
        return ("full_body",)
    if frequency == 2:
        return ("upper", "lower")
    if frequency == 3:
        return ("chest", "back", "shoulders_arms")
    return ("chest", "back", "legs", "shoulders_arms")


def next_focuses(profile: Profile, logged: int, count: int = WORKOUTS) -> list[str]:
    """The rotation continued after `logged` workouts."""
    rotation = split_for(profile.level, profile.frequency)
    return [rotation[(logged + i) % len(rotation)] for i in range(count)]


@dataclass(frozen=True)
class Scheme:
    """Allowed and planned dosing for one goal."""

    sets: tuple[int, int]
    reps: tuple[int, int]
    rest_s: int
    plan_sets: int
    plan_reps: int
    cardio_minutes: int | None  # a cardio finisher of this length, or none


GOAL_SCHEMES: dict[str, Scheme] = {
    "strength": Scheme((3, 5), (3, 6), 180, 4, 5, None),
    "muscle_gain": Scheme((3, 4), (8, 12), 90, 3, 10, None),
    "weight_loss": Scheme((2, 4), (12, 15), 60, 3, 12, 20),
    "endurance": Scheme((2, 3), (15, 20), 45, 2, 15, 25),
    "maintenance": Scheme((2, 3), (8, 12), 75, 3, 10, None),
    "back_health": Scheme((2, 3), (10, 15), 60, 2, 12, None),
}
# Core and mobility work keeps its own ranges whatever the goal: 4 x 5 dead bugs is not strength work.
CORE_REPS = Scheme((2, 4), (8, 20), 45, 3, 12, None)
MOBILITY_REPS = Scheme((1, 3), (5, 15), 30, 2, 10, None)
HOLD = Scheme((2, 4), (20, 60), 45, 3, 30, None)  # reps = seconds held
CARDIO_MINUTES = (10, 30)


def scheme_for(exercise: Exercise, goal: str) -> Scheme:
    if exercise.unit == "seconds":
        return HOLD
    if exercise.group == "mobility":
        return MOBILITY_REPS
    if exercise.group == "core":
        return CORE_REPS
    return GOAL_SCHEMES[goal]


def level_rank(level: str) -> int:
    return LEVELS.index(level)


def unsafe_reasons(exercise: Exercise, profile: Profile) -> list[str]:
    """Why this exercise must not be prescribed to this profile (empty = fine)."""
    reasons = []
    if exercise.contraindications & profile.contraindications:
        reasons.append("contraindicated_exercise")
    if not exercise.equipment <= profile.equipment:
        reasons.append("unavailable_equipment")
    if level_rank(exercise.min_level) > level_rank(profile.level):
        reasons.append("level_too_low")
    return reasons


def load_step(exercise: Exercise) -> float:
    """The smallest realistic load increase: plates on bars and stacks, the next pair of dumbbells."""
    if "kettlebell" in exercise.equipment:
        return 4.0
    if "dumbbells" in exercise.equipment:
        return 1.0
    return 2.5


def round_load(value: float, step: float) -> float:
    return round(round(value / step) * step, 1)


def progressed_load(exercise: Exercise, last_load: float, completed: bool, rpe: int) -> float:
    """Next load after a logged session: one step (or ~5%) up after an easy completed one, else the same."""
    if not completed or rpe >= 9:
        return last_load
    step = load_step(exercise)
    return round_load(last_load + max(step, last_load * 0.05), step)


def progression_ok(exercise: Exercise, last_load: float, completed: bool, rpe: int, new_load: float) -> bool:
    """Up after an easy completed session, never more than ~20% at once; not up after a hard or missed one."""
    if not completed or rpe >= 9:
        return new_load <= last_load
    return last_load < new_load <= last_load * 1.2 + load_step(exercise)


def select_exercises(
    catalog: Catalog, profile: Profile, focus: str, preferred: tuple[str, ...], rng: random.Random | None = None
) -> list[Exercise]:
    """One safe, available exercise per slot of the focus, moving the way the focus does (no press on a
    pull day); a slot with nothing left borrows from the focus's other groups, then from mobility work,
    which needs nothing and suits everyone. Listed in catalog order, as the answer format asks."""
    safe = [ex for ex in catalog if not unsafe_reasons(ex, profile) and fits_pattern(ex, focus)]
    if rng is not None:
        rng.shuffle(safe)
    rank = {ex_id: i for i, ex_id in enumerate(preferred)}
    beginner = profile.level == "beginner"
    safe.sort(key=lambda ex: (rank.get(ex.id, len(rank)), not (beginner and ex.machine)))
    slots = FOCUS_SLOTS[focus]
    chosen: list[Exercise] = []
    for group in slots:
        for candidate_group in (group, *dict.fromkeys(slots), "mobility"):
            pick = next((ex for ex in safe if ex.group == candidate_group and ex not in chosen), None)
            if pick is not None:
                chosen.append(pick)
                break
    return sorted(chosen, key=lambda ex: catalog.position[ex.id])
