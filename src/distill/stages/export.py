"""Stage 4: the merged model as a GGUF file, verified by loading it in llama.cpp.

Verification (recorded in the manifest; the stage fails when it does not hold): on validation prompts
llama.cpp's tokenization of the chat-formatted prompt equals the HF tokenizer's, and its next-token
logits agree with the HF merged model (top-1 agreement and max abs difference against thresholds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from distill.artifacts import StageRecord, prepare_output, require_input, stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError

log = logging.getLogger(__name__)


def gguf_name(cfg: PipelineConfig) -> str:
    return f"{cfg.run_name}-{cfg.export.format}.gguf"


def verify(model_dir: Path, gguf_path: Path, prompts: list[list[int]], tokenizer: Any) -> dict[str, Any]:
    """Tokenization and next-token logits of llama.cpp vs HF on the same chat-formatted prompts."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from llama_cpp import Llama
    except ImportError:
        raise DistillError("export: llama-cpp-python is not installed; run `make setup` (it builds and caches the wheel)") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    llm = Llama(model_path=str(gguf_path), n_ctx=longest + 8, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1)
    try:
        token_matches, top1, worst = 0, 0, 0.0
        for ids in prompts:
            text = tokenizer.decode(ids)
            token_matches += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)
            ours = np.asarray(llm.scores[len(ids) - 1])[: model.config.vocab_size]
            with torch.inference_mode():
                theirs = model(torch.tensor([ids])).logits[0, -1].float().numpy()
            top1 += int(ours.argmax() == theirs.argmax())
            worst = max(worst, float(np.abs(ours - theirs).max()))
    finally:
        llm.close()
    return {
        "prompts": len(prompts),
        "tokenization_match": token_matches / len(prompts),
        "top1_agreement": top1 / len(prompts),
        "max_abs_logit_diff": worst,
    }


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    from transformers import AutoTokenizer

    from distill.gguf_writer import write_gguf
    from distill.plan import meta_model
    from distill.stages.merge import check_prompts

    folder = stage_dir(cfg, "export")
    require_input(cfg, "merge")
    if prepare_output(cfg, "export", overwrite) == "skip":
        log.info("export: complete, skipping (%s)", folder)
        return folder
    log.info("export config: %s", cfg.export.model_dump())
    record = StageRecord(cfg, "export", inputs=("merge",))
    model_dir = stage_dir(cfg, "merge") / "model"
    target = folder / gguf_name(cfg)
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        written = write_gguf(model_dir, tmp, cfg.export.format)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        checks = verify(model_dir, tmp, check_prompts(cfg, tokenizer, cfg.export.check_prompts), tokenizer)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    problems = []
    if checks["tokenization_match"] < 1.0:
        problems.append(f"llama.cpp tokenizes {1 - checks['tokenization_match']:.0%} of prompts differently from HF")
    if checks["top1_agreement"] < cfg.export.min_top1_agreement:
        problems.append(f"top-1 agreement {checks['top1_agreement']:.0%} < export.min_top1_agreement {cfg.export.min_top1_agreement:.0%}")
    if checks["max_abs_logit_diff"] > cfg.export.max_abs_logit_diff:
        problems.append(f"max abs logit diff {checks['max_abs_logit_diff']:.3g} > export.max_abs_logit_diff {cfg.export.max_abs_logit_diff}")
    if problems:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"export: {target.name} failed verification: " + "; ".join(problems))
    os.replace(tmp, target)

    safetensors = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    teacher_params = sum(p.numel() for p in meta_model(cfg, "teacher").parameters())
    student_params = sum(p.numel() for p in meta_model(cfg, "student").parameters())
    record.metrics = {
        **written,
        "safetensors_bytes": safetensors,
        "gguf_vs_safetensors": round(written["file_bytes"] / safetensors, 4),
        "teacher_params": teacher_params,
        "student_params": student_params,
        "teacher_bf16_bytes": teacher_params * 2,
        "compression_vs_teacher_bf16": round(teacher_params * 2 / written["file_bytes"], 1),
        "verification": checks,
    }
    record.files = {"gguf": target.name}
    log.info(
        "export: %s, %.1f MiB; tokenization match %.0f%%, top-1 %.0f%%, max |Δlogit| %.3g",
        target.name, written["file_bytes"] / 2**20, 100 * checks["tokenization_match"], 100 * checks["top1_agreement"],
        checks["max_abs_logit_diff"],
    )  # fmt: skip
    return record.finish()
