"""The memory plan of both fleets, every term in bytes with where it came from.

The paper's fleet: n = floor(V_GPU / (V_small + V_batch)) processes of one sequence each. The server's
way: one process holding the weights once, with N slots sharing one KV pool, N = the most slots whose
KV cache and output rows fit beside the weights and one compute graph in the same V_GPU (llama.cpp takes
at most 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError

MIB = 2**20
GIB = 2**30
# Memory and compute capability of the GPUs we plan for. Gemma 3 needs bf16 (fp16 overflows), and
# vLLM only runs bf16 from compute capability 8.0, so Turing cards serve it through llama.cpp.
GPU_PROFILES: dict[str, tuple[int, float]] = {
    "rtx2060-6gb": (6 * GIB, 7.5),
    "rtx3060-12gb": (12 * GIB, 8.6),
    "t4-16gb": (16 * GIB, 7.5),
    "l4-24gb": (24 * GIB, 8.9),
    "a10-24gb": (24 * GIB, 8.6),
    "a100-40gb": (40 * GIB, 8.0),
    "a100-80gb": (80 * GIB, 8.0),
    "h100-80gb": (80 * GIB, 9.0),
}
KV_BYTES = 2  # llama.cpp keeps K and V in f16 by default
LOGIT_BYTES = 4  # logits are f32
UBATCH = 512  # llama.cpp's default physical batch: sizes its compute buffer
LLAMA_MAX_SEQ = 256  # llama.cpp refuses a context with more sequences (slots) than this


@dataclass(frozen=True)
class Geometry:
    """What the KV cache and logits of one model depend on."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    hidden: int
    sliding_window: int | None = None
    sliding_layers: int = 0


def geometry_of(config: Any) -> Geometry:
    """From a transformers config (Gemma 3 marks each layer full or sliding in `layer_types`)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return Geometry(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        sliding_window=window,
        sliding_layers=sum(t == "sliding_attention" for t in layer_types) if window else 0,
    )


def kv_cache_bytes(geo: Geometry, context: int, parallel: int, ubatch: int = UBATCH) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x cells x bytes. A sliding-window layer only keeps
    its window plus one physical batch of cells per sequence, as llama.cpp's SWA cache does."""
    per_cell_per_layer = 2 * geo.kv_heads * geo.head_dim * KV_BYTES
    full_layers = geo.layers - geo.sliding_layers
    swa_cells = min(context, (geo.sliding_window or 0) + ubatch)
    return per_cell_per_layer * parallel * (full_layers * context + geo.sliding_layers * swa_cells)


def output_rows_bytes(geo: Geometry, parallel: int) -> int:
    """One row of f32 logits per sequence in the output buffer."""
    return geo.vocab * parallel * LOGIT_BYTES


def graph_bytes(geo: Geometry, ubatch: int = UBATCH) -> int:
    """The compute graph is reserved for a whole physical batch of hidden states and logits."""
    return ubatch * geo.vocab * LOGIT_BYTES + ubatch * geo.hidden * 4 * 8


def compute_buffer_bytes(geo: Geometry, parallel: int, ubatch: int = UBATCH) -> int:
    """The vocabulary-sized logits dominate: output rows per sequence plus one graph."""
    return output_rows_bytes(geo, parallel) + graph_bytes(geo, ubatch)


def budget_bytes(cfg: PipelineConfig) -> tuple[int, str]:
    serve = cfg.serve
    if serve.v_gpu_mb is not None:
        return int(serve.v_gpu_mb * MIB), "serve.v_gpu_mb"
    if serve.gpu_profile not in GPU_PROFILES:
        raise DistillError(
            f"serve.gpu_profile: unknown GPU '{serve.gpu_profile}'; use one of {', '.join(GPU_PROFILES)} "
            "or set serve.v_gpu_mb"
        )
    return GPU_PROFILES[serve.gpu_profile][0], f"gpu profile {serve.gpu_profile}"


def compute_capability(cfg: PipelineConfig) -> float | None:
    if cfg.serve.v_gpu_mb is not None:
        return None
    return GPU_PROFILES.get(cfg.serve.gpu_profile, (0, None))[1]


