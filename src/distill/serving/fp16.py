"""Gemma 3's known failure on GPUs without bf16 (Turing and older): activations beyond fp16's range.
llama.cpp on such a card computes with f16 activations, so measure how close the student comes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FP16_MAX = 65504.0
# Below this headroom (fp16 max / largest activation) one unlucky input can overflow.
MIN_HEADROOM = 2.0


def activation_peak(model_dir: Path, prompts: list[str]) -> float:
    """Largest |value| any module outputs while the fp32 student reads the prompts (chat-formatted)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peak = 0.0

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        nonlocal peak
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            peak = max(peak, float(tensor.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                )
                model(**ids)
    finally:
        for handle in handles:
            handle.remove()
    return peak


def fp16_risk(capability: float | None, model_dir: Path | None, prompts: list[str]) -> dict[str, Any]:
    """Whether the planned card runs f16 activations, and if so how much headroom the student has."""
    if capability is not None and capability >= 8.0:
        return {"f16_activations": False, "note": f"compute capability {capability} has bf16: no fp16 overflow risk"}
    card = "an unknown GPU" if capability is None else f"compute capability {capability} (no bf16)"
    if model_dir is None or not model_dir.is_dir():
        return {"f16_activations": True, "at_risk": None, "note": f"{card}: not checked, no merged model to measure"}
    peak = activation_peak(model_dir, prompts)
    headroom = FP16_MAX / peak if peak else float("inf")
    at_risk = headroom < MIN_HEADROOM
    return {
        "f16_activations": True,
        "at_risk": at_risk,
        "max_abs_activation": round(peak, 2),
        "headroom": round(headroom, 2),
        "prompts": len(prompts),
        "note": (
            f"{card} runs the GGUF with f16 activations; largest |activation| of the merged student in fp32 over "
            f"{len(prompts)} held-out prompts (every module's output) is {peak:,.1f} against fp16's {FP16_MAX:,.0f} "
            f"({headroom:,.1f}x headroom): " + ("AT RISK of overflow" if at_risk else "no overflow expected")
        ),
    }
