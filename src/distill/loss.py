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
from dataclasses import dataclass
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
                None,
                None,
                None,
            )

    return LinearCrossEntropy


def _response_positions(hidden: Any, labels: Any, lm_head: Any) -> tuple[Any, Any]:
    """The hidden states that predict a trainable label, and those labels, batch row by row."""
    if getattr(lm_head, "bias", None) is not None:
        raise DistillError(
            "the student's output layer has a bias; the response-only loss supports bias-free heads only"
        )
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def response_loss_sum(
    hidden: Any, labels: Any, lm_head: Any, chunk_size: int, softcap: float | None = None
) -> tuple[Any, int]:
    """(sum of token losses, number of tokens) for next-token prediction where labels != -100."""
    selected, wanted = _response_positions(hidden, labels, lm_head)
    total = _linear_cross_entropy().apply(selected, lm_head.weight, wanted, chunk_size, softcap)
    return total, int(wanted.numel())


@dataclass(frozen=True)
class KdSettings:
    """train.kd as the loss needs it (see KdConfig)."""

    divergence: str
    beta: float
    temperature: float
    alpha: float


TAIL_FLOOR = 1e-6  # the teacher's tail bucket never drops below this: reverse KL and JSD stay finite


def _kd_terms(logits: Any, ids: Any, teacher: Any, route: Any, kd: KdSettings) -> Any:
    """Sum over these positions of the distillation term, from one chunk of student logits [n, V].

    The teacher is known only on its top-k, so both distributions are compared on k + 1 buckets: the
    candidates, and one tail bucket holding everything else (the teacher's 1 - sum of its top-k, floored at
    TAIL_FLOOR; the student's exact remaining mass, from a log-sum-exp over the other tokens). The temperature
    tempers the teacher's buckets (exact at T = 1) and the student's logits."""
    import torch
    import torch.nn.functional as F

    from distill.kd import EXACT, ULD

    t = kd.temperature
    z = logits / t if t != 1 else logits
    lse = torch.logsumexp(z, dim=-1)
    valid = ids >= 0
    teacher = teacher.float()
    p_tail = (1 - teacher.exp().sum(-1)).clamp(min=TAIL_FLOOR)
    logp = F.log_softmax(torch.cat([teacher, p_tail.log()[:, None]], dim=-1) / t, dim=-1)
    total = logits.new_zeros(())
    exact = route == EXACT
    if exact.any():
        # padded candidates point at a real one of their row, so masking them out changes nothing
        first = torch.where(valid, ids, ids.max(dim=-1, keepdim=True).values.clamp(min=0))
        logq_top = torch.where(valid, z.gather(1, first) - lse[:, None], float("-inf"))
        logq_tail = torch.logsumexp(z.scatter(1, first, float("-inf")), dim=-1) - lse
        logq = torch.cat([logq_top, logq_tail[:, None]], dim=-1)[exact]
        lp = logp[exact]
        total = total + divergence(lp, logq, kd) * t * t
    uld = route == ULD
    if uld.any():
        # ULD: the sorted probabilities of each side, top-k plus tail, compared position by position
        q = torch.topk(z[uld], ids.shape[1], dim=-1).values.sub(lse[uld][:, None]).exp()
        q = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
        p = logp[uld].exp()
        p = torch.cat([torch.sort(p[:, :-1], dim=-1, descending=True).values, p[:, -1:]], dim=-1)
        total = total + (p - q).abs().sum()
    return total


