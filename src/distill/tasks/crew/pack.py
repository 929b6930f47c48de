"""The crew task behind the task interface: profile + last workouts + catalog -> the next 3 workouts.

Inputs are sampled, not read: the i-th input of a split comes from its own profile stream (seed,
split, index), so any number can be made. The group is the profile's hash, so a held-out profile
never reaches training. Reference answers come from the rule-based planner.
"""

from __future__ import annotations

from typing import Any, ClassVar

from distill.tasks import Example, Grammar, SelfInstruct, TaskError, Violation
from distill.tasks.crew.catalog import DATA_DIR, load_catalog
from distill.tasks.crew.checks import WEIGHTS, check_program
from distill.tasks.crew.corpus import corpus_texts
from distill.tasks.crew.grammar import LEAVES, program_grammar
from distill.tasks.crew.history import LoggedWorkout
from distill.tasks.crew.planner import plan_program
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import ProgramParseError, parse_program, render_program
from distill.tasks.crew.prompt import make_instance
from distill.tasks.crew.rules import next_focuses, split_for

STREAM = {"train": 0, "validation": 1, "test": 2}
STREAM_SEED_OFFSET = 7919  # held-out splits sample profiles with their own seeds

ASK = (
    "Here are requests that airline pilots and cabin crew sent to their fitness coach:\n{examples}\n"
    "Write one new request from a different crew member, in the same style: who they are, how often "
    "they can train, where, their goal and any health limits. Answer with the request only."
)
WITH_REQUEST = {
    "en": 'The crew member also writes: "{request}" Where this differs from the profile, follow the profile.',
    "ru": "Член экипажа также пишет: «{request}» Где это расходится с профилем, следуйте профилю.",
}


class CrewTask:
    name = "crew"
    unit = "program"
    weights = WEIGHTS
    agreement_titles: ClassVar[dict[str, str]] = {
        "split_match": "split = teacher",
        "exercise_overlap": "exercise overlap",
    }
    reference_source = "the crew pack's rule-based planner"
    grammar_leaves = LEAVES
    dedup = "answer"  # programs for different crew members should differ; near-identical ones are a teacher rut
    shape = None  # a program is scored by its checks and its agreement with the teacher, not against a gold label

    def __init__(self, cfg: Any, seed: int):
        self.cfg, self.seed = cfg, seed
        self.catalog = load_catalog(cfg.catalog)

    def size(self, split: str) -> int | None:
        return None

    def example(self, split: str, index: int) -> Example:
        c = self.cfg
        inst = make_instance(
            self.seed + STREAM[split] * STREAM_SEED_OFFSET,
            index,
            self.catalog,
            lang=c.language,
            catalog_mode=c.catalog_mode,
            history_len=c.history_len,
        )
        history = [LoggedWorkout.from_dict(w) for w in inst["history"]]
        program = plan_program(Profile.from_dict(inst["profile"]), history, self.catalog)
        return Example(
            id=f"s{self.seed}-{split}-{index:08d}",
            prompt=inst["prompt"],
            group=inst["profile_hash"],
            payload={"profile": inst["profile"], "history": inst["history"]},
            reference=render_program(program, c.language),
        )

    def check(self, answer: str, payload: dict[str, Any]) -> list[Violation]:
        profile, logged = self._read(payload)
        return check_program(answer, profile, self.catalog, logged)

    def grammar(self, payload: dict[str, Any]) -> Grammar:
        profile, logged = self._read(payload)
        # without a history any position of the rotation may come next, as in the checks
        starts = [len(logged)] if logged is not None else range(len(split_for(profile.level, profile.frequency)))
        sequences = [next_focuses(profile, start) for start in starts]
        return program_grammar(profile, logged, self.catalog, sequences, self.cfg.language)

    def gold(self, payload: dict[str, Any]) -> None:
        return None

    def _read(self, payload: dict[str, Any]) -> tuple[Profile, list[LoggedWorkout] | None]:
        if not isinstance(payload, dict) or "profile" not in payload:
            raise TaskError("crew payload: expected a JSON object with 'profile' (and optionally 'history')")
        history = payload.get("history")
        logged = [LoggedWorkout.from_dict(w) for w in history] if history is not None else None
        return Profile.from_dict(payload["profile"]), logged

    def agreement(self, answer: str, reference: str, payload: dict[str, Any]) -> dict[str, float]:
        try:
            ours, theirs = parse_program(answer), parse_program(reference)
        except ProgramParseError:
            return {"split_match": 0.0, "exercise_overlap": 0.0}
        mine = {p.exercise_id for w in ours.workouts for p in w.exercises}
        reference_ids = {p.exercise_id for w in theirs.workouts for p in w.exercises}
        union = mine | reference_ids
        return {
            "split_match": float([w.focus for w in ours.workouts] == [w.focus for w in theirs.workouts]),
            "exercise_overlap": len(mine & reference_ids) / len(union) if union else 1.0,
        }

    def corpus(self, n: int, seed: int) -> list[str]:
        # both languages, whatever this run's: one tokenizer serves EN and RU configs alike
        half = max(1, n // 2)
        return corpus_texts(half, seed, "en", self.catalog) + corpus_texts(half, seed + 1, "ru", self.catalog)

    def self_instruct(self) -> SelfInstruct:
        template = self.cfg.request_template or WITH_REQUEST[self.cfg.language]

        def with_request(prompt: str, request: str) -> str:
            head, _, rest = prompt.partition("\n")  # after the opening line, before the profile
            return f"{head}\n{template.format(request=request)}\n{rest}"

        return SelfInstruct(
            ask=self.cfg.request_ask or ASK, seeds=DATA_DIR / "seed_tasks.jsonl", with_request=with_request
        )
