import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, invoke_cli, make_trained_run

from distill.config import load_config
from distill.errors import DistillError


def test_planned_q8_0_size_of_real_gemma_270m() -> None:
    from distill.gguf_writer import planned_size
    from distill.plan import meta_model

    model = meta_model(load_config(REPO / "configs/paper.yaml"))
    # 268,042,240 matrix weights in 34-byte blocks of 32, and 55,936 norm weights in f32
    assert planned_size(model, "q8_0") == 268_042_240 * 34 // 32 + 55_936 * 4 == 285_018_624
    assert planned_size(model, "f16") == 268_042_240 * 2 + 55_936 * 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_models) -> Path:
    # a run of its own: these tests merge and export it themselves, and the last leaves no GGUF behind
    return make_trained_run(tmp_path_factory.mktemp("export"), tiny_models)


def test_merge_then_export_verified_in_llama_cpp(trained_run) -> None:
    import gguf

    from distill.artifacts import read_manifest
    from distill.stages.export import run as export
    from distill.stages.merge import run as merge

    cfg = load_config(trained_run)
    merged = read_manifest(merge(cfg))["metrics"]
    assert merged["fold_max_abs_logit_diff"] < 1e-4
    folder = export(cfg)
    metrics = read_manifest(folder)["metrics"]
    check = metrics["verification"]
    assert check["tokenization_match"] == 1.0 and check["top1_agreement"] == 1.0
    assert 0 < check["max_abs_logit_diff"] < 0.2  # Q8_0 rounding is visible but small
    assert metrics["architecture"] == "gemma3" and metrics["gguf_vs_safetensors"] < 0.35

    reader = gguf.GGUFReader(folder / "e-q8_0.gguf")
    fields = reader.fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<start_of_turn>" in template
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    for control in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"):
        assert types[tokens.index(control)] == gguf.TokenType.CONTROL
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.tensor_type.name == "F32" for t in norms)


def test_missing_llama_cpp_is_a_one_line_error(trained_run, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # fails to import, as on a machine where the build was skipped
    gguf = load_config(trained_run).run_path / "export" / "e-q8_0.gguf"
    before = gguf.read_bytes()
    res = invoke_cli("eval", str(trained_run), "--model", "gguf")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "eval: llama-cpp-python is not installed; run `make setup`" in res.stderr
    assert gguf.read_bytes() == before


def test_teacher_qwen3_exports_and_agrees(trained_run, tmp_path) -> None:
    from transformers import AutoTokenizer

    from distill.gguf_writer import write_gguf
    from distill.stages.export import verify

    cfg = load_config(trained_run)
    teacher = Path(cfg.models.teacher)
    written = write_gguf(teacher, tmp_path / "teacher.gguf", "f32")
    assert written["architecture"] == "qwen3"
    tok = AutoTokenizer.from_pretrained(teacher)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True, enable_thinking=False
        )["input_ids"]
        for t in ("Plan 3 workouts for a pilot.", "Тренировки для бортпроводника, 3 раза в неделю.")
    ]
    check = verify(teacher, tmp_path / "teacher.gguf", prompts, tok)
    assert check["tokenization_match"] == 1.0 and check["top1_agreement"] == 1.0
    assert check["max_abs_logit_diff"] < 1e-2


def test_embedding_rows_past_the_tokenizer_get_placeholder_tokens(trained_run, tmp_path) -> None:
    """Qwen's and Gemma's embeddings have more rows than their tokenizers have tokens; llama.cpp needs one
    token per row, and the real tokens must still tokenize and predict as before."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.gguf_writer import write_gguf
    from distill.stages.export import verify

    for role in ("teacher", "student"):  # byte-level BPE (Qwen 3) and SentencePiece (Gemma 3)
        source = Path(getattr(load_config(trained_run).models, role))
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
        rows = len(tok) + 37
        model.resize_token_embeddings(rows, mean_resizing=False)
        padded = tmp_path / role
        model.save_pretrained(padded)
        tok.save_pretrained(padded)
        if (source / "tokenizer.model").is_file():
            (padded / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
        write_gguf(padded, tmp_path / f"{role}.gguf", "f32")
        tokens = gguf.GGUFReader(str(tmp_path / f"{role}.gguf")).fields["tokenizer.ggml.tokens"]
        assert len(tokens.data) == rows and tokens.contents(rows - 1) == f"[PAD{rows - 1}]"
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": "Plan 3 workouts for a pilot."}],
                add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]
        ]
        check = verify(padded, tmp_path / f"{role}.gguf", prompts, tok)
        assert check["tokenization_match"] == 1.0 and check["top1_agreement"] == 1.0, role


def test_bad_inputs(trained_run, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.gguf_writer import write_gguf

    other = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    with pytest.raises(DistillError, match="'llama' is not supported; supported: gemma3"):
        write_gguf(other, tmp_path / "x.gguf", "q8_0")

    # an adapter trained on another base model
    cfg = load_config(trained_run)
    adapter_cfg = Path(cfg.run_path / "train/adapter/adapter_config.json")
    original = adapter_cfg.read_text()
    adapter_cfg.write_text(json.dumps({**json.loads(original), "base_model_name_or_path": "google/gemma-3-1b-it"}))
    try:
        res = invoke_cli("merge", str(trained_run), "--overwrite")
        assert res.returncode == 1 and "adapter was trained on 'google/gemma-3-1b-it'" in res.stderr
        assert "Traceback" not in res.stderr
        assert (cfg.run_path / "merge/manifest.json").is_file()  # the finished merge was not thrown away
    finally:
        adapter_cfg.write_text(original)


def test_failed_verification_leaves_nothing_behind(trained_run) -> None:
    from distill.stages.merge import run as merge

    merge(load_config(trained_run))
    # a finished export is not replaced by another config's without --overwrite
    res = invoke_cli("export", str(trained_run), "export.max_abs_logit_diff=1e-9")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert (load_config(trained_run).run_path / "export/e-q8_0.gguf").is_file()
    res = invoke_cli("export", str(trained_run), "export.max_abs_logit_diff=1e-9", "--overwrite")
    assert res.returncode == 1 and "failed verification" in res.stderr and "Traceback" not in res.stderr
    cfg = load_config(trained_run, ["export.max_abs_logit_diff=1e-9"])
    leftovers = [p.name for p in (cfg.run_path / "export").iterdir() if p.suffix in (".gguf", ".partial")]
    assert leftovers == []
