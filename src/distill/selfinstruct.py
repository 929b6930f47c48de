"""Self-Instruct bootstrapping of free-form requests, with the templates of the task pack.

Starting from the pack's seed requests, the teacher is shown k requests from the pool and asked for a
new one; a candidate joins the pool only if its ROUGE-L F-measure against every request already there
is below the threshold (0.7, as in Self-Instruct). Each task prompt then carries one request from the
pool, so the data covers how users actually ask (for the crew pack: not only the structured profile).
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.tasks import SelfInstruct, Task

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"\w+", re.UNICODE)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure on lower-cased word tokens (longest common subsequence)."""
    x, y = _TOKEN.findall(a.lower()), _TOKEN.findall(b.lower())
    if not x or not y:
        return 0.0
    previous = [0] * (len(y) + 1)
    for token in x:
        current = [0]
        for j, other in enumerate(y, 1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(x), lcs / len(y)
    return 2 * precision * recall / (precision + recall)


def load_seeds(cfg: PipelineConfig, templates: SelfInstruct) -> list[str]:
    path = cfg.generate.self_instruct.seed_tasks or templates.seeds
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DistillError(f"generate.self_instruct.seed_tasks: {path} not found") from None
    seeds = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            seeds.append(str(json.loads(line)["instruction"]))
        except (ValueError, KeyError, TypeError):
            raise DistillError(f"{path}:{number}: expected a JSON object with an 'instruction'") from None
    if len(seeds) < cfg.generate.self_instruct.in_context:
        raise DistillError(f"{path}: {len(seeds)} seed requests, fewer than generate.self_instruct.in_context")
    return seeds


def grow_pool(cfg: PipelineConfig, teacher: Any, seeds: list[str], ask: str) -> tuple[list[str], dict[str, int]]:
    """Seeds plus up to `num_requests` new requests, each below the ROUGE-L threshold to all others."""
    from distill.teachers import strip_think

    si = cfg.generate.self_instruct
    rng = random.Random(f"self-instruct:{cfg.seed}")
    pool = list(seeds)
    stats = {"asked": 0, "kept": 0, "too_similar": 0, "empty": 0}
    budget = si.num_requests * 5
    while stats["kept"] < si.num_requests and stats["asked"] < budget:
        batch = min(cfg.generate.batch_size, budget - stats["asked"])
        asks = []
        for _ in range(batch):
            shown = rng.sample(pool, si.in_context)
            asks.append({"prompt": ask.format(examples="\n".join(f"{i}. {r}" for i, r in enumerate(shown, 1)))})
        for completion in teacher.generate(asks):
            stats["asked"] += 1
            text = strip_think(completion.text)[0].strip().splitlines()
            candidate = text[0].strip() if text else ""
            if not candidate:
                stats["empty"] += 1
            elif max(rouge_l(candidate, other) for other in pool) >= si.rouge_l_max:
                stats["too_similar"] += 1
            elif stats["kept"] < si.num_requests:
                pool.append(candidate)
                stats["kept"] += 1
    return pool, stats


def request_pool(cfg: PipelineConfig, task: Task, folder: Path, teacher: Any) -> list[str]:
    """The run's pool, bootstrapped once (under a lock, so shard jobs on a shared folder agree)."""
    path = folder / "requests.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".requests.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            templates = task.self_instruct()
            pool, stats = grow_pool(cfg, teacher, load_seeds(cfg, templates), templates.ask)
            log.info(
                "self-instruct: %d new requests kept of %d asked (%d too similar)",
                stats["kept"],
                stats["asked"],
                stats["too_similar"],
            )
            tmp = path.with_suffix(".partial")
            tmp.write_text(
                "".join(json.dumps({"request": r}, ensure_ascii=False) + "\n" for r in pool), encoding="utf-8"
            )
            tmp.rename(path)
    return [json.loads(line)["request"] for line in path.read_text(encoding="utf-8").splitlines()]
