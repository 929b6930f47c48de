import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from distill.tasks import quality_score
from distill.tasks.crew.catalog import TaskInputError, load_catalog
from distill.tasks.crew.checks import CHECKS, WEIGHTS, check_program, check_program_obj
from distill.tasks.crew.history import LoggedWorkout
from distill.tasks.crew.planner import plan_program
from distill.tasks.crew.profile import CELLS, Profile, sample_profile
from distill.tasks.crew.program import (
    Prescription,
    Program,
    ProgramParseError,
    Workout,
    parse_program,
    program_from_json,
    program_to_json,
    render_line,
    render_program,
)
from distill.tasks.crew.prompt import make_instance
from distill.tasks.crew.rules import unsafe_reasons

CATALOG = load_catalog()


def instance(index: int, seed: int = 0) -> tuple[Profile, list[LoggedWorkout], Program]:
    inst = make_instance(seed, index, CATALOG)
    profile = Profile.from_dict(inst["profile"])
    history = [LoggedWorkout.from_dict(w) for w in inst["history"]]
    return profile, history, plan_program(profile, history, CATALOG)


def test_catalog_is_complete_and_valid() -> None:
    assert len(CATALOG) >= 60
    ids = [ex.id for ex in CATALOG]
    assert len(ids) == len(set(ids))
    patterns = {ex.pattern for ex in CATALOG}
    assert patterns == {"push", "pull", "legs", "core", "full-body", "cardio", "mobility"}
    assert any(ex.machine for ex in CATALOG) and any(not ex.equipment for ex in CATALOG)
    assert all(ex.name_ru and any("а" <= ch <= "я" for ch in ex.name_ru.lower()) for ex in CATALOG)


def test_broken_catalog_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.json"
    bad.write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(TaskInputError, match=rf"{bad}: exercise #1 has no key"):
        load_catalog(bad)
    bad.write_text("[{")
    with pytest.raises(TaskInputError, match="not valid JSON"):
        load_catalog(bad)
    with pytest.raises(TaskInputError, match="catalog file not found"):
        load_catalog(tmp_path / "missing.json")


def test_planner_property_1000_profiles() -> None:
    for index in range(1000):
        profile, history, program = instance(index)
        text = render_program(program)
        assert check_program(text, profile, CATALOG, history) == [], (index, profile)
        assert parse_program(text) == program
        assert parse_program(render_program(program, "ru")) == program
        assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program


def test_profile_sampler_covers_every_cell_and_is_deterministic() -> None:
    profiles = [sample_profile(7, i) for i in range(216)]
    assert {(p.level, p.frequency, p.goal, p.role) for p in profiles} == set(CELLS)
    assert profiles == [sample_profile(7, i) for i in range(216)]
    assert profiles != [sample_profile(8, i) for i in range(216)]
    assert any(p.contraindications for p in profiles) and any(not p.contraindications for p in profiles)
    assert len({p.equipment for p in profiles}) > 3


def test_profile_round_trip_and_bad_profile() -> None:
    p = sample_profile(0, 3)
    assert Profile.from_dict(p.to_dict()) == p and len(p.profile_hash()) == 16
    with pytest.raises(TaskInputError, match="profile.level='expert'"):
        Profile.from_dict({**p.to_dict(), "level": "expert"})


def test_prompt_contains_profile_and_history_in_both_languages() -> None:
    inst = make_instance(0, 5, CATALOG)
    prompt = inst["prompt"]
    profile = inst["profile"]
    assert f"- goal: {profile['goal']}" in prompt
    assert f"- sessions per week: {profile['frequency']}" in prompt
    for workout in inst["history"]:
        assert workout["exercises"][0]["exercise_id"] in prompt
    ru = make_instance(0, 5, CATALOG, lang="ru")["prompt"]
    assert "Профиль:" in ru and "Последние 5 тренировок" in ru and "Тренировка 1:" in ru
    full = make_instance(0, 5, CATALOG, catalog_mode="full")["prompt"]
    assert all(f"- {ex.id} |" in full for ex in CATALOG)


def test_history_is_written_like_the_answer_lines() -> None:
    # The answer line for an exercise done before starts exactly like its logged line: only the load changes.
    def head(line: str) -> str:
        return re.split(r" @ |, ", line)[0]

    compared = 0
    for index in range(20):
        _profile, history, program = instance(index)
        lines = make_instance(0, index, CATALOG)["prompt"].splitlines()
        logged = {
            head(line): line
            for line in lines
            if line.startswith("- ") and (", RPE " in line or line.endswith(", missed"))
        }
        assert len(logged) == len({e.exercise_id for w in history for e in w.exercises})
        for workout in program.workouts:
            for p in workout.exercises:
                answer = render_line(p)
                if head(answer) in logged:
                    compared += 1
                    last = next(e for w in reversed(history) for e in w.exercises if e.exercise_id == p.exercise_id)
                    assert logged[head(answer)].endswith(f", RPE {last.rpe}" if last.completed else ", missed")
    assert compared > 100
    ru = make_instance(0, 5, CATALOG, lang="ru")["prompt"]
    assert " кг, RPE " in ru


