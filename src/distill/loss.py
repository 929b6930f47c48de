"""Cross-entropy on response positions only, in chunks, without full-vocabulary logits.

With Gemma 3's 262,144-token vocabulary the logits of a 4 x 4096 batch are ~4 GiB in fp32, and most of
those positions are prompt or padding whose loss is masked anyway. Here the decoder's hidden states are
gathered at the positions that predict a trainable label, and the output projection + cross-entropy run
over `chunk_size` of them at a time under activation checkpointing, so at most one chunk of logits is
alive in the forward pass and again in the backward pass.
"""

from __future__ import annotations

import types
from typing import Any

from distill.errors import DistillError
from distill.sft_data import IGNORE


class NonFiniteLoss(DistillError):
    """The loss became inf/NaN; the stage adds the step number and a hint."""


def _chunk_loss(hidden: Any, targets: Any, weight: Any, softcap: float | None) -> Any:
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def response_loss_sum(hidden: Any, labels: Any, lm_head: Any, chunk_size: int, softcap: float | None = None) -> tuple[Any, int]:
    """(sum of token losses, number of tokens) for next-token prediction where labels != -100."""
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    keep = targets != IGNORE
    selected = hidden[:, :-1][keep]
    wanted = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, selected[part], wanted[part], lm_head.weight, softcap, use_reentrant=False)
    return total, int(wanted.numel())


def attach_response_loss(causal_lm: Any, chunk_size: int) -> None:
    """Make `causal_lm(input_ids, attention_mask, labels)` return only the chunked response loss.

    It replaces the instance's forward rather than wrapping it, so peft, accelerate and DDP keep
    calling through their usual paths (DDP's gradient hooks depend on the wrapped forward being
    used) and saving the model is unchanged. Without labels the original forward runs (generation)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = causal_lm.forward
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def forward(self: Any, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, **kwargs: Any) -> Any:
        import torch

        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        total, count = response_loss_sum(hidden, labels, lm_head, chunk_size, softcap)
        denominator = num_items if num_items is not None else max(count, 1)
        loss = total / denominator
        if not torch.isfinite(loss):
            raise NonFiniteLoss("non-finite loss")
        return CausalLMOutputWithPast(loss=loss)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    # Tell the Trainer the loss is already normalised by the tokens of the whole accumulated batch.
    causal_lm.accepts_loss_kwargs = True