def plan_serving(cfg: PipelineConfig, model_bytes: int | None = None) -> dict[str, Any]:
    """Both fleets on the same budget, every term with its source."""
    from distill.plan import load_arch

    serve = cfg.serve
    geo = geometry_of(load_arch(cfg, "student"))
    v_gpu, gpu_source = budget_bytes(cfg)
    kv = kv_cache_bytes(geo, serve.context, serve.parallel, serve.ubatch)
    compute = compute_buffer_bytes(geo, serve.parallel, serve.ubatch)
    if serve.v_small_mb is not None:
        v_small, small_source = int(serve.v_small_mb * MIB), "serve.v_small_mb"
    else:
        weights, weights_source = _weights_bytes(cfg, model_bytes)
        v_small = weights + int(serve.runtime_overhead_mb * MIB)
        small_source = f"estimate: {weights_source} + serve.runtime_overhead_mb"
    if serve.v_batch_mb is not None:
        v_batch, batch_source = int(serve.v_batch_mb * MIB), "serve.v_batch_mb"
        # A given V_batch cannot be split into graph and per-sequence parts: count it per slot.
        server_fixed, per_slot = v_small, v_batch
    else:
        v_batch, batch_source = kv + compute, "estimate: KV cache + compute buffers"
        server_fixed = v_small + graph_bytes(geo, serve.ubatch)
        per_slot = kv_cache_bytes(geo, serve.context, 1, serve.ubatch) + output_rows_bytes(geo, 1)
    return {
        "gpu": serve.gpu_profile if serve.v_gpu_mb is None else "custom",
        "v_gpu_bytes": v_gpu,
        "v_gpu_source": gpu_source,
        "v_small_bytes": v_small,
        "v_small_source": small_source,
        "v_batch_bytes": v_batch,
        "v_batch_source": batch_source,
        "kv_cache_bytes": kv,
        "compute_buffer_bytes": compute,
        "geometry": geo.__dict__,
        "context": serve.context,
        "parallel": serve.parallel,
        "ubatch": serve.ubatch,
        "instances": int(v_gpu // (v_small + v_batch)),
        "server_fixed_bytes": server_fixed,
        "server_per_slot_bytes": per_slot,
        "slots": min(LLAMA_MAX_SEQ, int(max(0, v_gpu - server_fixed) // per_slot)),
        "vllm_supported": _vllm_note(cfg),
        "fp16_note": _fp16_note(compute_capability(cfg)),
    }


def server_bytes(plan: dict[str, Any], slots: int) -> int:
    """What one server with `slots` slots is planned to hold."""
    return plan["server_fixed_bytes"] + slots * plan["server_per_slot_bytes"]


def too_small(plan: dict[str, Any]) -> str | None:
    """The error when not even one sequence fits, with the missing MiB."""
    need = min(plan["v_small_bytes"] + plan["v_batch_bytes"], server_bytes(plan, 1))
    if plan["instances"] >= 1 or plan["slots"] >= 1:
        return None
    return (
        f"serve: budget {plan['v_gpu_bytes'] / MIB:,.0f} MiB ({plan['v_gpu_source']}) is too small for one "
        f"instance: it needs {need / MIB:,.0f} MiB, {(need - plan['v_gpu_bytes']) / MIB:,.0f} MiB missing"
    )


def _weights_bytes(cfg: PipelineConfig, model_bytes: int | None) -> tuple[int, str]:
    if model_bytes is not None:
        return model_bytes, "model file size"
    from distill.gguf_writer import planned_size
    from distill.plan import meta_model

    if cfg.serve.backend == "vllm":
        return 2 * sum(p.numel() for p in meta_model(cfg).parameters()), "bf16 weights of the student"
    return planned_size(meta_model(cfg), cfg.export.format), f"planned {cfg.export.format} size of the student"


def _vllm_note(cfg: PipelineConfig) -> str:
    capability = compute_capability(cfg)
    if capability is None:
        return "unknown GPU: vLLM needs compute capability >= 8.0 for Gemma 3 (bf16)"
    if capability >= 8.0:
        return f"yes: compute capability {capability} runs Gemma 3 in bf16 under vLLM"
    return (
        f"no: compute capability {capability} has no bf16 in vLLM and Gemma 3 overflows in fp16; "
        "serve the Q8_0 GGUF through llama.cpp"
    )


def _fp16_note(capability: float | None) -> str:
    if capability is not None and capability >= 8.0:
        return f"no: compute capability {capability} has bf16"
    return (
        "yes: no bf16 on this card, so llama.cpp computes in f16 and Gemma 3 may overflow; `distill serve` "
        "measures the student's largest activation against fp16's 65,504"
    )


def check_backend(cfg: PipelineConfig) -> None:
    """vLLM runs Gemma 3 only in bf16, which it supports from compute capability 8.0."""
    if cfg.serve.backend == "vllm" and (compute_capability(cfg) or 8.0) < 8.0:
        raise DistillError(f"serve.backend=vllm: {_vllm_note(cfg)}; set serve.backend=llama_cpp")


def format_plan(plan: dict[str, Any]) -> list[tuple[str, str]]:
    def mib(n: int) -> str:
        return f"{n:,} B ({n / MIB:,.1f} MiB)"

    return [
        ("V_GPU", f"{mib(plan['v_gpu_bytes'])} — {plan['v_gpu_source']}"),
        ("V_small", f"{mib(plan['v_small_bytes'])} — {plan['v_small_source']}"),
        ("V_batch", f"{mib(plan['v_batch_bytes'])} — {plan['v_batch_source']}"),
        ("  KV cache", mib(plan["kv_cache_bytes"])),
        ("  compute buffers", mib(plan["compute_buffer_bytes"])),
        ("n = floor(V_GPU / (V_small + V_batch))", f"{plan['instances']} processes"),
        ("one server: weights + graph", mib(plan["server_fixed_bytes"])),
        ("one server: per slot (KV + output row)", mib(plan["server_per_slot_bytes"])),
        (
            f"N = floor((V_GPU - weights - graph) / per slot), at most {LLAMA_MAX_SEQ}",
            f"{plan['slots']} slots in one process",
        ),
        ("vLLM for this GPU", plan["vllm_supported"]),
        ("f16 activations (overflow risk)", plan["fp16_note"]),
    ]


def preview(cfg: PipelineConfig) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    """`distill serve --dry-run`: both fleets' plans, from the served model's size once it exists."""
    from distill.artifacts import is_complete
    from distill.models import served_model, weights_bytes

    check_backend(cfg)
    upstream = "export" if cfg.serve.backend == "llama_cpp" else "merge"
    size = weights_bytes(served_model(cfg)) if is_complete(cfg, upstream) else None
    plan = plan_serving(cfg, model_bytes=size)
    return f"serving plan: {plan['gpu']}", plan, format_plan(plan)
