"""Crew profiles p = (level, weekly frequency, goal, contraindications, equipment) plus role."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any

from distill.tasks.crew.catalog import CONTRAINDICATIONS, EQUIPMENT, LEVELS, TaskInputError

GOALS = ("weight_loss", "maintenance", "muscle_gain", "strength", "endurance", "back_health")
ROLES = ("pilot", "cabin_crew")
FREQUENCIES = (1, 2, 3, 4, 5, 6)
# Where crews train: the training centre's gym, a hotel gym on a layover, a hotel room, home.
ENVIRONMENTS: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {
    # name: (probability, always there, each present with probability 0.5)
    "full_gym": (0.4, EQUIPMENT, ()),
    "hotel_gym": (0.3, ("dumbbells", "bench", "treadmill", "bike", "mat"), ("cable", "band", "kettlebell")),
    "hotel_room": (0.2, ("mat",), ("band",)),
    "home": (0.1, ("dumbbells", "mat", "band"), ("pullup_bar", "kettlebell", "bench")),
}
CELLS = tuple(itertools.product(LEVELS, FREQUENCIES, GOALS, ROLES))


@dataclass(frozen=True)
class Profile:
    role: str
    level: str
    frequency: int
    goal: str
    contraindications: frozenset[str]
    equipment: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "level": self.level,
            "frequency": self.frequency,
            "goal": self.goal,
            "contraindications": sorted(self.contraindications),
            "equipment": sorted(self.equipment),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if not isinstance(data, dict):
            raise TaskInputError("profile: expected a JSON object")
        allowed = {"role": ROLES, "level": LEVELS, "goal": GOALS, "frequency": FREQUENCIES}
        for key, options in allowed.items():
            if key not in data:
                raise TaskInputError(f"profile.{key}: missing; allowed: {', '.join(map(str, options))}")
            if data[key] not in options:
                raise TaskInputError(f"profile.{key}={data[key]!r}; allowed: {', '.join(map(str, options))}")
        for key, options in (("contraindications", CONTRAINDICATIONS), ("equipment", EQUIPMENT)):
            values = data.get(key, [])
            if not isinstance(values, list) or any(v not in options for v in values):
                raise TaskInputError(f"profile.{key}={values!r}; a list of: {', '.join(options)}")
        return cls(
            role=data["role"],
            level=data["level"],
            frequency=int(data["frequency"]),
            goal=data["goal"],
            contraindications=frozenset(data.get("contraindications", [])),
            equipment=frozenset(data.get("equipment", [])),
        )

    def profile_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def sample_profile(seed: int, index: int) -> Profile:
    """Every block of 216 consecutive indices covers each level x frequency x goal x role cell once,
    in an order shuffled per seed and block; contraindications and equipment vary within cells."""
    block, offset = divmod(index, len(CELLS))
    order = list(CELLS)
    random.Random(f"cells:{seed}:{block}").shuffle(order)
    level, frequency, goal, role = order[offset]
    rng = random.Random(f"profile:{seed}:{index}")
    count = rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0]
    # Pregnancy is rarer than the musculoskeletal tags; weight it down.
    weights = [0.3 if c == "pregnancy" else 1.0 for c in CONTRAINDICATIONS]
    contra: set[str] = set()
    while len(contra) < count:
        contra.add(rng.choices(CONTRAINDICATIONS, weights=weights)[0])
    names = list(ENVIRONMENTS)
    env = rng.choices(names, weights=[ENVIRONMENTS[n][0] for n in names])[0]
    _, always, maybe = ENVIRONMENTS[env]
    equipment = set(always) | {item for item in maybe if rng.random() < 0.5}
    return Profile(role, level, frequency, goal, frozenset(contra), frozenset(equipment))
