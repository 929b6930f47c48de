"""The program format as a per-input GBNF grammar: only what this crew member may be given can be written.

Enforced by the grammar: three workouts with the focuses the split rotation asks for next; 4-6 exercises
per workout from the ids that are safe and available for this profile and belong to that focus, each
exercise after the one before it in the catalog (the order the format asks for, and how a grammar, which
cannot remember a set, rules out a repeat); a cardio finisher exactly when the goal has one; each line's
dosing in the ranges of the goal's scheme, a load on loaded exercises only, and for an exercise in the
history the loads the progression rule allows (a finite list: one step up to +20% after an easy
session, the same load after a hard or missed one). The checks accept any order; nothing they test is
left to them.
"""

from __future__ import annotations

from distill.tasks import Grammar
from distill.tasks.crew.catalog import Catalog, Exercise
from distill.tasks.crew.history import LoggedExercise, LoggedWorkout
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import WORDS, render_load
from distill.tasks.crew.rules import (
    CARDIO_MINUTES,
    FOCUS_GROUPS,
    GOAL_SCHEMES,
    MAX_EXERCISES,
    MIN_EXERCISES,
    fits_pattern,
    progression_ok,
    scheme_for,
    unsafe_reasons,
)

LEAVES: dict[str, str] = {}
# a load as the program renders it (27, 27.5); rest in seconds
LOAD = '[1-9] [0-9]? [0-9]? ("." [1-9])?'
SECONDS = "[1-9] [0-9]? [0-9]?"


def _number(low: int, high: int) -> str:
    return "(" + " | ".join(f'"{n}"' for n in range(low, high + 1)) + ")"


def _rule_name(*parts: object) -> str:
    return "-".join(str(p).replace("_", "-") for p in parts)


def _next_loads(ex: Exercise, last: LoggedExercise) -> str:
    """Every load, as the program writes it (tenths of a kg at most), that the progression rule allows."""
    assert last.load_kg is not None
    if not last.completed or last.rpe >= 9:
        # the rule allows any lower load too; the prompt says keep it, and so does the grammar
        allowed = [render_load(last.load_kg)]
    else:
        top = int(last.load_kg * 12) + 100  # in tenths: above +20% plus the largest step
        loads = [render_load(tenths / 10) for tenths in range(1, top)]
        allowed = [text for text in loads if progression_ok(ex, last.load_kg, True, last.rpe, float(text))]
    return "(" + " | ".join(f'"{text}"' for text in allowed) + ")"


class _Rules:
    """GBNF rules by name; dosing rules are shared by every exercise that doses the same way."""

    def __init__(self, lang: str, history: list[LoggedWorkout] | None):
        self.words = WORDS[lang]
        self.rules: dict[str, str] = {}
        # each exercise's latest log, as the checks read it
        self.last = {e.exercise_id: e for w in history or [] for e in w.exercises}

    def dosing(self, ex: Exercise, goal: str) -> str:
        w = self.words
        if ex.unit == "minutes":
            name, body = "minutes", f'"1x" {_number(*CARDIO_MINUTES)} " {w["min"]}"'
        else:
            scheme = scheme_for(ex, goal)
            (s_lo, s_hi), (r_lo, r_hi) = scheme.sets, scheme.reps
            amount = f'{_number(s_lo, s_hi)} "x" {_number(r_lo, r_hi)}'
            rest = f'", {w["rest"]} " {SECONDS} " {w["s"]}"'
            if ex.unit == "seconds":
                name, body = _rule_name("hold", s_lo, s_hi, r_lo, r_hi), f'{amount} " {w["s"]}" {rest}'
            elif ex.loaded:
                last = self.last.get(ex.id)
                if last is not None and last.load_kg is not None:
                    load, name = _next_loads(ex, last), _rule_name("load", ex.id, s_lo, s_hi, r_lo, r_hi)
                else:
                    load, name = LOAD, _rule_name("loaded", s_lo, s_hi, r_lo, r_hi)
                body = f'{amount} " @ " {load} " {w["kg"]}" {rest}'
            else:
                name, body = _rule_name("reps", s_lo, s_hi, r_lo, r_hi), f"{amount} {rest}"
        self.rules.setdefault(name, body)
        return name

    def line(self, ex: Exercise, goal: str) -> str:
        """One exercise line, `\\n- id: dosing`."""
        name = _rule_name("line", ex.id)
        self.rules.setdefault(name, f'"\\n- {ex.id}: " {self.dosing(ex, goal)}')
        return name

    def ordered(self, focus: str, exercises: list[Exercise], low: int, high: int, goal: str) -> str:
        """low to high lines, each one's exercise later in `exercises` (catalog order) than the last one's.

        Rule `<focus>-<i>-<n>`: at least one more line, its exercise candidate i or a later one, n lines
        written so far. The grammar grows with candidates x lines, not with the sets they could form, and
        every program has exactly one derivation (the decoders track no ambiguous duplicates)."""
        lines = [self.line(ex, goal) for ex in exercises]

        def reachable(i: int, n: int) -> bool:  # enough candidates from i on to reach `low`
            return low - n <= len(exercises) - i

        def rest(i: int, n: int) -> str:
            if n == high or i == len(exercises) or not reachable(i, n):
                return '""'
            return f"({more(i, n)})?" if n >= low else more(i, n)

        def more(i: int, n: int) -> str:
            name = _rule_name(focus, i, n)
            if name not in self.rules:
                options = [f"{lines[i]} {rest(i + 1, n + 1)}".removesuffix(' ""')]
                if i + 1 < len(exercises) and reachable(i + 1, n):  # candidate i skipped: a later one comes
                    options.append(more(i + 1, n))
                self.rules[name] = " | ".join(options)
            return name

        return rest(0, 0)


def program_grammar(
    profile: Profile, history: list[LoggedWorkout] | None, catalog: Catalog, sequences: list[list[str]], lang: str
) -> Grammar:
    """The grammar of a program for this profile after this history, whose focuses follow one of `sequences`."""
    rules = _Rules(lang, history)
    safe = [ex for ex in catalog if not unsafe_reasons(ex, profile)]
    cardio = [ex for ex in safe if ex.group == "cardio"]
    finisher = ""
    if GOAL_SCHEMES[profile.goal].cardio_minutes is not None and cardio:
        rules.rules["cardio"] = " | ".join(rules.line(ex, profile.goal) for ex in cardio)
        finisher = " cardio"

    def workout(number: int, focus: str) -> str:
        name = _rule_name("workout", number, focus)
        if name not in rules.rules:
            main = [
                ex
                for ex in safe
                if ex.group != "cardio" and ex.group in FOCUS_GROUPS[focus] and fits_pattern(ex, focus)
            ]
            # no more lines than distinct exercises: a short list must not force a repeat
            low, high = min(MIN_EXERCISES, len(main)), min(MAX_EXERCISES, len(main))
            lines = rules.ordered(focus, main, low, high, profile.goal)
            header = ('"\\n" ' if number > 1 else "") + f'"{rules.words["workout"]} {number}: {focus}"'
            rules.rules[name] = f"{header} {lines}{finisher}"
        return name

    programs = [" ".join(workout(i, focus) for i, focus in enumerate(seq, 1)) for seq in sequences]
    root = " | ".join(dict.fromkeys(programs))
    text = "\n".join([f"root ::= {root}", *(f"{name} ::= {body}" for name, body in rules.rules.items())])
    return Grammar(gbnf=text + "\n")
