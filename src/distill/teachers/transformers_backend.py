"""Batched `model.generate` for machines without vLLM."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.kd import TokenLogprobs
from distill.tasks import Grammar, Task
from distill.teachers import Completion, local_model_dir


class TransformersTeacher:
    name = "transformers"

    def __init__(self, cfg: PipelineConfig, task: Task):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = local_model_dir(cfg.models.teacher, "models.teacher")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.sampling = cfg.generate.sampling
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.grammars: Any = None
        self.top_k = cfg.generate.logprobs
        torch.manual_seed(cfg.seed)

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        import torch

        from distill.constrain import HFGrammars

        s = self.sampling
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": inst["prompt"]}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=s.enable_thinking,
            )
            for inst in instances
        ]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": max(s.top_k, 0) or None}
        processors: list[Any] = []
        if grammars is not None:
            self.grammars = self.grammars or HFGrammars(self.model, self.tokenizer, sorted(self.eos))
            processors.append(self.grammars.processor(grammars))
        recorder = _TopK(self.top_k) if self.top_k else None
        if recorder is not None:  # after the grammar, before the sampling warpers (HF appends those last)
            processors.append(recorder)
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=s.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=processors,
                **(sampling if s.temperature > 0 else {"do_sample": False}),
            )
        new = out[:, batch["input_ids"].shape[1] :]
        if recorder is not None:
            top_ids, top_values = recorder.stacked()
        results = []
        for b, row in enumerate(new.tolist()):
            end = next((i for i, t in enumerate(row) if t in self.eos), len(row))
            kept = min(end + 1, len(row))
            logprobs = None
            if recorder is not None:
                logprobs = TokenLogprobs(row[:kept], top_ids[b, :kept].tolist(), top_values[b, :kept].tolist())
            # Special tokens are kept so think tags stay visible to the think-stripping step.
            results.append(Completion(self.tokenizer.decode(row[:end]), kept, logprobs))
        return results

    def close(self) -> None:
        del self.model


class _TopK:
    """A logits processor that changes nothing and keeps each step's k most likely tokens: the distribution the
    answer was decoded from (under the grammar, if any) at temperature 1, before sampling settings reshape it,
    as vLLM reports it; without HF keeping every step's full-vocabulary logits, as output_logits would."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[Any, Any]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        top = scores.float().log_softmax(dim=-1).topk(self.k, dim=-1)
        self.steps.append((top.indices, top.values))
        return scores

    def stacked(self) -> tuple[Any, Any]:
        import torch

        return torch.stack([i for i, _ in self.steps], 1).cpu(), torch.stack([v for _, v in self.steps], 1).cpu()
