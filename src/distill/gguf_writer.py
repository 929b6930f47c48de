"""GGUF files for llama.cpp, written with the `gguf` library: metadata, tensors, tokenizer, chat template.

Supported architectures: gemma3 (the student), gpt2 (the compact variant's student) and qwen3 (the teacher).
Matrices are stored as Q8_0 (or f16/f32), one-dimensional tensors (norms, biases) as f32, as
llama.cpp's own converter does. Q8_0 blocks are 32 values -> 34 bytes (an f16 scale + 32 int8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

SUPPORTED = {"gemma3_text": "gemma3", "gpt2": "gpt2", "qwen3": "qwen3"}
# HF GPT-2 keeps these weights in Conv1D layout (in x out); llama.cpp wants Linear's (out x in).
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
QK8_0, Q8_0_BLOCK_BYTES = 32, 34
GEMMA_SWA_PATTERN = 6  # llama.cpp's gemma3 graph: every 6th layer global, the rest sliding


def arch_of(config: Any) -> str:
    arch = SUPPORTED.get(config.model_type)
    if arch is None:
        raise DistillError(
            f"export: architecture '{config.model_type}' is not supported; supported: gemma3 (Gemma 3 text), gpt2, qwen3"
        )
    return arch


def _stored_type(name: str, shape: tuple[int, ...], fmt: str) -> str:
    """f32 for vectors; the requested format for matrices whose rows split into whole Q8_0 blocks."""
    if len(shape) < 2 or fmt == "f32":
        return "f32"
    if fmt == "q8_0" and shape[-1] % QK8_0 != 0:
        return "f16"
    return fmt


def _stored_bytes(numel: int, shape: tuple[int, ...], stored: str) -> int:
    if stored == "q8_0":
        return numel // QK8_0 * Q8_0_BLOCK_BYTES
    return numel * (2 if stored == "f16" else 4)


def _hf_tensors(model: Any) -> list[tuple[str, Any]]:
    """Named parameters the file needs: a tied output head is not stored twice."""
    seen: set[int] = set()
    out = []
    for name, param in model.state_dict(keep_vars=True).items():
        key = id(param)
        if key in seen or name.endswith("rotary_emb.inv_freq"):
            continue
        seen.add(key)
        out.append((name, param))
    return out


def planned_size(model: Any, fmt: str) -> int:
    """Bytes of tensor data the file will hold (works on the meta device: nothing is read)."""
    total = 0
    for name, param in _hf_tensors(model):
        shape = tuple(param.shape)
        total += _stored_bytes(param.numel(), shape, _stored_type(name, shape, fmt))
    return total


def _convert(arch: str, name: str, data: np.ndarray) -> np.ndarray:
    if arch == "gemma3" and name.endswith("norm.weight"):
        # Gemma's RMSNorm scales by (1 + w); llama.cpp's graph multiplies by the stored weight.
        return data + 1.0
    if arch == "gpt2" and name.endswith(GPT2_CONV1D):
        return np.ascontiguousarray(data.T)
    return data


def _add_tensor(writer: Any, gguf: Any, name: str, data: np.ndarray, stored: str) -> None:
    if stored == "q8_0":
        writer.add_tensor(
            name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
    elif stored == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, data.astype(np.float32))


def _metadata(writer: Any, arch: str, config: Any) -> None:
    if arch == "gpt2":
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    if arch == "gemma3":
        layer_types = list(getattr(config, "layer_types", []))
        expected = [
            "full_attention" if (i + 1) % GEMMA_SWA_PATTERN == 0 else "sliding_attention"
            for i in range(len(layer_types))
        ]
        if layer_types != expected:
            raise DistillError(
                "export: this Gemma 3 has a sliding/global layer pattern llama.cpp cannot express (every 6th global)"
            )
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base(float(rope.get("full_attention", {}).get("rope_theta", 1_000_000.0)))
    else:
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10_000.0))))


def _pad(tokens: list[Any], kinds: list[int], rows: int, unused: int, scores: list[float] | None = None) -> None:
    """llama.cpp needs one token per embedding row: rows past the tokenizer (a vocabulary padded for
    speed, as Qwen's and Gemma's are) get unused placeholder tokens, as llama.cpp's own converter does."""
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]".encode() if isinstance(tokens[0], bytes) else f"[PAD{i}]")
        kinds.append(unused)
        if scores is not None:
            scores.append(0.0)


def _spm_vocab(writer: Any, gguf: Any, folder: Path, tokenizer: Any, rows: int) -> None:
    """SentencePiece pieces, scores and types; the chat turn markers are CONTROL tokens."""
    import sentencepiece as spm

    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise DistillError(
            f"{folder}: no tokenizer.model; a Gemma export needs the SentencePiece model beside the weights"
        )
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if sp.GetPieceSize() != len(tokenizer):
        raise DistillError(f"{model_file}: {sp.GetPieceSize()} pieces but the tokenizer has {len(tokenizer)} tokens")
    types = gguf.TokenType
    special = set(tokenizer.all_special_ids)
    tokens, scores, kinds = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            kinds.append(types.UNKNOWN)
        elif sp.IsControl(i) or i in special:
            kinds.append(types.CONTROL)
        elif sp.IsByte(i):
            kinds.append(types.BYTE)
        elif sp.IsUnused(i):
            kinds.append(types.UNUSED)
        else:
            kinds.append(types.NORMAL)
    _pad(tokens, kinds, rows, types.UNUSED, scores)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.pad_id())
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _bpe_vocab(writer: Any, gguf: Any, tokenizer: Any, pre: str, rows: int) -> None:
    """Byte-level BPE: tokens by id, merges, and which added tokens are control tokens."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = gguf.TokenType
    tokens, kinds = [], []
    for i in range(len(tokenizer)):
        tokens.append(by_id[i])
        if i in added:
            kinds.append(types.CONTROL if added[i]["special"] else types.USER_DEFINED)
        else:
            kinds.append(types.NORMAL)
    _pad(tokens, kinds, rows, types.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    eos = tokenizer.eos_token_id
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)


def write_gguf(model_dir: Path, target: Path, fmt: str) -> dict[str, Any]:
    """Write `model_dir` (a saved HF model + tokenizer) as GGUF; returns what was written."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    arch = arch_of(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise DistillError(f"{model_dir}: tokenizer has more tokens ({len(tokenizer)}) than the embedding rows")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(target), arch)
    writer.add_name(model_dir.name)
    writer.add_file_type(
        {
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "f32": gguf.LlamaFileType.ALL_F32,
        }[fmt]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _metadata(writer, arch, config)
    if arch == "gemma3":
        _spm_vocab(writer, gguf, model_dir, tokenizer, rows)
    else:
        _bpe_vocab(writer, gguf, tokenizer, "qwen2", rows)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    data_bytes = 0
    for name, param in _hf_tensors(model):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DistillError(f"export: no GGUF name for tensor {name} of {arch}")
        data = _convert(arch, name, param.detach().float().numpy())
        stored = _stored_type(name, data.shape, fmt)
        _add_tensor(writer, gguf, gguf_name, data, stored)
        data_bytes += _stored_bytes(data.size, data.shape, stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "format": fmt, "tensor_bytes": data_bytes, "file_bytes": target.stat().st_size}
