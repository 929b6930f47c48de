"""The compact CPU variant: GPT-2 student trained in full, L1-pruned, exported to GGUF and torch int8."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, invoke_cli, write_config

from distill.config import load_config

# models of its own, built from `models.tiny` by the pipeline: a GPT-2 student on the teacher's tokenizer
TINY = {
    "seed": 4,
    "corpus_size": 40,
    "vocab_size": 1024,
    "student_arch": "gpt2",
    "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
}
SECTIONS = {
    "generate": {"backend": "reference", "num_examples": 8, "validation_examples": 2, "test_examples": 2},
    "train": {
        "method": "full",
        "precision": "fp32",
        "max_steps": 2,
        "batch_size": 4,
        "grad_accum": 1,
        "gradient_checkpointing": False,
    },
    "merge": {"dtype": "float32", "check_prompts": 2},
    "prune": {"enabled": True, "amount": 0.4},
    "export": {"check_prompts": 2, "torch_int8": True},
    "eval": {"num_prompts": 2, "max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    from distill.models import ensure_models
    from distill.stages import generate, merge, prune, train

    root = tmp_path_factory.mktemp("compact")
    path = write_config(root, root / "models", name="c.yaml", run_name="c", tiny=TINY, **SECTIONS)
    cfg = load_config(path)
    ensure_models(cfg)
    for stage in (generate, train, merge, prune):
        stage.run(cfg)
    return path


def test_gpt2_student_uses_the_task_tokenizer(pruned) -> None:
    from transformers import AutoConfig, AutoTokenizer

    cfg = load_config(pruned)
    config = AutoConfig.from_pretrained(cfg.models.student)
    assert config.model_type == "gpt2" and (config.n_layer, config.n_embd, config.n_head) == (2, 64, 2)
    student, teacher = (
        AutoTokenizer.from_pretrained(cfg.models.student),
        AutoTokenizer.from_pretrained(cfg.models.teacher),
    )
    assert student.get_vocab() == teacher.get_vocab() and student.chat_template == teacher.chat_template


def test_prune_sparsity_exactly_as_configured(pruned) -> None:
    from safetensors.torch import load_file

    from distill.artifacts import read_manifest

    cfg = load_config(pruned)
    metrics = read_manifest(cfg.run_path / "prune")["metrics"]
    # Every attention and MLP weight of both blocks; the tied embedding/head is not pruned.
    assert metrics["pruned_layers"] == 2 * 4
    before = load_file(cfg.run_path / "merge" / "model" / "model.safetensors")
    after = load_file(cfg.run_path / "prune" / "model" / "model.safetensors")
    for name, tensor in after.items():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected = round(0.4 * tensor.numel())
            assert int((tensor == 0).sum()) == expected, name
            kept = tensor != 0
            # L1: the zeroed entries are the smallest in magnitude, the rest are unchanged.
            assert before[name][~kept].abs().max() <= before[name][kept].abs().min()
            assert (tensor[kept] == before[name][kept]).all()
        else:
            assert (tensor == before[name]).all(), name
    assert metrics["overall_sparsity"] == pytest.approx(0.4, abs=1e-4)
    assert set(metrics["layer_sparsity"]) == {
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_export_gguf_and_int8_of_the_pruned_gpt2(pruned) -> None:
    import gguf

    from distill.artifacts import read_manifest
    from distill.stages import export

    cfg = load_config(pruned)
    metrics = read_manifest(export.run(cfg))["metrics"]
    assert metrics["source"] == "prune" and metrics["architecture"] == "gpt2"
    check = metrics["verification"]
    assert check["tokenization_match"] == 1.0 and check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 0.2
    int8 = metrics["int8_verification"]
    assert int8["quantized_linears"] == 2 * 4 + 1  # every block's Conv1D, and the output head
    assert int8["top1_agreement"] == 1.0 and int8["max_abs_logit_diff"] < 0.5
    assert 0 < metrics["int8_bytes"]

    reader = gguf.GGUFReader(cfg.run_path / "export" / "c-q8_0.gguf")
    fields = reader.fields
    assert "<|im_start|>" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    for control in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert types[tokens.index(control)] == gguf.TokenType.CONTROL

    # The int8 model reloads in a fresh process, from the files alone, and computes the same logits.
    script = (
        "import sys, torch; from distill.int8 import load_int8; m = load_int8(__import__('pathlib').Path(sys.argv[1]));"
        "print(m(torch.tensor([[1, 2, 3, 4]])).logits[0, -1].tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(cfg.run_path / "export" / "int8")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    from distill.int8 import load_int8

    here = load_int8(cfg.run_path / "export" / "int8")(__import__("torch").tensor([[1, 2, 3, 4]])).logits[0, -1]
    assert json.loads(out.stdout) == pytest.approx(here.tolist(), abs=1e-5)
    # and generates like the model it came from: same stop tokens, with the KV cache
    from transformers import AutoConfig, GenerationConfig

    reloaded = load_int8(cfg.run_path / "export" / "int8")
    source = GenerationConfig.from_pretrained(cfg.run_path / "prune" / "model")
    assert reloaded.generation_config.eos_token_id == source.eos_token_id and len(source.eos_token_id) == 2
    assert reloaded.config.use_cache and AutoConfig.from_pretrained(cfg.run_path / "train" / "model").use_cache


def test_gpt2_f32_gguf_matches_hf_closely(pruned, tmp_path) -> None:
    from transformers import AutoTokenizer

    from distill.data import check_prompts
    from distill.gguf_writer import write_gguf
    from distill.stages.export import verify

    cfg = load_config(pruned)
    model_dir = cfg.run_path / "prune" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    write_gguf(model_dir, tmp_path / "f32.gguf", "f32")
    check = verify(model_dir, tmp_path / "f32.gguf", check_prompts(cfg, tokenizer, 2), tokenizer)
    assert check["tokenization_match"] == 1.0 and check["max_abs_logit_diff"] < 1e-3


def test_compact_evaluation_table(pruned) -> None:
    from distill.stages import eval as evaluation

    cfg = load_config(pruned)
    for model in ("merged", "pruned", "int8", "gguf"):
        evaluation.run(cfg, model=model)
    table = (cfg.run_path / "eval" / "comparison.md").read_text().split("Share of programs")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for title in ("merged student", "pruned student", "torch dynamic int8", "GGUF in llama.cpp"):
        assert title in rows and "–" not in rows[title].split(" | ")[5]  # perplexity measured for each


def test_prune_disabled_is_a_one_line_error(pruned) -> None:
    result = invoke_cli("prune", str(pruned), "prune.enabled=false")
    assert result.returncode == 1 and "prune.enabled=true" in result.stderr and "Traceback" not in result.stderr


def test_int8_beyond_the_agreement_thresholds_fails_the_export(pruned) -> None:
    # Last in this module: it replaces the export. An f32 GGUF passes this threshold; int8 rounding cannot.
    result = invoke_cli("export", str(pruned), "export.format=f32", "export.max_abs_logit_diff=1e-4", "--overwrite")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "torch int8 model failed verification" in error and "export.max_abs_logit_diff" in error
    from distill.artifacts import stage_status

    cfg = load_config(pruned)
    export = cfg.run_path / "export"
    assert (export / "c-f32.gguf").is_file() and not (export / "int8").exists()
    assert stage_status(cfg, "export") == "partial"  # the next `distill export` redoes it
