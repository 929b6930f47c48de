"""Stage 4: the merged (or pruned) model as a GGUF file verified in llama.cpp, and optionally as torch int8.

Verification (recorded in the manifest; the stage fails when it does not hold): on validation prompts
llama.cpp's tokenization of the chat-formatted prompt equals the HF tokenizer's, and its next-token
logits agree with the HF merged model (top-1 agreement and max abs difference against thresholds).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from distill.artifacts import StageRecord, prepare_output, require_input, stage_dir
from distill.config import PipelineConfig
from distill.errors import DistillError

log = logging.getLogger(__name__)


def llama_cpp(stage: str) -> Any:
    """The llama_cpp module, or a one-line error naming the fix (it is built from source, so it can be missing)."""
    try:
        import llama_cpp
    except ImportError:
        raise DistillError(
            f"{stage}: llama-cpp-python is not installed; run `make setup` (it builds and caches the wheel)"
        ) from None
    return llama_cpp


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
    llm = Llama(
        model_path=str(gguf_path), n_ctx=longest + 8, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1
    )
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


INT8_DIR = "int8"
INT8_FILE = "model.safetensors"


def _to_linear(model: Any) -> Any:
    """GPT-2's Conv1D is a Linear with a transposed weight; dynamic quantization only knows nn.Linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1])
            linear.weight.data = module.weight.data.t().contiguous()
            linear.bias.data = module.bias.data
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def _quantize(model: Any) -> Any:
    import torch
    from torch.ao.quantization import quantize_dynamic

    if "fbgemm" in torch.backends.quantized.supported_engines:  # x86; ARM machines keep their default
        torch.backends.quantized.engine = "fbgemm"
    return quantize_dynamic(_to_linear(model), {torch.nn.Linear}, dtype=torch.qint8)


def _int8_tensors(model: Any) -> dict[str, Any]:
    """Plain tensors of a dynamically quantized model, for safetensors: each quantized Linear as its int8
    weights, per-tensor scale and zero point (and float bias); every other parameter and buffer as is.
    Pickling quantized tensors instead depends on import order (torch.per_tensor_affine has no module)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._weight_bias()
            tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
            tensors[f"{name}.qscale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
            tensors[f"{name}.qzero_point"] = torch.tensor(weight.q_zero_point())
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    tensors |= {name: t.detach().contiguous() for name, t in (*model.named_parameters(), *model.named_buffers())}
    return tensors


def load_int8(folder: Path) -> Any:
    """The int8 model written by `write_int8`: the architecture rebuilt from config.json, quantized the
    same way, then the stored int8 weights and float tensors put in place."""
    import torch
    from safetensors.torch import load_file
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    model = _quantize(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    # from_config derives one from config.json alone: the stop tokens of the chat turn would be lost
    model.generation_config = GenerationConfig.from_pretrained(folder)
    tensors = load_file(folder / INT8_FILE)
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            weight = torch._make_per_tensor_quantized_tensor(
                tensors.pop(f"{name}.qweight"),
                float(tensors.pop(f"{name}.qscale")),
                int(tensors.pop(f"{name}.qzero_point")),
            )
            module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    floats = dict(model.named_parameters()) | dict(model.named_buffers())
    if set(tensors) != set(floats):
        raise DistillError(
            f"{folder / INT8_FILE}: does not match config.json (differing tensors: "
            f"{sorted(set(tensors) ^ set(floats))[:3]}); re-run `distill export ... --overwrite`"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            floats[name].copy_(tensor)
    return model.eval()


def write_int8(model_dir: Path, target: Path) -> None:
    """PyTorch dynamic int8 of the (merged or pruned) model: int8 Linear weights, activations quantized
    on the fly; embeddings and norms stay float32."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    target.mkdir(parents=True)
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    save_file(_int8_tensors(_quantize(model)), target / INT8_FILE)


def verify_int8(model_dir: Path, int8_dir: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """Next-token agreement of the reloaded int8 model with the float model it came from."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
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
    quantized = sum(isinstance(m, DynamicLinear) for m in int8.modules())
    return {
        "prompts": len(prompts),
        "top1_agreement": top1 / len(prompts),
        "max_abs_logit_diff": worst,
        "quantized_linears": quantized,
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


def source_stage(cfg: PipelineConfig) -> str:
    """The compact variant exports the pruned model, the LoRA pipeline the merged one."""
    return "prune" if cfg.prune.enabled else "merge"


def known_teacher_params(cfg: PipelineConfig) -> int | None:
    """The teacher's size where a model wrote the data and its architecture is at hand (an API teacher
    without `models.teacher_arch` has none): the compression ratio is reported only then."""
    if cfg.generate.backend == "reference":
        return None
    from distill.plan import meta_model

    try:
        return sum(p.numel() for p in meta_model(cfg, "teacher").parameters())
    except (DistillError, OSError, ValueError) as exc:
        log.info("export: teacher size unknown (%s); no compression ratio", str(exc).splitlines()[0])
        return None


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    from transformers import AutoTokenizer

    from distill.gguf_writer import write_gguf
    from distill.plan import meta_model
    from distill.stages.merge import check_prompts

    folder = stage_dir(cfg, "export")
    source = source_stage(cfg)
    require_input(cfg, source)
    if prepare_output(cfg, "export", overwrite) == "skip":
        log.info("export: complete, skipping (%s)", folder)
        return folder
    log.info("export config: %s", cfg.export.model_dump())
    record = StageRecord(cfg, "export", inputs=(source,))
    model_dir = stage_dir(cfg, source) / "model"
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
    problems = agreement_problems(cfg, checks)
    if checks["tokenization_match"] < 1.0:
        problems.insert(0, f"llama.cpp tokenizes {1 - checks['tokenization_match']:.0%} of prompts differently from HF")
    if problems:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"export: {target.name} failed verification: " + "; ".join(problems))
    os.replace(tmp, target)
    record.files = {"gguf": target.name}
    if cfg.export.torch_int8:
        int8_dir = folder / INT8_DIR
        staging = folder / f"{INT8_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(int8_dir, ignore_errors=True)
        write_int8(model_dir, staging)
        staging.rename(int8_dir)
        record.files["int8"] = INT8_DIR
        record.metrics["int8_bytes"] = (int8_dir / INT8_FILE).stat().st_size
        int8_checks = verify_int8(model_dir, int8_dir, check_prompts(cfg, tokenizer, cfg.export.check_prompts))
        if problems := agreement_problems(cfg, int8_checks):
            shutil.rmtree(int8_dir)
            raise DistillError("export: the torch int8 model failed verification: " + "; ".join(problems))
        record.metrics["int8_verification"] = int8_checks

    safetensors = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
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
    return record.finish()
