"""How each model variant of a run is loaded to answer prompts: transformers (with a LoRA adapter or torch's
dynamic int8 where the variant has one) or llama.cpp (the GGUF), behind the same `generate(ids, grammar)` and
`nll(ids, answer)`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distill.artifacts import require_input
from distill.config import PipelineConfig
from distill.constrain import HFGrammars, llama_grammar
from distill.errors import DistillError
from distill.tasks import Grammar
from distill.variants import VARIANTS


def llama_cpp(stage: str) -> Any:
    """The llama_cpp module, or a one-line error naming the fix (it is built from source, so it can be missing)."""
    try:
        import llama_cpp
    except ImportError:
        raise DistillError(
            f"{stage}: llama-cpp-python is not installed; run `make setup` (it builds and caches the wheel)"
        ) from None
    return llama_cpp


def cpu_threads() -> int:
    """Threads for llama.cpp in this process: OMP_NUM_THREADS where set (the budget torch takes too), else every
    CPU this process may run on. llama.cpp's threads spin while they wait, so more threads than the process's
    share of the cores slow every process on the machine."""
    budget = os.environ.get("OMP_NUM_THREADS", "")
    return int(budget) if budget.isdigit() and int(budget) > 0 else len(os.sched_getaffinity(0))


class HFModel:
    """A transformers model (base, adapter, merged, pruned or int8) with its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, cfg: PipelineConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        eos = model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        self.grammars: HFGrammars | None = None

    def generate(self, ids: list[int], grammar: Grammar | None = None) -> tuple[str, int]:
        import torch

        e = self.cfg.eval
        sampling = {"do_sample": True, "temperature": e.temperature} if e.temperature > 0 else {"do_sample": False}
        processors = []
        if grammar is not None:
            self.grammars = self.grammars or HFGrammars(self.model, self.tokenizer, self.eos)
            processors.append(self.grammars.processor([grammar]))
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=e.max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.tokenizer.pad_token_id,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                **sampling,
            )
        new = out[0, len(ids) :].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)

    def nll(self, ids: list[int], answer: list[int]) -> float:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([ids + answer])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
        return float(-logp.gather(1, torch.tensor(answer)[:, None]).sum())


class GGUFModel:
    """The exported GGUF in llama.cpp, fed the same token ids as the HF models."""

    def __init__(self, path: Path, context: int, cfg: PipelineConfig):
        self.cfg = cfg
        # logits_all keeps every position's logits for the perplexity: vocab x context floats of host memory.
        self.llm = llama_cpp("eval").Llama(
            model_path=str(path), n_ctx=context, logits_all=True, verbose=False, n_threads=cpu_threads()
        )

    def generate(self, ids: list[int], grammar: Grammar | None = None) -> tuple[str, int]:
        self.llm.reset()
        out = self.llm.create_completion(
            prompt=ids,
            max_tokens=self.cfg.eval.max_new_tokens,
            temperature=self.cfg.eval.temperature,
            top_p=1.0,
            top_k=0 if self.cfg.eval.temperature > 0 else 1,
            seed=self.cfg.seed,
            grammar=llama_grammar(self.llm, grammar) if grammar is not None else None,
        )
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def nll(self, ids: list[int], answer: list[int]) -> float:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids + answer)
        scores = np.asarray(self.llm.scores[len(ids) - 1 : len(ids) + len(answer) - 1], dtype=np.float64)
        top = scores.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        return float((logz - scores[np.arange(len(answer)), answer]).sum())

    def close(self) -> None:
        self.llm.close()


def _transformers(cfg: PipelineConfig, path: Path, tokenizer: Any, context: int) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    return HFModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, cfg), None


def _peft(cfg: PipelineConfig, path: Path, tokenizer: Any, context: int) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    return HFModel(PeftModel.from_pretrained(base, path).eval(), tokenizer, cfg), None


def _int8(cfg: PipelineConfig, path: Path, tokenizer: Any, context: int) -> tuple[Any, Any]:
    from distill.int8 import load_int8

    return HFModel(load_int8(path), tokenizer, cfg), None


def _llama_cpp(cfg: PipelineConfig, path: Path, tokenizer: Any, context: int) -> tuple[Any, Any]:
    gguf = GGUFModel(path, context, cfg)
    return gguf, gguf.close


# How a variant's `runtime` loads what its `location` names: (runner, close or None).
LOADERS = {"transformers": _transformers, "peft": _peft, "int8": _int8, "llama_cpp": _llama_cpp}


def load_runtime(cfg: PipelineConfig, model: str, tokenizer: Any, context: int) -> tuple[Any, Any]:
    """(runner, close or None) for one of the run's variants; the stage that makes it must be complete."""
    found = VARIANTS[model]
    require_input(cfg, found.stage)
    assert found.location is not None, f"variant {model} has nothing to load"
    return LOADERS[found.runtime](cfg, found.location(cfg), tokenizer, context)
