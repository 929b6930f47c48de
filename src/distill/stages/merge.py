"""Stage 3: fold the LoRA adapter into the base model, and prove the result computes the same logits."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_dir, open_stage, require_inputs, stage_dir
from distill.config import PipelineConfig
from distill.data import check_prompts
from distill.errors import DistillError
from distill.models import weights_bytes

log = logging.getLogger(__name__)


def _same_base(adapter_dir: Path, student: str) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or ""
    if Path(base).resolve() != Path(student).resolve() and base != student:
        raise DistillError(
            f"{adapter_dir}: adapter was trained on '{base}', but models.student is '{student}'; "
            "merge it onto the model it was trained on or retrain"
        )


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    train_dir = stage_dir(cfg, "train")
    require_inputs(cfg, "merge")
    if cfg.train.method == "lora":
        _same_base(train_dir / "adapter", cfg.models.student)
    record = open_stage(cfg, "merge", overwrite)
    if record is None:
        return stage_dir(cfg, "merge")
    import torch  # after the checks: a refused or finished stage answers at once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.merge.dtype)
    target = record.folder / "model"

    if cfg.train.method == "full":
        merged = AutoModelForCausalLM.from_pretrained(train_dir / "model", dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(train_dir / "model")
        prompts = check_prompts(cfg, tokenizer, cfg.merge.check_prompts)
        reference = [_logits(merged, ids) for ids in prompts]
        fold_diff = 0.0
    else:
        from peft import PeftModel

        adapter_dir = train_dir / "adapter"
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
        try:
            adapted = PeftModel.from_pretrained(base, adapter_dir)
        except (RuntimeError, ValueError) as exc:
            raise DistillError(
                f"{adapter_dir}: adapter does not fit models.student ({str(exc).splitlines()[0]})"
            ) from None
        adapted.eval()
        prompts = check_prompts(cfg, tokenizer, cfg.merge.check_prompts)
        reference = [_logits(adapted, ids) for ids in prompts]
        merged = adapted.merge_and_unload()
        fold_diff = max(float((_logits(merged, ids) - ref).abs().max()) for ids, ref in zip(prompts, reference))
        if fold_diff > cfg.merge.tolerance:
            raise DistillError(
                f"merge: merged logits differ from the adapter model's by {fold_diff:.3g} > merge.tolerance "
                f"{cfg.merge.tolerance}; the adapter does not fold cleanly into this base"
            )

    with atomic_dir(target) as tmp:
        merged.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        spm_model = Path(cfg.models.student) / "tokenizer.model"
        if spm_model.is_file():  # the GGUF exporter reads SentencePiece pieces from here
            shutil.copy2(spm_model, tmp / "tokenizer.model")

    saved = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    saved_diff = max(float((_logits(saved, ids) - ref).abs().max()) for ids, ref in zip(prompts, reference))
    record.metrics = {
        "method": cfg.train.method,
        "dtype": cfg.merge.dtype,
        "check_prompts": len(prompts),
        "fold_max_abs_logit_diff": fold_diff,
        "saved_dtype_max_abs_logit_diff": saved_diff,
        "params": sum(p.numel() for p in saved.parameters()),
        "safetensors_bytes": weights_bytes(target),
    }
    log.info("merge: fold diff %.3g, %s rounding diff %.3g", fold_diff, cfg.merge.dtype, saved_diff)
    record.files = {"model": "model"}
    return record.finish()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()[0]
