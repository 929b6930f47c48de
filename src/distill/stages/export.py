"""Stage 4: the merged (or pruned) model as a GGUF file verified in llama.cpp, and optionally as torch int8.

Verification (recorded in the manifest; the stage fails when it does not hold): on validation prompts
llama.cpp's tokenization of the chat-formatted prompt equals the HF tokenizer's, and its next-token
logits agree with the HF merged model (top-1 agreement and max abs difference against thresholds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_dir, atomic_file, open_stage, stage_dir
from distill.card import write_cards
from distill.config import PipelineConfig
from distill.data import check_prompts
from distill.errors import DistillError
from distill.int8 import INT8_DIR, INT8_FILE, int8_linears, load_int8, write_int8
from distill.models import weights_bytes
from distill.runtimes import cpu_threads, llama_cpp
from distill.stages import STAGES
from distill.teachers import teacher_backend

log = logging.getLogger(__name__)


def gguf_name(cfg: PipelineConfig) -> str:
    return f"{cfg.run_name}-{cfg.export.format}.gguf"


def verify(model_dir: Path, gguf_path: Path, prompts: list[list[int]], tokenizer: Any) -> dict[str, Any]:
    """Tokenization and next-token logits of llama.cpp vs HF on the same chat-formatted prompts."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    Llama = llama_cpp("export").Llama
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    llm = Llama(model_path=str(gguf_path), n_ctx=longest + 8, logits_all=True, verbose=False, n_threads=cpu_threads())
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


def verify_int8(model_dir: Path, int8_dir: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """Next-token agreement of the reloaded int8 model with the float model it came from."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    int8 = load_int8(int8_dir)
    top1, worst = 0, 0.0
    with torch.inference_mode():
        for ids in prompts:
            ours = int8(torch.tensor([ids])).logits[0, -1].float()
            theirs = reference(torch.tensor([ids])).logits[0, -1].float()
            top1 += int(ours.argmax() == theirs.argmax())
            worst = max(worst, float((ours - theirs).abs().max()))
    return {
        "prompts": len(prompts),
        "top1_agreement": top1 / len(prompts),
        "max_abs_logit_diff": worst,
        "quantized_linears": len(int8_linears(int8)),
    }


def agreement_problems(cfg: PipelineConfig, checks: dict[str, Any]) -> list[str]:
    """Where an exported model's next-token logits stray from the float model beyond the config's thresholds."""
    e, problems = cfg.export, []
    top1, diff = checks["top1_agreement"], checks["max_abs_logit_diff"]
    if top1 < e.min_top1_agreement:
        problems.append(f"top-1 agreement {top1:.0%} < export.min_top1_agreement {e.min_top1_agreement:.0%}")
    if diff > e.max_abs_logit_diff:
        problems.append(f"max abs logit diff {diff:.3g} > export.max_abs_logit_diff {e.max_abs_logit_diff}")
    return problems


def known_teacher_params(cfg: PipelineConfig) -> int | None:
    """The teacher's size where a model wrote the data and its architecture is at hand (an API teacher
    without `models.teacher_arch` has none): the compression ratio is reported only then."""
    if not teacher_backend(cfg).language_model:
        return None
    from distill.plan import meta_model

    try:
        return sum(p.numel() for p in meta_model(cfg, "teacher").parameters())
    except (DistillError, OSError, ValueError) as exc:
        log.info("export: teacher size unknown (%s); no compression ratio", str(exc).splitlines()[0])
        return None


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    record = open_stage(cfg, "export", overwrite)
    if record is None:
        return stage_dir(cfg, "export")
    from transformers import AutoTokenizer  # after the checks: a refused or finished stage answers at once

    from distill.gguf_writer import write_gguf
    from distill.plan import meta_model

    (source,) = STAGES["export"].inputs(cfg)
    model_dir = stage_dir(cfg, source) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = check_prompts(cfg, tokenizer, cfg.export.check_prompts)
    target = record.folder / gguf_name(cfg)
    with atomic_file(target) as tmp:
        written = write_gguf(model_dir, tmp, cfg.export.format)
        checks = verify(model_dir, tmp, prompts, tokenizer)
        problems = agreement_problems(cfg, checks)
        if checks["tokenization_match"] < 1.0:
            problems.insert(
                0, f"llama.cpp tokenizes {1 - checks['tokenization_match']:.0%} of prompts differently from HF"
            )
        if problems:
            raise DistillError(f"export: {target.name} failed verification: " + "; ".join(problems))
    record.files = {"gguf": target.name}
    if cfg.export.torch_int8:
        with atomic_dir(record.folder / INT8_DIR) as staging:
            write_int8(model_dir, staging)
            int8_checks = verify_int8(model_dir, staging, prompts)
            if problems := agreement_problems(cfg, int8_checks):
                raise DistillError("export: the torch int8 model failed verification: " + "; ".join(problems))
        record.files["int8"] = INT8_DIR
        record.metrics["int8_bytes"] = (record.folder / INT8_DIR / INT8_FILE).stat().st_size
        record.metrics["int8_verification"] = int8_checks

    safetensors = weights_bytes(model_dir)
    teacher_params = known_teacher_params(cfg)
    student_params = sum(p.numel() for p in meta_model(cfg, "student").parameters())
    record.metrics |= {
        "source": source,
        **written,
        "safetensors_bytes": safetensors,
        "gguf_vs_safetensors": round(written["file_bytes"] / safetensors, 4),
        "student_params": student_params,
        "verification": checks,
    }
    if teacher_params is not None:
        record.metrics |= {
            "teacher_params": teacher_params,
            "teacher_bf16_bytes": teacher_params * 2,
            "compression_vs_teacher_bf16": round(teacher_params * 2 / written["file_bytes"], 1),
        }
    log.info(
        "export: %s, %.1f MiB; tokenization match %.0f%%, top-1 %.0f%%, max |Δlogit| %.3g",
        target.name,
        written["file_bytes"] / 2**20,
        100 * checks["tokenization_match"],
        100 * checks["top1_agreement"],
        checks["max_abs_logit_diff"],
    )
    out = record.finish()
    for card in write_cards(cfg):
        log.info("export: model card %s", card)
    return out
