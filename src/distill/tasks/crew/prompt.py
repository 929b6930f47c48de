"""The teacher instruction: profile + last workouts + catalog + the rules and the answer format."""

from __future__ import annotations

from typing import Any

from distill.tasks.crew.catalog import Catalog
from distill.tasks.crew.history import LoggedWorkout, sample_history
from distill.tasks.crew.profile import Profile, sample_profile
from distill.tasks.crew.program import WORDS
from distill.tasks.crew.rules import (
    CORE_REPS,
    GOAL_SCHEMES,
    HOLD,
    MAX_EXERCISES,
    MIN_EXERCISES,
    WORKOUTS,
    next_focuses,
    split_for,
    unsafe_reasons,
)

TEXT = {
    "en": {
        "intro": "You are a strength and conditioning coach for airline crews. Plan the next {n} workouts for this crew member.",
        "profile": "Profile:",
        "fields": ("role", "level", "sessions per week", "goal", "contraindications", "equipment"),
        "none": "none",
        "bodyweight": "bodyweight only",
        "history": "Last {n} workouts (oldest first):",
        "missed": "missed",
        "catalog": "Exercise catalog (id | group | equipment | min level | avoid with):",
        "allowed": "Exercises this crew member may do (id | group):",
        "rules": (
            "Rules: split for this level and frequency: {split}; the next {n} workouts are: {next}. "
            "{lo}-{hi} different exercises per workout from the workout's muscle groups, in catalog order{cardio}. "
            "Sets x reps for {goal}: {sets} x {reps}; core {core}; holds {hold} s. "
            "Never use an exercise that is contraindicated, needs missing equipment or a higher level. "
            "Progress the load one step after a session done at RPE 8 or less; keep it after a missed or RPE 9+ session."
        ),
        "cardio": ", then one cardio finisher of {m} min",
        "format": "Answer with the program only, in exactly this format:",
        "example": (
            "Workout 1: <focus>",
            "- <exercise_id>: <sets>x<reps> @ <load> kg, rest <seconds> s",
            "- <exercise_id>: <sets>x<reps>, rest <seconds> s",
            "- <exercise_id>: <sets>x<seconds> s, rest <seconds> s",
            "- <exercise_id>: 1x<minutes> min",
        ),
    },
    "ru": {
        "intro": "Вы тренер по физической подготовке лётного и кабинного экипажа. Составьте следующие {n} тренировки для этого члена экипажа.",
        "profile": "Профиль:",
        "fields": ("должность", "уровень", "тренировок в неделю", "цель", "противопоказания", "оборудование"),
        "none": "нет",
        "bodyweight": "только собственный вес",
        "history": "Последние {n} тренировок (от старых к новым):",
        "missed": "не выполнено",
        "catalog": "Каталог упражнений (id | группа | оборудование | мин. уровень | нельзя при):",
        "allowed": "Упражнения, доступные этому члену экипажа (id | группа):",
        "rules": (
            "Правила: сплит для этого уровня и частоты: {split}; следующие {n} тренировки: {next}. "
            "{lo}-{hi} разных упражнений на тренировку из мышечных групп тренировки, в порядке каталога{cardio}. "
            "Подходы x повторения для цели {goal}: {sets} x {reps}; кор {core}; статика {hold} с. "
            "Никогда не назначайте упражнение с противопоказанием, без нужного оборудования или выше уровня. "
            "Повышайте вес на шаг после тренировки с RPE 8 и ниже; оставляйте вес после невыполненной или с RPE 9+."
        ),
        "cardio": ", затем одно кардио на {m} мин",
        "format": "Ответьте только программой, строго в таком формате:",
        "example": (
            "Тренировка 1: <focus>",
            "- <exercise_id>: <подходы>x<повторения> @ <вес> кг, отдых <секунды> с",
            "- <exercise_id>: <подходы>x<повторения>, отдых <секунды> с",
            "- <exercise_id>: <подходы>x<секунды> с, отдых <секунды> с",
            "- <exercise_id>: 1x<минуты> мин",
        ),
    },
}
ROLE_NAMES = {
    "en": {"pilot": "pilot", "cabin_crew": "cabin crew"},
    "ru": {"pilot": "пилот", "cabin_crew": "бортпроводник"},
}


