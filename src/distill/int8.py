"""The torch dynamic-int8 file format of the compact variant, beside the GGUF writer: one safetensors file of
int8 weights with their scales and zero points, plus the float tensors, and the HF config to rebuild the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError

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
