"""Cross-entropy on response positions only, in chunks, without full-vocabulary logits.

With Gemma 3's 262,144-token vocabulary the logits of a 4 x 4096 batch are ~4 GiB in fp32, and most of
those positions are prompt or padding whose loss is masked anyway. Here the decoder's hidden states are
gathered at the positions that predict a trainable label, and the output projection + cross-entropy run
over `chunk_size` of them at a time. Each chunk's gradient (softmax - one-hot, through the soft-cap if
the model has one) is taken right away in the forward pass and only the gradients w.r.t. the hidden
states (and the output weight, when it trains) are kept: one chunk of logits is ever alive, and the
backward pass does not recompute them.
"""

from __future__ import annotations

import types
from typing import Any

from distill.errors import DistillError
from distill.sft_data import IGNORE


class NonFiniteLoss(DistillError):
    """The loss became inf/NaN; the stage adds the step number and a hint."""


def _linear_cross_entropy() -> Any:
    import torch
    import torch.nn.functional as F

    class LinearCrossEntropy(torch.autograd.Function):
        """sum_i CE(softcap(hidden_i @ weight.T), target_i), with its gradient computed chunk by chunk."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, chunk_size: int, softcap: float | None) -> Any:
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for start in range(0, hidden.shape[0], chunk_size):
                h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
                logits = F.linear(h, weight).float()
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                rows = torch.arange(t.shape[0], device=t.device)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits[rows, t]).sum()
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: one chunk-sized buffer
                grad[rows, t] -= 1
                if softcap:
                    grad *= 1 - capped.square()
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad.to(weight.dtype) @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad.T, h.float())
            ctx.save_for_backward(grad_hidden, grad_weight)
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            grad_hidden, grad_weight = ctx.saved_tensors
            return (
                grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * grad_total if grad_weight is not None else None,
                None, None, None,
            )  # fmt: skip

    return LinearCrossEntropy


def response_loss_sum(
    hidden: Any, labels: Any, lm_head: Any, chunk_size: int, softcap: float | None = None
) -> tuple[Any, int]:
    """(sum of token losses, number of tokens) for next-token prediction where labels != -100."""
    if getattr(lm_head, "bias", None) is not None:
        raise DistillError(
            "the student's output layer has a bias; the response-only loss supports bias-free heads only"
        )
    targets = labels[:, 1:]
    keep = targets != IGNORE
    selected = hidden[:, :-1][keep]
    wanted = targets[keep]
    total = _linear_cross_entropy().apply(selected, lm_head.weight, wanted, chunk_size, softcap)
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