def _span(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}-{bounds[1]}"


def _history_lines(number: int, workout: LoggedWorkout, catalog: Catalog, lang: str) -> list[str]:
    # Each logged exercise is written like the answer's line for it, so the answer repeats a line's
    # prefix and changes the load, instead of re-formatting the whole entry.
    t, w = TEXT[lang], WORDS[lang]
    lines = [f"{number}. {workout.focus}:"]
    for e in workout.exercises:
        unit = catalog[e.exercise_id].unit if e.exercise_id in catalog else "reps"
        amount = f"{e.sets}x{e.reps}" + {"reps": "", "seconds": f" {w['s']}", "minutes": f" {w['min']}"}[unit]
        load = f" @ {e.load_kg:g} {w['kg']}" if e.load_kg is not None else ""
        lines.append(f"- {e.exercise_id}: {amount}{load}, " + (f"RPE {e.rpe}" if e.completed else t["missed"]))
    return lines


def render_prompt(
    profile: Profile, history: list[LoggedWorkout], catalog: Catalog, lang: str = "en", catalog_mode: str = "available"
) -> str:
    t = TEXT[lang]
    values = (
        ROLE_NAMES[lang][profile.role],
        profile.level,
        str(profile.frequency),
        profile.goal,
        ", ".join(sorted(profile.contraindications)) or t["none"],
        ", ".join(sorted(profile.equipment)) or t["bodyweight"],
    )
    lines = [t["intro"].format(n=WORKOUTS), "", t["profile"]]
    lines += [f"- {name}: {value}" for name, value in zip(t["fields"], values)]
    lines += ["", t["history"].format(n=len(history))]
    for i, workout in enumerate(history, 1):
        lines += _history_lines(i, workout, catalog, lang)
    lines += ["", t["allowed" if catalog_mode == "allowed" else "catalog"]]
    for ex in catalog:
        if catalog_mode == "allowed":
            # the coach's filtering done up front: the other columns would say nothing new
            if not unsafe_reasons(ex, profile):
                lines.append(f"- {ex.id} | {ex.group}")
            continue
        if catalog_mode == "available" and not ex.equipment <= profile.equipment:
            continue
        equipment = ",".join(sorted(ex.equipment)) or "-"
        avoid = ",".join(sorted(ex.contraindications)) or "-"
        lines.append(f"- {ex.id} | {ex.group} | {equipment} | {ex.min_level} | {avoid}")
    scheme = GOAL_SCHEMES[profile.goal]
    cardio = t["cardio"].format(m=scheme.cardio_minutes) if scheme.cardio_minutes else ""
    rules = t["rules"].format(
        split=" / ".join(split_for(profile.level, profile.frequency)),
        n=WORKOUTS,
        next=", ".join(next_focuses(profile, len(history))),
        lo=MIN_EXERCISES,
        hi=MAX_EXERCISES,
        cardio=cardio,
        goal=profile.goal,
        sets=_span(scheme.sets),
        reps=_span(scheme.reps),
        core=f"{_span(CORE_REPS.sets)} x {_span(CORE_REPS.reps)}",
        hold=_span(HOLD.reps),
    )
    lines += ["", rules, "", t["format"], *t["example"]]
    return "\n".join(lines)


def make_instance(
    seed: int, index: int, catalog: Catalog, lang: str = "en", catalog_mode: str = "available", history_len: int = 5
) -> dict[str, Any]:
    """One task instance, deterministic from (seed, index)."""
    profile = sample_profile(seed, index)
    history = sample_history(profile, catalog, seed, index, history_len)
    return {
        "index": index,
        "profile": profile.to_dict(),
        "profile_hash": profile.profile_hash(),
        "history": [w.to_dict() for w in history],
        "prompt": render_prompt(profile, history, catalog, lang, catalog_mode),
    }
