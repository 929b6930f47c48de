"""The torch dynamic-int8 file format of the compact variant, beside the GGUF writer: torchao's dynamic int8
(int8 weights with one scale per output row, activations quantized per token on the fly) stored as one
safetensors file of the int8 weights and their scales plus the float tensors, and the HF config to rebuild
the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError

INT8_DIR = "int8"
INT8_FILE = "model.safetensors"


def _to_linear(model: Any) -> Any:
    """GPT-2's Conv1D is a Linear with a transposed weight; torchao quantizes nn.Linear only."""
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
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    # no torch.compile here: torchao would otherwise retune inductor's global settings for it
    quantize_(_to_linear(model), Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return model


def int8_linears(model: Any) -> dict[str, Any]:
    """The Linear layers whose weight torchao quantized, by module name."""
    from torchao.quantization import Int8Tensor

    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int8Tensor)}


def _int8_tensors(model: Any) -> dict[str, Any]:
    """Plain tensors of the quantized model, for safetensors: each quantized Linear as its int8 weights and
    per-row scales (its float bias among the parameters); every other parameter and buffer as is."""
    quantized = int8_linears(model)
    tensors = {}
    for name, module in quantized.items():
        tensors[f"{name}.qweight"] = module.weight.qdata.contiguous()
        tensors[f"{name}.qscale"] = module.weight.scale.contiguous()
    skip = {f"{name}.weight" for name in quantized}
    named = (*model.named_parameters(), *model.named_buffers())
    return tensors | {name: t.detach().contiguous() for name, t in named if name not in skip}


def load_int8(folder: Path) -> Any:
    """The int8 model written by `write_int8`: the architecture rebuilt from config.json, quantized the
    same way, then the stored int8 weights, scales and float tensors put in place."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    model = _quantize(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    # from_config derives one from config.json alone: the stop tokens of the chat turn would be lost
    model.generation_config = GenerationConfig.from_pretrained(folder)
    tensors = load_file(folder / INT8_FILE)
    quantized = int8_linears(model)
    expected = {f"{n}.{part}" for n in quantized for part in ("qweight", "qscale")}
    skip = {f"{name}.weight" for name in quantized}
    floats = {n: t for n, t in (*model.named_parameters(), *model.named_buffers()) if n not in skip}
    if set(tensors) != expected | set(floats):
        raise DistillError(
            f"{folder / INT8_FILE}: does not match config.json (differing tensors: "
            f"{sorted(set(tensors) ^ (expected | set(floats)))[:3]}); re-run `distill export ... --overwrite`"
        )
    with torch.no_grad():
        for name, module in quantized.items():
            module.weight.qdata.copy_(tensors[f"{name}.qweight"])
            module.weight.scale.copy_(tensors[f"{name}.qscale"])
        for name, tensor in floats.items():
            tensor.copy_(tensors[name])
    return model.eval()


def write_int8(model_dir: Path, target: Path) -> None:
    """Dynamic int8 of the (merged or pruned) model through torchao: int8 Linear weights, activations
    quantized on the fly; embeddings and norms stay float32."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    target.mkdir(parents=True)
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    save_file(_int8_tensors(_quantize(model)), target / INT8_FILE)
