"""Any OpenAI-compatible chat endpoint (a vLLM server, a fleet behind a router)."""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.tasks import Grammar
from distill.teachers import Completion

log = logging.getLogger(__name__)
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAITeacher:
    name = "openai"

    def __init__(self, cfg: PipelineConfig):
        import httpx

        self.cfg = cfg.generate.openai
        self.sampling = cfg.generate.sampling
        self.model = self.cfg.model or cfg.models.teacher
        key = os.environ.get(self.cfg.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.cfg.base_url.rstrip("/"), headers=headers, timeout=self.cfg.timeout_s)
        self.retries = 0
        try:
            self.client.get("/models", timeout=min(10.0, self.cfg.timeout_s)).raise_for_status()
        except httpx.HTTPError as exc:
            self.client.close()
            raise DistillError(
                f"generate.openai.base_url: {self.cfg.base_url} is not reachable ({type(exc).__name__}: {exc}); "
                "start the server or fix the URL"
            ) from None

    def _grammar_fields(self, grammar: Grammar | None) -> dict[str, Any]:
        if grammar is None:
            return {}
        if grammar.json_schema is not None:  # the one form every OpenAI-compatible server takes
            schema = {"name": "answer", "schema": grammar.json_schema, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": schema}}
        if self.cfg.grammar_field == "grammar":
            return {"grammar": grammar.gbnf}  # llama-server
        return {"structured_outputs": {"grammar": grammar.gbnf}}  # vLLM

    def _one(self, prompt: str, grammar: Grammar | None = None) -> Completion:
        import httpx

        s = self.sampling
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            # vLLM-specific extensions; other servers ignore unknown fields.
            "top_k": s.top_k,
            "chat_template_kwargs": {"enable_thinking": s.enable_thinking},
            **self._grammar_fields(grammar),
        }
        for attempt in range(self.cfg.max_retries + 1):
            try:
                response = self.client.post("/chat/completions", json=body)
                if response.status_code not in RETRYABLE:
                    response.raise_for_status()
                    data = response.json()
                    message = data["choices"][0]["message"]
                    # A reasoning parser may move the answer into reasoning_content; keep both so the
                    # think-stripping step sees everything the model wrote.
                    text = message.get("content") or ""
                    if message.get("reasoning_content"):
                        text = f"<think>{message['reasoning_content']}</think>{text}"
                    return Completion(text, int(data.get("usage", {}).get("completion_tokens", 0)))
                reason = f"HTTP {response.status_code}"
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                reason = type(exc).__name__
            except httpx.HTTPStatusError as exc:
                hint = (
                    "; if it takes no grammars this way, set generate.openai.grammar_field or generate.grammar=false"
                    if grammar is not None
                    else ""
                )
                raise DistillError(
                    f"generate.openai: {self.cfg.base_url} answered HTTP {exc.response.status_code}: "
                    f"{exc.response.text[:200]}{hint}"
                ) from None
            if attempt == self.cfg.max_retries:
                raise DistillError(
                    f"generate.openai: request failed {attempt + 1} times ({reason}); check the server or raise "
                    "generate.openai.max_retries"
                )
            self.retries += 1
            delay = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
            log.warning("openai: %s, retrying in %.1f s", reason, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self._one, [inst["prompt"] for inst in instances], grammars or [None] * len(instances)))

    def close(self) -> None:
        self.client.close()
