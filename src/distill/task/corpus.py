"""Task text for training tokenizers, so token counts match what the models will really see."""

from __future__ import annotations

from distill.task.catalog import load_catalog
from distill.task.history import LoggedWorkout
from distill.task.planner import plan_program
from distill.task.profile import Profile
from distill.task.program import render_program
from distill.task.prompt import make_instance


def corpus_texts(n: int, seed: int, lang: str = "en") -> list[str]:
    """n prompts and their n reference programs, interleaved."""
    catalog = load_catalog()
    texts = []
    for index in range(n):
        inst = make_instance(seed, index, catalog, lang=lang, catalog_mode="full")
        history = [LoggedWorkout.from_dict(w) for w in inst["history"]]
        program = plan_program(Profile.from_dict(inst["profile"]), history, catalog)
        texts += [inst["prompt"], render_program(program, lang)]
    return texts