def test_allowed_catalog_lists_exactly_what_the_profile_may_do() -> None:
    restricted = 0
    for index in range(40):
        inst = make_instance(0, index, CATALOG, catalog_mode="allowed")
        profile = Profile.from_dict(inst["profile"])
        listed = {
            line[2:].split(" | ")[0] for line in inst["prompt"].splitlines() if line.startswith("- ") and " | " in line
        }
        assert listed == {ex.id for ex in CATALOG if not unsafe_reasons(ex, profile)}
        restricted += len(listed) < len(CATALOG)
        available = make_instance(0, index, CATALOG, catalog_mode="available")["prompt"]
        assert len(inst["prompt"]) < len(available)
    assert restricted > 30
    ru = make_instance(0, 5, CATALOG, lang="ru", catalog_mode="allowed")["prompt"]
    assert "Упражнения, доступные этому члену экипажа (id | группа):" in ru


def _find(predicate) -> tuple[Profile, list[LoggedWorkout], Program]:
    for index in range(500):
        profile, history, program = instance(index)
        if predicate(profile, history, program):
            return profile, history, program
    raise AssertionError("no instance matches")


def _replace_first(program: Program, workout: int, item: int, new: Prescription) -> Program:
    workouts = list(program.workouts)
    exercises = list(workouts[workout].exercises)
    exercises[item] = new
    workouts[workout] = replace(workouts[workout], exercises=tuple(exercises))
    return Program(tuple(workouts))


def _only(violations, check: str) -> None:
    assert violations and {v.check for v in violations} == {check}, violations


def test_each_check_fires_alone() -> None:
    profile, history, program = instance(0)
    assert check_program_obj(program, profile, CATALOG, history) == []
    first = program.workouts[0].exercises[0]

    _only(check_program("Workout 1 full_body\n- x", profile, CATALOG, history), "unparseable")
    _only(check_program_obj(Program(program.workouts[:2]), profile, CATALOG, history), "wrong_workout_count")
    _only(
        check_program_obj(
            _replace_first(program, 0, 0, replace(first, exercise_id="moon_walk")), profile, CATALOG, history
        ),
        "unknown_exercise",
    )


def test_contraindicated_exercise_fires_alone() -> None:
    def chest_slot(prog: Program) -> tuple[int, int] | None:
        return next(
            (
                (w, i)
                for w, wk in enumerate(prog.workouts)
                for i, p in enumerate(wk.exercises)
                if CATALOG[p.exercise_id].group == "chest"
            ),
            None,
        )

    profile, history, program = _find(
        lambda p, h, prog: p.contraindications == {"shoulder"} and chest_slot(prog) is not None
    )
    w, i = chest_slot(program)
    item = program.workouts[w].exercises[i]
    # push_up: chest, bodyweight, beginner — only its shoulder tag is wrong for this profile
    push_up = Prescription("push_up", item.sets, reps=item.reps, rest_s=item.rest_s)
    _only(
        check_program_obj(_replace_first(program, w, i, push_up), profile, CATALOG, history), "contraindicated_exercise"
    )


def test_equipment_level_and_dosing_checks() -> None:
    profile, history, program = _find(
        lambda p, h, prog: (
            p.level == "beginner"
            and "barbell" not in p.equipment
            and not p.contraindications
            and prog.workouts[0].focus == "full_body"
        )
    )
    w0 = program.workouts[0]
    idx, item = next((i, p) for i, p in enumerate(w0.exercises) if CATALOG[p.exercise_id].group == "posterior")
    barbell = replace(item, exercise_id="hip_thrust", load_kg=40.0)  # needs barbell + bench, intermediate
    found = {v.check for v in check_program_obj(_replace_first(program, 0, idx, barbell), profile, CATALOG, history)}
    assert found == {"unavailable_equipment", "level_too_low"}

    too_many = replace(item, sets=9)
    _only(
        check_program_obj(_replace_first(program, 0, idx, too_many), profile, CATALOG, history),
        "sets_reps_out_of_range",
    )

    twice = replace(w0, exercises=(*w0.exercises[:1], w0.exercises[0], *w0.exercises[2:]))
    violations = check_program_obj(Program((twice, *program.workouts[1:])), profile, CATALOG, history)
    assert "duplicate_exercise" in {v.check for v in violations}

    short = replace(w0, exercises=w0.exercises[:2])
    _only(check_program_obj(Program((short, *program.workouts[1:])), profile, CATALOG, history), "exercise_count")


