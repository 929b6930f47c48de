"""Stage 3b (compact variant): L1-unstructured pruning of the trained student, made permanent.

Applied after training, where the reference found it cost the least quality. Every Linear/Conv1D
weight loses its `prune.amount` smallest-magnitude entries; embeddings (tied to the output head) and
norms are left alone. Zeros do not shrink a dense file: the gain shows after int8 or
in a sparse format, and the stage reports it honestly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_dir, open_stage, stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.models import weights_bytes

log = logging.getLogger(__name__)


def prunable(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every Linear/Conv1D whose weight is not shared with the embeddings."""
    import torch
    from transformers.pytorch_utils import Conv1D

    embedding = model.get_input_embeddings().weight
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not embedding
    ]


def prune_model(model: Any, amount: float) -> dict[str, float]:
    """Prune in place and make it permanent; returns the sparsity of each pruned weight."""
    from torch.nn.utils import prune

    sparsity = {}
    for name, module in prunable(model):
        prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")
        sparsity[name] = float((module.weight == 0).float().mean())
    return sparsity


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    if not cfg.prune.enabled:
        raise DistillError("prune: pruning is off for this config; set prune.enabled=true (the compact CPU variant)")
    record = open_stage(cfg, "prune", overwrite)
    if record is None:
        return stage_dir(cfg, "prune")
    import torch  # after the checks: a refused or finished stage answers at once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = stage_dir(cfg, "merge") / "model"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    sparsity = prune_model(model, cfg.prune.amount)
    if not sparsity:
        raise DistillError(f"prune: {source} has no Linear/Conv1D weights to prune")
    counts = {name: module.weight.numel() for name, module in prunable(model)}
    zeros = sum(sparsity[n] * counts[n] for n in sparsity)

    target = record.folder / "model"
    with atomic_dir(target) as tmp:
        model.to(getattr(torch, cfg.merge.dtype)).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        if (source / "tokenizer.model").is_file():  # the GGUF exporter reads SentencePiece pieces from here
            shutil.copy2(source / "tokenizer.model", tmp / "tokenizer.model")

    all_params = sum(p.numel() for p in model.parameters())
    record.metrics = {
        "amount": cfg.prune.amount,
        "pruned_layers": len(sparsity),
        "pruned_weights": sum(counts.values()),
        "zeroed_weights": round(zeros),
        "layer_sparsity": sparsity,
        "overall_sparsity": zeros / sum(counts.values()),
        "model_sparsity": zeros / all_params,
        "params": all_params,
        "safetensors_bytes": weights_bytes(target),
    }
    record.files = {"model": "model"}
    log.info(
        "prune: %d layers, %.1f%% of their weights zeroed (%.1f%% of all parameters)",
        len(sparsity),
        100 * record.metrics["overall_sparsity"],
        100 * record.metrics["model_sparsity"],
    )
    return record.finish()
