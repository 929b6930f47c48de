"""Label-masked SFT examples: the student's chat template, loss only on the response and its end of turn.

The prompt is rendered exactly as at inference (`add_generation_prompt=True`), the answer is whatever
the template appends after it up to and including the end-of-turn token; everything else is -100. An example
longer than the limit keeps its whole prompt and loses the end of its answer; one whose prompt alone fills it
has nothing to train (`PromptTooLong`), and training leaves it out and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError

IGNORE = -100


class PromptTooLong(DistillError):
    """The prompt alone fills train.max_length: no answer token would be trained."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn (Gemma's <end_of_turn>, ChatML's <|im_end|>)."""
    if tokenizer.eos_token_id is None:
        raise DistillError("student tokenizer has no eos token; set it to the chat template's end-of-turn token")
    return tokenizer.eos_token_id


def check_chat_template(tokenizer: Any, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"{source}: the student tokenizer has no chat template; use an instruction-tuned student or add "
            "a chat_template to its tokenizer_config.json"
        )


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int, example_id: str) -> Encoded:
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DistillError(
            f"example {example_id}: the chat template renders the prompt differently with and without the answer; "
            "training would not match inference"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    if eot not in answer_ids:
        raise DistillError(
            f"example {example_id}: the rendered answer has no end-of-turn token ({tokenizer.eos_token})"
        )
    # Text the template adds after the end of turn (a newline) is never generated, so it is not trained.
    answer_ids = answer_ids[: answer_ids.index(eot) + 1]
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(
            f"example {example_id}: no trainable tokens left (prompt {len(prompt_ids)} tokens, train.max_length "
            f"{max_length}); raise train.max_length or shorten the prompt"
        )
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


class Collator:
    """Right-pads a batch to its longest example (length-grouped batches keep that short); counts samples.

    With `pack`, the batch's examples are laid end to end in one row instead, with position ids that restart
    at each example (transformers reads those as the examples' boundaries and keeps each one's attention to
    itself), and no padding. The loss sees the same positions: the last token of one example predicts the
    next example's first, a prompt token, whose label is -100."""

    def __init__(self, pad_id: int, pack: bool = False):
        self.pad_id = pad_id
        self.pack = pack
        self.samples_seen = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        self.samples_seen += len(rows)
        if self.pack:
            ids = [i for r in rows for i in r["input_ids"]]
            labels = [label for r in rows for label in r["labels"]]
            positions = [p for r in rows for p in range(len(r["input_ids"]))]
            return {
                "input_ids": torch.tensor([ids]),
                "position_ids": torch.tensor([positions]),
                "labels": torch.tensor([labels]),
            }
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
