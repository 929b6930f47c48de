"""Constrained decoding: a task's per-input grammar handed to whichever decoder runs.

Every decoder gets the same GBNF text, so they all enforce the same language: HF models through an
xgrammar logits processor, the GGUF through llama.cpp's grammar sampler, llama-server through the
request's `grammar` field, vLLM (offline or served) through its structured outputs, an OpenAI-compatible
endpoint through `response_format` when the grammar came from a JSON Schema.
"""

from __future__ import annotations

from typing import Any

from distill.errors import DistillError
from distill.tasks import Grammar, Task


def task_grammar(task: Task, payload: dict[str, Any]) -> Grammar | None:
    """The task's grammar for one input; None when the pack has none."""
    return task.grammar(payload)


def first_grammar(task: Task, payload: dict[str, Any], setting: str | None) -> Grammar | None:
    """The grammar of one input, parsed before any work so that a broken pack fails with its error;
    `setting` is the config key that turns its use off."""
    import xgrammar

    grammar = task_grammar(task, payload)
    if grammar is not None:
        try:
            xgrammar.Grammar.from_ebnf(grammar.gbnf)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1].split("error at ")[-1]
            off = f", or set {setting}=false to decode without it" if setting else ""
            raise DistillError(
                f"task {task.name!r}: its output grammar does not compile ({reason}); fix the pack's grammar(){off}"
            ) from None
    return grammar


class HFGrammars:
    """Compiles grammars against one HF tokenizer and turns them into `generate` logits processors."""

    def __init__(self, model: Any, tokenizer: Any, stop_ids: list[int]):
        import xgrammar

        # the logits' width (the model's vocabulary), not the tokenizer's length: padding rows are masked too
        rows = model.config.vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=rows, stop_token_ids=stop_ids)
        self.compiler = xgrammar.GrammarCompiler(info)

    def processor(self, grammars: list[Grammar]) -> Any:
        """A fresh processor for one `generate` call, one grammar per batch row."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.compiler.compile_grammar(g.gbnf) for g in grammars])


def llama_grammar(llm: Any, grammar: Grammar) -> Any:
    """llama.cpp's grammar for `create_completion`, parsed first: llama-cpp-python crashes on one that fails."""
    import llama_cpp
    from llama_cpp import LlamaGrammar

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.gbnf.encode(), b"root")
    if not sampler:
        raise DistillError("llama.cpp cannot parse the task's grammar (its error is above); set eval.grammar=false")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(grammar.gbnf, verbose=False)


def request_fields(grammar: Grammar, backend: str) -> dict[str, Any]:
    """The body fields that constrain one chat request on this server."""
    if backend == "vllm":
        return {"structured_outputs": {"grammar": grammar.gbnf}}
    return {"grammar": grammar.gbnf}  # llama-server
