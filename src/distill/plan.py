"""`distill plan`: sizes, steps and a memory estimate, from the student built on the meta device.

No weights are loaded or downloaded: the architecture comes from a local model folder's config.json
or from the shipped architecture-only config (`models.student_arch`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError

BYTES = {"bf16": 2, "fp32": 4}


def load_arch(cfg: PipelineConfig, role: str = "student") -> Any:
    """transformers config of the teacher or student, without touching a hub."""
    from transformers import AutoConfig

    source = Path(getattr(cfg.models, role))
    arch = getattr(cfg.models, f"{role}_arch")
    if (source / "config.json").is_file():
        return AutoConfig.from_pretrained(source)
    if arch is None:
        raise DistillError(
            f"models.{role}: '{source}' is not a local model folder and models.{role}_arch is not set; "
            f"point models.{role}_arch at an architecture config such as configs/arch/gemma-3-270m-it.json"
        )
    if not Path(arch).is_file():
        raise DistillError(f"models.{role}_arch: {arch} not found; ship the architecture config.json there")
    return AutoConfig.from_pretrained(arch)


def meta_model(cfg: PipelineConfig, role: str = "student") -> Any:
    """The model with shapes but no storage (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_arch(cfg, role)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_trainable_params(model: Any, target_modules: list[str], r: int) -> int:
    """LoRA adds A (r x in) and B (out x r) to every targeted Linear: r * (in + out) parameters each."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            total += r * (module.in_features + module.out_features)
    return total


def steps_per_epoch(num_examples: int, cfg: PipelineConfig, world_size: int = 1) -> int:
    """Optimizer steps per epoch as the HF Trainer counts them (a partial last accumulation still steps)."""
    batches = math.ceil(num_examples / (cfg.train.batch_size * world_size))
    return math.ceil(batches / cfg.train.grad_accum)


def train_steps(num_examples: int, cfg: PipelineConfig, world_size: int = 1) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return math.ceil(steps_per_epoch(num_examples, cfg, world_size) * cfg.train.epochs)


def distribution_bytes_per_token(k: int) -> int:
    """Arrow bytes of one teacher token's stored distribution: its id (int32), k candidate ids (int32) and k
    float16 log-probabilities, and the offsets of the two per-token lists (int32 each)."""
    return 4 + 6 * k + 2 * 4


def build_plan(
    cfg: PipelineConfig, mean_tokens: float | None = None, response_tokens: float | None = None
) -> dict[str, Any]:
    model = meta_model(cfg)
    text_cfg = model.config
    base = sum(p.numel() for p in model.parameters())
    trainable = (
        lora_trainable_params(model, cfg.train.lora.target_modules, cfg.train.lora.r)
        if cfg.train.method == "lora"
        else base
    )
    if trainable == 0:
        raise DistillError(
            f"train.lora.target_modules: none of {cfg.train.lora.target_modules} is a Linear layer of the student"
        )
    total = base + trainable if cfg.train.method == "lora" else base
    examples = cfg.generate.num_examples
    steps = train_steps(examples, cfg)
    seq = cfg.train.max_length if mean_tokens is None else min(cfg.train.max_length, mean_tokens)
    tokens = examples * seq * cfg.train.epochs

    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    batch = cfg.train.batch_size
    hidden = text_cfg.hidden_size
    vocab = text_cfg.vocab_size
    layers = text_cfg.num_hidden_layers
    seq_len = cfg.train.max_length
    # GPT-2 names its MLP width n_inner, and None there means 4 x hidden.
    mlp = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * hidden
    # Weights in training precision; trainable params keep fp32 master weights + grads + 2 optimizer states
    # (1 byte each for 8-bit AdamW, 4 for plain AdamW).
    state_bytes = 2 if cfg.train.optim == "adamw_8bit" else 8
    weights = base * BYTES[precision]
    optimizer = trainable * (4 + 4 + state_bytes)
    # With checkpointing only each layer's input is kept, plus one layer's working set at a time.
    per_layer = batch * seq_len * hidden * BYTES[precision]
    working = batch * seq_len * (4 * hidden + 2 * mlp) * BYTES[precision]
    activations = (layers * per_layer + working) if cfg.train.gradient_checkpointing else layers * working
    logits_full = batch * seq_len * vocab * 4 * 2  # fp32 logits and their gradient
    logits_chunked = min(cfg.train.loss_chunk_size, batch * seq_len) * vocab * 4 * 2
    plan: dict[str, Any] = {
        "student": cfg.models.student,
        "architecture": text_cfg.model_type,
        "base_params": base,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_pct": round(100 * trainable / total, 4),
        "examples": examples,
        "effective_batch": batch * cfg.train.grad_accum,
        "steps_per_epoch": steps_per_epoch(examples, cfg),
        "steps": steps,
        "mean_tokens_per_example": seq,
        "mean_tokens_source": "max_length (upper bound)" if mean_tokens is None else "generate statistics",
        "estimated_tokens": int(tokens),
        "memory_bytes": {
            "weights": weights,
            "optimizer_and_grads": optimizer,
            "activations": activations,
            "logits_full_vocab": logits_full,
            "logits_chunked": logits_chunked,
            "total_chunked": weights + optimizer + activations + logits_chunked,
            "total_full_logits": weights + optimizer + activations + logits_full,
        },
    }
    g = cfg.generate
    if g.logprobs:
        # every generated example keeps it, held-out ones included; the answer length is the teacher's (or, from
        # data generated without it, the student's) from generate statistics, or before any data the sampling limit
        per_token = distribution_bytes_per_token(g.logprobs)
        length = response_tokens or g.sampling.max_tokens
        stored = examples + g.validation_examples + g.test_examples
        plan["teacher_distribution"] = {
            "k": g.logprobs,
            "bytes_per_token": per_token,
            "tokens_per_example": length,
            "tokens_source": "generate statistics" if response_tokens else "generate.sampling.max_tokens (upper bound)",
            "bytes": int(stored * length * per_token),
        }
    return plan
