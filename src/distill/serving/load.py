"""The load generator: held-out requests streamed at a swept concurrency, measured the way
`vllm bench serve` reports (TTFT, time per output token, end-to-end latency at p50/p95/p99), plus
goodput (answers the task's checks accept *and* that finish within the SLO) and capacity."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError
from distill.serving.fleet import SERVED_NAME

PERCENTILES = (50, 95, 99)
# A level meets the SLO when this share of its requests finishes within serve.slo_ms.
SLO_QUANTILE = 95


@dataclass(frozen=True)
class Outcome:
    ttft_s: float
    e2e_s: float
    tokens: int
    valid: bool

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; undefined for one-token answers."""
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value, never interpolated)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(1000 * percentile(values, q), 2) for q in PERCENTILES}


def summarize(outcomes: list[Outcome], wall_s: float, concurrency: int, slo_ms: float) -> dict[str, Any]:
    """One concurrency level's numbers; goodput counts answers both valid and within the SLO."""
    e2e = [o.e2e_s for o in outcomes]
    within = [o for o in outcomes if o.e2e_s * 1000 <= slo_ms]
    tokens = sum(o.tokens for o in outcomes)
    e2e_ms = _ms(e2e)
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "wall_s": round(wall_s, 3),
        "ttft_ms": _ms([o.ttft_s for o in outcomes]),
        "tpot_ms": _ms([o.tpot_s for o in outcomes if o.tpot_s is not None]),
        "e2e_ms": e2e_ms,
        "requests_per_s": round(len(outcomes) / wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 1),
        "completion_tokens": tokens,
        "valid_share": round(sum(o.valid for o in outcomes) / len(outcomes), 4),
        "within_slo_share": round(len(within) / len(outcomes), 4),
        "goodput_per_s": round(sum(o.valid for o in within) / wall_s, 3),
        "meets_slo": e2e_ms[f"p{SLO_QUANTILE}"] <= slo_ms,
    }


def capacity(levels: list[dict[str, Any]]) -> int:
    """The most concurrent users served within the SLO (0: not even one)."""
    return max((lv["concurrency"] for lv in levels if lv["meets_slo"]), default=0)


def stream_chat(
    client: Any, base_url: str, prompt: str, max_tokens: int, timeout: float, fields: dict[str, Any] | None = None
) -> tuple[str, float, float, int]:
    """One streamed chat completion: (text, TTFT s, end-to-end s, completion tokens); `fields` join the
    body (the answer's grammar)."""
    body = {
        **(fields or {}),
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise DistillError(f"serve: {base_url} answered HTTP {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - start
                    parts.append(piece)
    e2e = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else len(parts)
    return "".join(parts), first if first is not None else e2e, e2e, tokens


def drive(
    urls: list[str],
    requests: list[dict[str, Any]],
    concurrency: int,
    max_tokens: int,
    timeout: float,
    check: Callable[[str, dict[str, Any]], bool],
    slo_ms: float,
    tick: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Send every request once, request i to server i mod len(urls), `concurrency` in flight; `tick` runs
    every 0.2 s meanwhile (memory and metrics sampling). A request is {prompt, payload, fields?}."""
    import httpx

    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tick()
            done.wait(0.2)

    def one(i: int) -> Outcome:
        req = requests[i]
        text, ttft, e2e, tokens = stream_chat(
            client, urls[i % len(urls)], req["prompt"], max_tokens, timeout, req.get("fields")
        )
        return Outcome(ttft, e2e, tokens, check(text, req["payload"]))

    client = httpx.Client(limits=httpx.Limits(max_connections=concurrency + 2))
    sampler = threading.Thread(target=sample, daemon=True)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    sampler.start()
    start = time.perf_counter()
    try:
        outcomes = [future.result() for future in [pool.submit(one, i) for i in range(len(requests))]]
    finally:
        # On an interrupt, queued requests are dropped and the caller stops the servers, which ends the
        # ones in flight; waiting here for them would hold the servers up.
        pool.shutdown(wait=False, cancel_futures=True)
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    client.close()
    tick()  # the state the load left behind (cumulative server metrics), however short the level was
    return summarize(outcomes, wall, concurrency, slo_ms)
