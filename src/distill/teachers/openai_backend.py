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
from distill.kd import TokenLogprobs
from distill.tasks import Grammar, Task
from distill.teachers import Completion

log = logging.getLogger(__name__)
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAITeacher:
    name = "openai"

    def __init__(self, cfg: PipelineConfig, task: Task):
        import httpx

        self.cfg = cfg.generate.openai
        self.sampling = cfg.generate.sampling
        self.model = self.cfg.model or cfg.models.teacher
        key = os.environ.get(self.cfg.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.cfg.base_url.rstrip("/"), headers=headers, timeout=self.cfg.timeout_s)
        self.retries = 0
        self.top_k = cfg.generate.logprobs
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
        if self.top_k:
            # token ids, not their text, are what the aligner reads (vLLM's extension; llama-server adds an "id")
            body |= {"logprobs": True, "top_logprobs": self.top_k, "return_tokens_as_token_ids": True}
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
                    tokens = int(data.get("usage", {}).get("completion_tokens", 0))
                    return Completion(text, tokens, self._logprobs(data["choices"][0]) if self.top_k else None)
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

    def _logprobs(self, choice: dict[str, Any]) -> TokenLogprobs:
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            raise DistillError(
                f"generate.logprobs: {self.cfg.base_url} returned no log-probabilities; serve the teacher with vLLM "
                "(or another server that honours `logprobs`/`top_logprobs`), or set generate.logprobs=0"
            )
        ids, top_ids, top_values = [], [], []
        for step in content:
            ids.append(self._token_id(step))
            # not always in falling order (vLLM may list the sampled token first); JSON has no -inf, so vLLM
            # writes -9999 for a token the grammar forbids
            ranked = sorted(
                ((float(c["logprob"]), self._token_id(c)) for c in step.get("top_logprobs", [])), reverse=True
            )[: self.top_k]
            top_ids.append([token for _, token in ranked])
            top_values.append([value if value > -9999 else float("-inf") for value, _ in ranked])
        return TokenLogprobs(ids, top_ids, top_values)

    def _token_id(self, entry: dict[str, Any]) -> int:
        if isinstance(entry.get("id"), int):
            return entry["id"]
        token = str(entry.get("token", ""))
        if token.startswith("token_id:") and token[9:].isdigit():
            return int(token[9:])
        raise DistillError(
            f"generate.logprobs: {self.cfg.base_url} names tokens by their text ({token!r}), not their ids; the "
            "distribution needs ids (vLLM's return_tokens_as_token_ids); serve the teacher with vLLM or set "
            "generate.logprobs=0"
        )

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(
                pool.map(self._one, [inst["prompt"] for inst in instances], grammars or [None] * len(instances))
            )

    def close(self) -> None:
        self.client.close()