def test_split_mismatch_and_progression() -> None:
    profile, history, program = _find(lambda p, h, prog: p.level == "intermediate" and p.frequency == 3)
    swapped = Program((program.workouts[1], program.workouts[0], program.workouts[2]))
    assert "split_mismatch" in {v.check for v in check_program_obj(swapped, profile, CATALOG, history)}
    # a chest exercise in a legs workout
    legs = next(i for i, w in enumerate(program.workouts) if w.focus == "legs")
    item = program.workouts[legs].exercises[-1]
    wrong_group = next(
        ex
        for ex in CATALOG
        if ex.group == "chest"
        and ex.unit == "reps"
        and not ex.loaded
        and ex.equipment <= profile.equipment
        and not ex.contraindications & profile.contraindications
        and ex.min_level != "advanced"
    )
    moved = replace(item, exercise_id=wrong_group.id, load_kg=None, reps=10, sets=3, seconds=None)
    found = {
        v.check
        for v in check_program_obj(
            _replace_first(program, legs, len(program.workouts[legs].exercises) - 1, moved), profile, CATALOG, history
        )
    }
    assert "split_mismatch" in found

    profile, history, program = _find(
        lambda p, h, prog: (
            any(
                e.load_kg
                and e.completed
                and e.rpe <= 8
                and e.exercise_id in {x.exercise_id for x in prog.workouts[0].exercises}
                for e in h[-1].exercises
            )
            and all(
                e.exercise_id not in {x.exercise_id for w in h[:-1] for x in w.exercises} for e in h[-1].exercises[:1]
            )
        )
    )
    last = {e.exercise_id: e for w in history for e in w.exercises}
    w0 = program.workouts[0]
    idx, item = next(
        (i, p)
        for i, p in enumerate(w0.exercises)
        if p.load_kg and last.get(p.exercise_id) and last[p.exercise_id].completed and last[p.exercise_id].rpe <= 8
    )
    regressed = replace(item, load_kg=last[item.exercise_id].load_kg - 5)
    _only(check_program_obj(_replace_first(program, 0, idx, regressed), profile, CATALOG, history), "no_progression")


def test_quality_score() -> None:
    profile, history, program = instance(1)
    assert quality_score(check_program(render_program(program), profile, CATALOG, history), WEIGHTS) == 1.0
    assert quality_score(check_program("nonsense", profile, CATALOG, history), WEIGHTS) == 0.0
    broken = Program(program.workouts[:2])
    assert 0 < quality_score(check_program_obj(broken, profile, CATALOG, history), WEIGHTS) < 1
    assert set(CHECKS) >= {
        "unparseable",
        "wrong_workout_count",
        "unknown_exercise",
        "contraindicated_exercise",
        "unavailable_equipment",
        "level_too_low",
        "sets_reps_out_of_range",
        "exercise_count",
        "split_mismatch",
        "no_progression",
    }


def test_parse_errors_name_the_line() -> None:
    with pytest.raises(ProgramParseError, match="line 2"):
        parse_program("Workout 1: push\n- bench_press: three sets")
    with pytest.raises(ProgramParseError, match="expected workout number 2"):
        parse_program("Workout 1: push\n- push_up: 3x10, rest 60 s\nWorkout 3: pull")
    program = Program((Workout("push", (Prescription("push_up", 3, reps=10, rest_s=60),)),))
    assert parse_program(render_program(program) + "  \n\n") == program


def test_pull_day_shoulder_slot_takes_a_pull_movement() -> None:
    # the case from the issue: intermediate pilot, 3/week (push/pull/legs), maintenance, lower back,
    # hotel gym with dumbbells, bench and treadmill only
    profile = Profile(
        "pilot",
        "intermediate",
        3,
        "maintenance",
        frozenset({"lower_back"}),
        frozenset({"dumbbells", "bench", "treadmill"}),
    )
    program = plan_program(profile, [], CATALOG)
    pull = next(w for w in program.workouts if w.focus == "pull")
    assert [
        CATALOG[p.exercise_id].pattern
        for p in pull.exercises
        if CATALOG[p.exercise_id].group not in ("core", "mobility")
    ] == ["pull"] * 4
    assert "dumbbell_shoulder_press" not in {p.exercise_id for p in pull.exercises}
    assert check_program_obj(program, profile, CATALOG, None) == []
    # the checks refuse the press the planner used to put there, and a face pull on a push day
    pressed = replace(
        pull, exercises=(*pull.exercises[:3], replace(pull.exercises[3], exercise_id="dumbbell_shoulder_press"))
    )
    broken = replace(program, workouts=tuple(pressed if w is pull else w for w in program.workouts))
    assert [v.detail for v in check_program_obj(broken, profile, CATALOG, None)] == [
        "workout 2: dumbbell_shoulder_press is push work, not for a pull workout"
    ]
    banded = replace(profile, equipment=profile.equipment | {"band"})
    push = next(w for w in plan_program(banded, [], CATALOG).workouts if w.focus == "push")
    with_face_pull = replace(
        push,
        exercises=(*push.exercises[:1], replace(push.exercises[1], exercise_id="band_face_pull"), *push.exercises[2:]),
    )
    assert "split_mismatch" in {v.check for v in check_program_obj(Program((with_face_pull,)), banded, CATALOG, None)}
