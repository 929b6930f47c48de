import hashlib
from pathlib import Path

import pytest
from conftest import crew_task, write_config

from distill.config import TinyModelsConfig
from distill.models import build_tiny

SPEC = TinyModelsConfig(seed=3, corpus_size=60)  # the builder is under test here: builds of its own, not `tiny_models`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny(tmp_path_factory.mktemp("tiny"), SPEC, crew_task())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_models_load_generate_and_are_deterministic(tiny, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role, arch in (("teacher", "qwen3"), ("student", "gemma3_text")):
        model = AutoModelForCausalLM.from_pretrained(tiny[role])
        tok = AutoTokenizer.from_pretrained(tiny[role])
        assert model.config.model_type == arch
        ids = tok("Workout 1: push", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] in model.generation_config.eos_token_id
        assert torch.isfinite(model(**ids).logits).all()
    again = build_tiny(tmp_path, SPEC, crew_task())
    assert _digest(again["student"]) == _digest(tiny["student"])
    assert _digest(again["teacher"]) == _digest(tiny["teacher"])


def test_qwen3_template_thinking_switch(tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    msgs = [{"role": "user", "content": "plan"}]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off == "<|im_start|>user\nplan<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nplan<|im_end|>\n<|im_start|>assistant\n"
    history = msgs + [{"role": "assistant", "content": "<think>hmm</think>\n\nWorkout 1: push"}]
    assert "hmm" not in tok.apply_chat_template(history, tokenize=False)
    assert tok.eos_token == "<|im_end|>"


def test_gemma_template_and_control_tokens(tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "plan"},
        {"role": "assistant", "content": "ok"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<bos><start_of_turn>user\nBe brief.\n\nplan<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>\n<start_of_turn>model\n"
    )
    for special in ("<start_of_turn>", "<end_of_turn>", "<bos>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<end_of_turn>" and tok.pad_token_id == 0


def test_every_byte_is_representable(tiny) -> None:
    from transformers import AutoTokenizer

    text = "Жим штанги лёжа 3x10 @ 27.5 кг ☃ 😀 \t tabs  and  spaces"
    for role in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(tiny[role])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_sentencepiece_and_hf_tokenizers_agree(tiny) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny["student"] / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    texts = crew_task().corpus(20, 11) + ["  two  spaces\n\n\ttab 0123456789 ☃"]
    for text in texts:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_changed_spec_rebuilds_configured_folders(tmp_path) -> None:
    from distill.config import load_config
    from distill.models import ensure_models

    cfg_path = write_config(tmp_path, tmp_path / "m", run_dir=None, tiny={"seed": 1, "corpus_size": 20})
    ensure_models(load_config(cfg_path))
    first = _digest(tmp_path / "m/student")
    ensure_models(load_config(cfg_path))  # unchanged spec: kept as is
    assert _digest(tmp_path / "m/student") == first
    ensure_models(load_config(cfg_path, ["models.tiny.seed=2"]))
    assert _digest(tmp_path / "m/student") != first
