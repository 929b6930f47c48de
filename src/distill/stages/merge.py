"""Stage 3: fold the LoRA adapter into the base model, and prove the result computes the same logits."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from distill.artifacts import StageRecord, prepare_output, require_input, stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError

log = logging.getLogger(__name__)


def check_prompts(cfg: PipelineConfig, tokenizer: Any, count: int) -> list[list[int]]:
    """Chat-formatted validation prompts (held-out inputs), as token ids."""
    from datasets import load_from_disk

    data = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))
    split = data["validation"] if "validation" in data and len(data["validation"]) else data["train"]
    prompts = [split[i]["prompt"] for i in range(min(count, len(split)))]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)[
            "input_ids"
        ]
        for p in prompts
    ]


def _same_base(adapter_dir: Path, student: str) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or ""
    if Path(base).resolve() != Path(student).resolve() and base != student:
        raise DistillError(
            f"{adapter_dir}: adapter was trained on '{base}', but models.student is '{student}'; "
            "merge it onto the model it was trained on or retrain"
        )


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = stage_dir(cfg, "merge")
    train_dir = stage_dir(cfg, "train")
    require_input(cfg, "train")
    if cfg.train.method == "lora":
        _same_base(train_dir / "adapter", cfg.models.student)
    if prepare_output(cfg, "merge", overwrite) == "skip":
        log.info("merge: complete, skipping (%s)", folder)
        return folder
    log.info("merge config: %s", cfg.merge.model_dump())
    record = StageRecord(cfg, "merge", inputs=("train",))
    dtype = getattr(torch, cfg.merge.dtype)
    target = folder / "model"

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

    tmp = target.with_name("model.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(dtype).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    spm_model = Path(cfg.models.student) / "tokenizer.model"
    if spm_model.is_file():  # the GGUF exporter reads SentencePiece pieces from here
        shutil.copy2(spm_model, tmp / "tokenizer.model")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)

    saved = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    saved_diff = max(float((_logits(saved, ids) - ref).abs().max()) for ids, ref in zip(prompts, reference))
    record.metrics = {
        "method": cfg.train.method,
        "dtype": cfg.merge.dtype,
        "check_prompts": len(prompts),
        "fold_max_abs_logit_diff": fold_diff,
        "saved_dtype_max_abs_logit_diff": saved_diff,
        "params": sum(p.numel() for p in saved.parameters()),
        "safetensors_bytes": sum(f.stat().st_size for f in target.glob("*.safetensors")),
    }
    log.info("merge: fold diff %.3g, %s rounding diff %.3g", fold_diff, cfg.merge.dtype, saved_diff)
    record.files = {"model": "model"}
    return record.finish()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()[0]
