"""Near-duplicate detection for generated examples: MinHash over word trigrams, banded LSH.

MinHash rather than ROUGE-L: ROUGE-L needs an LCS against every accepted response (quadratic, hours at
67k examples), while MinHash + LSH only compares a text with the few that share a band, and the
Jaccard similarity of candidates is then checked exactly. Programs share their format and many
exercise lines by design, so word trigrams (which include sets, reps and loads) are the unit.

What is compared depends on the task (`generate.dedup`): a generative task's answers to different inputs
should differ, while a label or an extracted record is the right answer to many inputs; there only an
example repeated (its input and its answer both near-duplicates of one accepted example's) is dropped.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from distill.tasks import Dedup

DEDUP_WORDS = {  # each mode, in words for tables and the report
    "answer": "answers",
    "input": "inputs",
    "both": "examples (input and answer together)",
    "none": "nothing",
}
PERMUTATIONS = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 Jaccard become candidates
_MERSENNE = (1 << 61) - 1
_rng = np.random.default_rng(20240601)
_A = _rng.integers(1, 1 << 31, PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, 1 << 31, PERMUTATIONS, dtype=np.uint64)
_WORD = re.compile(r"\S+")


def shingles(text: str) -> set[int]:
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams}


def signature(items: set[int]) -> np.ndarray:
    values = np.fromiter(items, dtype=np.uint64, count=len(items))
    # (a * x + b) mod p with 31-bit a, b and 32-bit x stays below 2**64.
    hashed = (np.outer(_A, values) + _B[:, None]) % _MERSENNE
    return hashed.min(axis=1)


class NearDuplicateIndex:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.sets: list[set[int]] = []

    def _bands(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        rows = PERMUTATIONS // BANDS
        return [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(BANDS)]

    def matches(self, text: str) -> set[int]:
        """Positions (in order of `add`) of the texts whose Jaccard similarity to this one reaches the threshold."""
        items = shingles(text)
        candidates = {i for key in self._bands(signature(items)) for i in self.buckets.get(key, ())}
        return {i for i in candidates if len(items & self.sets[i]) / len(items | self.sets[i]) >= self.threshold}

    def add(self, text: str) -> None:
        items = shingles(text)
        self.sets.append(items)
        for key in self._bands(signature(items)):
            self.buckets.setdefault(key, []).append(len(self.sets) - 1)


class ExampleDeduplicator:
    """Accepted examples, and whether a new one is a near-duplicate of one of them under `mode` (see
    distill.tasks.Dedup): its answer, its input, both of them against the same example, or never."""

    def __init__(self, mode: Dedup, threshold: float):
        self.mode = mode
        self.inputs = NearDuplicateIndex(threshold) if mode in ("input", "both") else None
        self.answers = NearDuplicateIndex(threshold) if mode in ("answer", "both") else None

    def is_duplicate(self, prompt: str, answer: str) -> bool:
        found: set[int] | None = None  # accepted examples that match on everything compared so far
        for index, text in ((self.inputs, prompt), (self.answers, answer)):
            if index is not None and found != set():
                same = index.matches(text)
                found = same if found is None else found & same
        return bool(found)

    def add(self, prompt: str, answer: str) -> None:
        if self.inputs is not None:
            self.inputs.add(prompt)
        if self.answers is not None:
            self.answers.add(answer)
