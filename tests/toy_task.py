"""A toy task for the tests, written as a user would write a `python` pack: no crew code anywhere.

Input i asks for a short note about a colour; an answer is valid when it has at most `max_words`
words, and agrees with the reference when it names the same colour.
"""

from __future__ import annotations

from typing import ClassVar

from distill.tasks import Example, Grammar, TaskBase, Violation

COLOURS = ("red", "green", "blue", "amber", "violet", "teal", "ochre", "black")
THINGS = ("kite", "door", "boat", "scarf", "lamp", "mug", "bicycle", "tent", "jacket", "kettle", "bench")


class ToyTask(TaskBase):
    name = "toy"
    unit = "note"
    agreement_titles: ClassVar[dict[str, str]] = {"same_colour": "same colour"}
    reference_source = "the toy task's own replies"

    def __init__(self, max_words: int, grammar: str | None = None):
        self.weights = {"too_long": 0.5}
        self.max_words = max_words
        self.gbnf = grammar

    def grammar(self, payload: dict) -> Grammar | None:
        return Grammar(self.gbnf) if self.gbnf is not None else None

    def example(self, split: str, index: int) -> Example | None:
        if index >= 40:
            return None
        colour = COLOURS[(index + len(split)) % len(COLOURS)]
        return Example(
            id=f"toy-{split}-{index}",
            prompt=f"Name a thing that is {colour}, in a few words.",
            group=f"{split}-{index}",
            payload={"colour": colour},
            reference=f"my {colour} {THINGS[index % len(THINGS)]} from {split} day {index}",
        )

    def check(self, answer: str, payload: dict) -> list[Violation]:
        words = answer.split()
        if len(words) > self.max_words:
            return [Violation("too_long", f"{len(words)} words, at most {self.max_words}")]
        return []

    def agreement(self, answer: str, reference: str, payload: dict) -> dict[str, float]:
        return {"same_colour": float(payload["colour"] in answer.lower())}


def make(options: dict, seed: int) -> ToyTask:
    return ToyTask(int(options.get("max_words", 50)), options.get("grammar"))


def not_a_task(options: dict, seed: int) -> object:
    return object()