def divergence(logp: Any, logq: Any, kd: KdSettings) -> Any:
    """Sum over rows of the divergence between teacher P and student Q, given as log-probabilities [n, b]."""
    import torch

    def kl(loga: Any, logb: Any) -> Any:
        # a term whose first probability is 0 is 0, whatever the second; the masked entries are made finite
        # first, or their NaN would leak into the gradient through torch.where
        present = loga > float("-inf")
        a, b = torch.where(present, loga, 0), torch.where(present, logb, 0)
        return torch.where(present, a.exp() * (a - b), 0).sum()

    if kd.divergence == "forward_kl":
        return kl(logp, logq)
    if kd.divergence == "reverse_kl":
        return kl(logq, logp)
    beta = torch.tensor(kd.beta, dtype=logp.dtype, device=logp.device)
    logm = torch.logsumexp(torch.stack([logp + beta.log(), logq + (1 - beta).log()]), dim=0)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


def _chunk_objective(softcap: float | None, kd: KdSettings) -> Any:
    def objective(h: Any, weight: Any, targets: Any, ids: Any, teacher: Any, route: Any) -> Any:
        import torch
        import torch.nn.functional as F

        logits = F.linear(h, weight).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ce = F.cross_entropy(logits, targets, reduction="sum")
        return torch.stack([ce, _kd_terms(logits, ids, teacher, route, kd)])

    return objective


def kd_loss_sum(
    hidden: Any,
    labels: Any,
    lm_head: Any,
    chunk_size: int,
    softcap: float | None,
    kd: KdSettings,
    ids: Any,
    teacher: Any,
    route: Any,
) -> tuple[Any, int]:
    """(alpha * sum of token cross-entropies + (1 - alpha) * sum of distillation terms, number of tokens).

    `ids`, `teacher` and `route` hold one row per trainable label, in the order the labels appear (batch
    row by row). Each chunk's logits are recomputed in the backward pass instead of kept (activation
    checkpointing), so one chunk of logits is alive at a time, as in the cross-entropy-only loss."""
    import torch
    from torch.utils.checkpoint import checkpoint

    selected, wanted = _response_positions(hidden, labels, lm_head)
    if ids.shape[0] != wanted.shape[0]:
        raise DistillError(
            f"train: {ids.shape[0]} teacher distributions for {wanted.shape[0]} trainable tokens; the batch and its "
            "distillation targets disagree"
        )
    objective = _chunk_objective(softcap, kd)
    sums = selected.new_zeros(2, dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        sums = sums + checkpoint(
            objective,
            selected[part],
            lm_head.weight,
            wanted[part],
            ids[part],
            teacher[part],
            route[part],
            use_reentrant=False,
        )
    return kd.alpha * sums[0] + (1 - kd.alpha) * sums[1], int(wanted.numel())


def attach_response_loss(
    causal_lm: Any, chunk_size: int, kd: KdSettings | None = None, on_policy: KdSettings | None = None
) -> None:
    """Make `causal_lm(input_ids, attention_mask, labels)` return only the chunked response loss (with `kd`:
    the mix of cross-entropy and distillation, given the batch's kd_ids, kd_logprobs and kd_route). A batch's
    `kd_mode` picks the settings: "offline" (`kd`, the default), "on_policy" (`on_policy`: the student's own
    answers) or "text" (cross-entropy only: stored answers without a distribution).

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
        mode = kwargs.pop("kd_mode", "offline")
        settings = on_policy if mode == "on_policy" else None if mode == "text" else kd
        # position ids are given only for packed batches (sft_data.Collator): they mark where each example starts
        position_ids = kwargs.get("position_ids")
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if settings is None:
            total, count = response_loss_sum(hidden, labels, lm_head, chunk_size, softcap)
        else:
            total, count = kd_loss_sum(
                hidden,
                labels,
                lm_head,
                chunk_size,
                softcap,
                settings,
                kwargs["kd_ids"],
                kwargs["kd_logprobs"],
                kwargs["kd_route"],
            )
        denominator = num_items if num_items is not None else max(count, 1)
        loss = total / denominator
        if not torch.isfinite(loss):
            raise NonFiniteLoss("non-finite loss")
        return CausalLMOutputWithPast(loss=loss)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    # Tell the Trainer the loss is already normalised by the tokens of the whole accumulated batch.
    causal_lm.accepts_loss_kwargs = True
