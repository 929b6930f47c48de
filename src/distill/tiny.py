"""Tiny random teacher (Qwen3) and student (Gemma 3, or GPT-2 for the compact variant) built locally, with
tokenizers trained on task text.

They stand in for Qwen3-4B and Gemma-3-270M-it wherever no hub is reachable (tests, demo, CI), with
the same architectures, chat templates and tokenizer kinds: byte-level BPE for the teacher like
Qwen's, a SentencePiece BPE model with byte fallback for the student like Gemma's (kept as
`tokenizer.model`, because the GGUF export writes its pieces and scores for llama.cpp).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# ChatML with Qwen3's thinking switch: without thinking, the generation prompt carries an empty
# think block, and earlier assistant turns lose their reasoning.
QWEN3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
# Gemma's turns: a system message is folded into the first user turn; the assistant speaks as "model".
GEMMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if role == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- message['content'] | trim -}}{{- '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# As in Qwen3, the think tags are added tokens but not special ones, so decoding keeps them visible.
QWEN_THINK = ["<think>", "</think>"]
# Qwen2's pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GEMMA_TURNS = ["<start_of_turn>", "<end_of_turn>"]
STUDENT_EMBED_STD = 0.1
SPEC_FILE = "tiny_spec.json"  # what a folder was built from, so a changed spec triggers a rebuild


def spec_json(spec: Any, texts: list[str]) -> str:
    # The builder's own constants and the tokenizer corpus (the task's text) are part of what a folder
    # was built from: another task needs other tokenizers.
    corpus = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return json.dumps(
        {**spec.model_dump(), "student_embed_std": STUDENT_EMBED_STD, "corpus_sha256": corpus}, indent=2, sort_keys=True
    )


def _teacher_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_THINK])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_TEMPLATE,
        model_max_length=1 << 20,
    )


def _student_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Any:
    """Train SentencePiece BPE with Gemma's settings, keep tokenizer.model, and build the HF tokenizer
    from the same pieces so both tokenize identically."""
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=GEMMA_TURNS,
        byte_fallback=True,
        split_digits=True,
        # let pieces span "_": exercise ids become one or two tokens instead of four or five, which cuts
        # sequences by a third and makes copying them from the prompt far easier for a tiny model
        split_by_unicode_script=False,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        hard_vocab_limit=False,  # task text is repetitive: accept fewer pieces than asked for
        # SentencePiece skips a longer text without a word: a task of long inputs would lose them from its corpus
        max_sentence_length=max(1 << 16, *(len(t.encode()) + 1 for t in texts)),
        num_threads=2,
        minloglevel=2,
    )
    model_path = folder / "tokenizer.model"
    model_path.write_bytes(buffer.getvalue())
    extracted = SentencePieceExtractor(str(model_path)).extract(BPE)
    tokenizer = GemmaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        mask_token=None,  # not a SentencePiece piece: it would add a token llama.cpp never sees
        chat_template=GEMMA3_TEMPLATE,
        model_max_length=1 << 20,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in GEMMA_TURNS]}
    )
    tokenizer.eos_token = "<end_of_turn>"
    return tokenizer


def _teacher_config(spec: Any, tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def _student_config(spec: Any, tokenizer: Any, special_ids: tuple[int, int, int] = (0, 1, 2)) -> Any:
    """Gemma 3; `special_ids` are pad, eos and bos (Gemma's own unless it speaks the teacher's tokenizer)."""
    from transformers import Gemma3TextConfig

    # Every 6th layer global, the rest sliding, exactly as Gemma 3 (and llama.cpp's gemma3 graph) has it.
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(spec.num_layers)]
    return Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        query_pre_attn_scalar=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=spec.sliding_window,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=special_ids[0],
        eos_token_id=special_ids[1],
        bos_token_id=special_ids[2],
    )


def _gpt2_config(spec: Any, tokenizer: Any) -> Any:
    from transformers import GPT2Config

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.max_position_embeddings,
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_heads,
        n_inner=spec.intermediate_size,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def _save(
    model_cls: Any,
    config: Any,
    tokenizer: Any,
    folder: Path,
    eos_ids: list[int],
    seed: int,
    embed_std: float | None = None,
) -> None:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config)
    if embed_std is not None:
        model.get_input_embeddings().weight.data.normal_(0.0, embed_std)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_ids, pad_token_id=config.pad_token_id
    ).save_pretrained(folder)


def build_tiny_models(out_dir: Path, texts: list[str], spec: Any) -> dict[str, Path]:
    """Build `out_dir/teacher` and `out_dir/student`, deterministic in `spec.seed` and `texts`."""
    from transformers import Gemma3ForCausalLM, Qwen3ForCausalLM

    teacher_dir, student_dir = out_dir / "teacher", out_dir / "student"
    teacher_dir.mkdir(parents=True, exist_ok=True)
    student_dir.mkdir(parents=True, exist_ok=True)

    teacher_tok = _teacher_tokenizer(texts, spec.vocab_size)
    teacher_cfg = _teacher_config(spec.teacher, teacher_tok)
    eos = [teacher_tok.convert_tokens_to_ids("<|im_end|>"), teacher_tok.convert_tokens_to_ids("<|endoftext|>")]
    _save(Qwen3ForCausalLM, teacher_cfg, teacher_tok, teacher_dir, eos, spec.seed)

    if spec.student_arch == "gpt2":
        from transformers import GPT2LMHeadModel

        # The compact variant's student speaks the task tokenizer (the teacher's), trained in full.
        _save(GPT2LMHeadModel, _gpt2_config(spec.student, teacher_tok), teacher_tok, student_dir, eos, spec.seed + 1)
    elif spec.student_arch == "qwen3":  # the teacher's architecture and tokenizer: a teacher to train
        _save(
            Qwen3ForCausalLM, _teacher_config(spec.student, teacher_tok), teacher_tok, student_dir, eos, spec.seed + 1
        )
    elif spec.student_tokenizer == "teacher":  # Gemma 3 speaking the teacher's tokenizer: a same-tokenizer pair
        ids = (teacher_cfg.pad_token_id, teacher_cfg.eos_token_id, teacher_cfg.bos_token_id)
        student_cfg = _student_config(spec.student, teacher_tok, ids)
        _save(Gemma3ForCausalLM, student_cfg, teacher_tok, student_dir, eos, spec.seed + 1, embed_std=STUDENT_EMBED_STD)
    else:
        student_tok = _student_tokenizer(texts, spec.vocab_size, student_dir)
        student_cfg = _student_config(spec.student, student_tok)
        eos = [1, student_tok.convert_tokens_to_ids("<end_of_turn>")]
        # HF's 0.02 init gives the tied head logits of only about +-2.6: LoRA, which cannot reach the
        # embeddings, then stalls near loss 6. A pre-trained Gemma's head is far sharper than that.
        _save(Gemma3ForCausalLM, student_cfg, student_tok, student_dir, eos, spec.seed + 1, embed_std=STUDENT_EMBED_STD)

    for folder in (teacher_dir, student_dir):
        (folder / SPEC_FILE).write_text(spec_json(spec, texts))
    return {"teacher": teacher_dir, "student": student_dir}
