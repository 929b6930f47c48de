"""Task text for training tokenizers, so token counts match what the models will really see."""

from __future__ import annotations

from distill.tasks.crew.catalog import Catalog
from distill.tasks.crew.history import LoggedWorkout
from distill.tasks.crew.planner import plan_program
from distill.tasks.crew.profile import Profile
from distill.tasks.crew.program import render_program
from distill.tasks.crew.prompt import make_instance


def corpus_texts(n: int, seed: int, lang: str, catalog: Catalog) -> list[str]:
    """n prompts and their n reference programs, interleaved."""
    texts = []
    for index in range(n):
        inst = make_instance(seed, index, catalog, lang=lang, catalog_mode="full")
        history = [LoggedWorkout.from_dict(w) for w in inst["history"]]
        program = plan_program(Profile.from_dict(inst["profile"]), history, catalog)
        texts += [inst["prompt"], render_program(program, lang)]
    return texts
