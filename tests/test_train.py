import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, crew_task, invoke_cli, write_config

from distill.config import load_config
from distill.errors import DistillError

TRAIN = {
    "lora": {"r": 8, "alpha": 16},
    "lr": 5e-3,
    "warmup_steps": 1,
    "batch_size": 4,
    "grad_accum": 2,
    "max_length": 512,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "save_steps": 2,
    "logging_steps": 1,
}


def examples(n: int) -> list[dict]:
    """Short prompts with real planner programs as answers, so steps are fast."""
    task = crew_task()
    rows = []
    for i in range(n):
        example = task.example("train", i)
        profile = example.payload["profile"]
        prompt = f"Plan 3 workouts: {profile['level']}, {profile['frequency']}/week, {profile['goal']}."
        rows.append({"id": f"ex{i}", "prompt": prompt, "response": example.reference})
    return rows


def make_run(
    tmp_path: Path, models: Path, n: int = 24, columns: tuple[str, ...] = ("id", "prompt", "response"), **train
) -> Path:
    """A config (TRAIN with `train`'s changes) plus a finished generate stage holding `n` examples."""
    from datasets import Dataset, DatasetDict

    from distill.artifacts import StageRecord, prepare_output, stage_dir

    generate = {"backend": "reference", "num_examples": n, "validation_examples": 0, "test_examples": 0}
    path = write_config(tmp_path, models, seed=0, generate=generate, train={**TRAIN, **train})
    cfg = load_config(path)
    prepare_output(cfg, "generate", overwrite=False)
    rows = examples(n)
    data = {c: [r[c] for r in rows] for c in columns}
    DatasetDict({"train": Dataset.from_dict(data)}).save_to_disk(str(stage_dir(cfg, "generate") / "dataset"))
    StageRecord(cfg, "generate").finish()
    return path


def test_unmasked_labels_are_exactly_response_and_end_of_turn(tiny_models) -> None:
    from transformers import AutoTokenizer

    from distill.sft_data import IGNORE, Collator, encode_example

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    rows = examples(6)
    batch = Collator(tok.pad_token_id)(
        [vars(encode_example(tok, r["prompt"], r["response"], 4096, r["id"])) for r in rows]
    )
    for i, row in enumerate(rows):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        trained = [int(t) for t in labels if t != IGNORE]
        # independent of the encoder: the label ids are the tail of the real tokens, and decode to the answer
        assert tok.decode(trained) == row["response"] + "<end_of_turn>"
        n_real = int(batch["attention_mask"][i].sum())
        assert trained == [int(t) for t in ids[n_real - len(trained) : n_real]]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        assert tok.decode(ids[: n_real - len(trained)]) == prompt
        assert all(int(t) == IGNORE for t in labels[n_real:])


def test_example_without_trainable_tokens_fails_loudly(tiny_models) -> None:
    from transformers import AutoTokenizer

    from distill.sft_data import encode_example

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    with pytest.raises(DistillError, match="example x1: no trainable tokens"):
        encode_example(tok, "a long prompt " * 50, "Workout 1: push", 20, "x1")
    # too long but with answer tokens left: cut at the end, flagged, the prompt intact
    row = examples(1)[0]
    whole = encode_example(tok, row["prompt"], row["response"], 4096, "x2")
    cut = encode_example(tok, row["prompt"], row["response"], len(whole.input_ids) - 10, "x2")
    assert cut.truncated and not whole.truncated
    assert cut.input_ids == whole.input_ids[:-10] and cut.labels == whole.labels[:-10]


@pytest.mark.parametrize("softcap", [None, 0.05])  # the random logits are small: 0.05 makes tanh saturate
def test_chunked_response_loss_equals_full_logits_loss(tiny_models, softcap) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.loss import attach_response_loss
    from distill.sft_data import Collator, encode_example

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    batch = Collator(tok.pad_token_id)(
        [vars(encode_example(tok, r["prompt"], r["response"], 4096, r["id"])) for r in examples(3)]
    )

    reference = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    reference.config.final_logit_softcapping = softcap
    full = reference(**batch).loss  # HF's plain loss over full-vocabulary logits
    full.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    ours = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    ours.config.final_logit_softcapping = softcap
    attach_response_loss(ours, chunk_size=37)  # a chunk size that does not divide the token count
    loss = ours(**batch).loss
    loss.backward()
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-5), (loss, full)
    # every weight, the tied embedding / output matrix included
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("attention", ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_batch_trains_what_the_padded_batch_does(tiny_models, attention) -> None:
    """Examples of different lengths, longer than the sliding window, through LoRA on the student: one packed
    row gives the padded batch's loss and gradients (cross-entropy and distillation), so no example saw
    another, and the sliding window still holds inside each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.kd import EXACT, ULD
    from distill.loss import KdSettings, attach_response_loss
    from distill.sft_data import IGNORE, Collator, encode_example

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    rows = [vars(encode_example(tok, r["prompt"], r["response"], 4096, r["id"])) for r in examples(3)]
    rows[1] = {k: v[:-40] if isinstance(v, list) else v for k, v in rows[1].items()}  # lengths differ
    padded, packed = Collator(tok.pad_token_id)(rows), Collator(tok.pad_token_id, pack=True)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert packed["labels"][0, 0] == IGNORE and packed["labels"][0, lengths[0]] == IGNORE  # each begins unlabelled
    torch.manual_seed(0)
    n = int((padded["labels"][:, 1:] != IGNORE).sum())
    k = 3
    teacher = {
        "kd_ids": torch.randint(0, len(tok), (n, k)),
        "kd_logprobs": torch.log_softmax(torch.randn(n, k + 1), dim=-1)[:, :k],
        "kd_route": torch.tensor([(EXACT, ULD)[i % 2] for i in range(n)]),
    }
    teacher["kd_ids"][teacher["kd_route"] == ULD] = -1

    results = []
    for batch in (padded, packed):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_models / "student", dtype=torch.float32, attn_implementation=attention
        )
        model.config.sliding_window = 16  # far shorter than the examples
        assert min(lengths) > 4 * model.config.sliding_window
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        torch.manual_seed(1)
        model = get_peft_model(model, lora)
        lm = model.base_model.model
        out = []
        for kd in (None, KdSettings("jsd", 0.5, 1.0, 0.5)):
            attach_response_loss(lm, chunk_size=37, kd=kd)
            # FlexAttention has no backward on CPU: its mask is checked through the loss alone here
            with torch.set_grad_enabled(attention != "flex_attention"):
                loss = model(**batch, **(teacher if kd else {})).loss
            trained = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, trained) if loss.requires_grad else ()
            out.append((loss.detach(), grads))
        results.append(out)
    for (loss_padded, grads_padded), (loss_packed, grads_packed) in zip(*results):
        assert torch.allclose(loss_packed, loss_padded, rtol=1e-5), (loss_packed, loss_padded)
        for got, want in zip(grads_packed, grads_padded):
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()


def test_packing_refuses_a_student_whose_attention_mixes_packed_examples(tiny_models, monkeypatch) -> None:
    """The check before packed training: where the attention mask ignores the restarting position ids (as an
    architecture that builds its own causal mask would), training is refused in one line."""
    import torch
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM

    from distill.stages.train import check_packing

    model = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32).train()
    check_packing(model, "cpu")
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(DistillError, match="train.packing: gemma3_text with sdpa attention lets packed examples see"):
        check_packing(model, "cpu")
    assert model.training  # given back as it was


@pytest.mark.slow
def test_packed_training_learns_what_padded_training_does(tmp_path, tiny_models) -> None:
    """`distill train` with train.packing against the same run padded: the same steps, tokens, per-step losses
    and adapter (plain AdamW, as in the DDP test: 8-bit AdamW turns float-order noise into whole steps)."""
    import torch
    from safetensors.torch import load_file

    settings = {"epochs": 1, "save_steps": 100, "optim": "adamw_torch"}
    runs = {}
    for packing in (False, True):
        (tmp_path / str(packing)).mkdir()
        path = make_run(tmp_path / str(packing), tiny_models, n=16, packing=packing, **settings)
        assert invoke_cli("train", str(path)).returncode == 0
        runs[packing] = tmp_path / str(packing) / "runs/t/train"
    (mp, mu) = (json.loads((runs[k] / "manifest.json").read_text())["metrics"] for k in (True, False))
    assert (mp["steps"], mp["train_tokens"]) == (mu["steps"], mu["train_tokens"]) == (2, mu["train_tokens"])
    lp, lu = ([json.loads(line)["loss"] for line in (runs[k] / "log.jsonl").read_text().splitlines()] for k in (1, 0))
    assert len(lp) == 2 and lp == pytest.approx(lu, rel=1e-4)
    ap, au = (load_file(runs[k] / "adapter/adapter_model.safetensors") for k in (True, False))
    assert ap.keys() == au.keys() and ap
    for name in ap:
        assert torch.allclose(ap[name], au[name], atol=1e-6), name


@pytest.mark.slow
def test_train_lowers_loss_changes_only_lora_and_uses_8bit_adamw(tmp_path, tiny_models) -> None:
    import torch
    from safetensors.torch import load_file

    from distill.artifacts import read_manifest
    from distill.stages.train import run

    # r=32 puts every adapter matrix at >= 4096 values, bitsandbytes' threshold for 8-bit state
    cfg = load_config(make_run(tmp_path, tiny_models, n=24, epochs=2, lora={"r": 32, "alpha": 64}))
    folder = run(cfg)
    metrics = read_manifest(folder)["metrics"]
    assert metrics["steps"] == metrics["planned_steps"] == 6  # 24 examples / (4 x 2) x 2 epochs
    assert metrics["trainable_params"] == metrics["plan_trainable_params"]
    assert metrics["optimizer"] == "bitsandbytes.optim.adamw.AdamW" and metrics["precision"] == "fp32"
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["samples_per_s"] > 0
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"] - 0.5
    assert all(e["tokens_per_s"] > 0 for e in log)
    assert (folder / "loss.png").stat().st_size > 1000

    adapter = load_file(folder / "adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    assert (folder / "adapter/tokenizer_config.json").is_file()
    checkpoint = torch.load(folder / "checkpoints/checkpoint-6/optimizer.pt", weights_only=False)
    # the optimizer held exactly the adapter's tensors: nothing else could have changed
    assert sum(len(g["params"]) for g in checkpoint["param_groups"]) == len(adapter)
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in checkpoint["state"].values()]
    assert sorted(tuple(m["state1"].shape) for m in moments) == sorted(tuple(v.shape) for v in adapter.values())
    # bitsandbytes keeps tensors under 4096 values in 32 bits; every larger one must be 8-bit
    large = [m for m in moments if m["state1"].numel() >= 4096]
    assert large and all(m["state1"].dtype == m["state2"].dtype == torch.uint8 for m in large)


@pytest.mark.slow
def test_kill_9_then_resume_finishes_planned_steps(tmp_path, tiny_models) -> None:
    path = make_run(tmp_path, tiny_models, n=64, epochs=2)
    checkpoints = tmp_path / "runs/t/train/checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "train", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "checkpoint-4/trainer_state.json").exists():
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs/t/train/manifest.json").exists()
    result = invoke_cli("train", str(path))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs/t/train/manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 16
    assert manifest["metrics"]["resumed_from"] is not None
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/t/train/log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))
    # the token count survives the resume: every real token of both epochs, once
    from transformers import AutoTokenizer

    from distill.sft_data import encode_example

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    lengths = [len(encode_example(tok, r["prompt"], r["response"], 512, r["id"]).input_ids) for r in examples(64)]
    assert manifest["metrics"]["train_tokens"] == 2 * sum(lengths)
    # finished: a re-run is skipped
    again = invoke_cli("train", str(path))
    assert again.returncode == 0 and "skipping" in again.stderr


@pytest.mark.slow
def test_input_errors(tmp_path, tiny_models) -> None:
    path = write_config(tmp_path, tiny_models, name="none.yaml", run_dir="r")
    result = invoke_cli("train", str(path))
    assert result.returncode == 1 and "generate/manifest.json not found: run `distill generate" in result.stderr

    sub = tmp_path / "nocol"
    sub.mkdir()
    no_response = make_run(sub, tiny_models, n=8, columns=("id", "prompt"))
    result = invoke_cli("train", str(no_response))
    assert result.returncode == 1 and "no response column" in result.stderr and "Traceback" not in result.stderr

    from distill.sft_data import check_chat_template

    class Bare:
        chat_template = None

    with pytest.raises(DistillError, match="no chat template"):
        check_chat_template(Bare(), "models/x")


def test_full_fine_tuning_saves_the_whole_model(tmp_path, tiny_models) -> None:
    from safetensors.torch import load_file

    from distill.artifacts import read_manifest
    from distill.stages.train import run

    cfg = load_config(make_run(tmp_path, tiny_models, n=8, method="full", max_steps=2, optim="adamw_torch"))
    folder = run(cfg)
    metrics = read_manifest(folder)["metrics"]
    assert metrics["steps"] == 2 and metrics["trainable_params"] == metrics["all_params"] == metrics["plan_all_params"]
    weights = load_file(folder / "model/model.safetensors")
    assert "model.embed_tokens.weight" in weights and not any("lora_" in k for k in weights)
    assert not (folder / "adapter").exists()
    first = read_manifest(folder)["started"]
    assert run(cfg) == folder and read_manifest(folder)["started"] == first  # complete: skipped
    # --overwrite trains again into a cleared folder (manifest times have one-second resolution: a marker tells)
    (folder / "marker").write_text("from the first run")
    run(cfg, overwrite=True)
    assert not (folder / "marker").exists() and read_manifest(folder)["complete"]


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, tiny_models) -> None:
    from distill.stages.train import run

    # step 1 is warm-up (lr 0); step 2 at this learning rate sends the adapter weights to ~1e30, so the
    # loss of step 3 overflows
    cfg = load_config(make_run(tmp_path, tiny_models, n=8, max_steps=4, lr=1e30, save_steps=1, grad_accum=1))
    with pytest.raises(
        DistillError, match=r"non-finite loss at step 3; the last good checkpoint is .*checkpoint-2\. fp16"
    ):
        run(cfg)
    assert (tmp_path / "runs/t/train/checkpoints/checkpoint-2/adapter_model.safetensors").is_file()
    assert not (tmp_path / "runs/t/train/manifest.json").exists()


def test_unsloth_backend_without_the_package_is_one_line(tmp_path, tiny_models) -> None:
    from distill.stages.train import choose_backend

    path = make_run(tmp_path, tiny_models, n=4)
    with pytest.raises(DistillError, match="train.backend=unsloth needs a CUDA GPU") as err:
        choose_backend(load_config(path, ["train.backend=unsloth"]))
    assert "\n" not in str(err.value)
    assert choose_backend(load_config(path, ["train.backend=auto"])) == "transformers"
    # packing keeps to what is wired for it
    with pytest.raises(DistillError, match="train.packing: the student's own answers .* set train.packing=false"):
        choose_backend(load_config(path, ["train.packing=true", "train.objective=on_policy"]))
    assert choose_backend(load_config(path, ["train.packing=true"])) == "transformers"


@pytest.mark.slow
def test_two_processes_train_what_one_process_accumulating_two_micro_batches_does(tmp_path, tiny_models) -> None:
    """torchrun, 2 CPU processes (gloo), one example each per step: half the single-process plan's steps, and
    each step trains on the two examples one process takes with grad_accum 2 (the Trainer hands the processes
    alternate micro-batches of the same order), normalised by the tokens of both: the same losses and adapter."""
    import torch
    from safetensors.torch import load_file

    # plain AdamW: 8-bit AdamW's block quantization turns float-order noise in the gradients into whole steps
    settings = {"batch_size": 1, "epochs": 1, "save_steps": 100, "logging_steps": 1, "optim": "adamw_torch"}
    for name in ("ddp", "one"):
        (tmp_path / name).mkdir()
    ddp = make_run(tmp_path / "ddp", tiny_models, n=32, grad_accum=1, **settings)
    one = make_run(tmp_path / "one", tiny_models, n=32, grad_accum=2, **settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "distill.cli", "train", str(ddp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert invoke_cli("train", str(one)).returncode == 0
    folders = [tmp_path / name / "runs/t/train" for name in ("ddp", "one")]
    (md, mo) = (json.loads((f / "manifest.json").read_text())["metrics"] for f in folders)
    assert (md["processes"], md["steps"], md["planned_steps"], md["plan_steps"]) == (2, 16, 16, 32)
    assert (mo["processes"], mo["steps"]) == (1, 16)
    assert md["train_tokens"] == mo["train_tokens"]  # the token count is summed over both processes
    ld, lo = ([json.loads(line)["loss"] for line in (f / "log.jsonl").read_text().splitlines()] for f in folders)
    assert len(ld) == 16 and ld == pytest.approx(lo, rel=1e-4)
    ad, ao = (load_file(f / "adapter/adapter_model.safetensors") for f in folders)
    assert ad.keys() == ao.keys() and ad
    for name in ad:
        assert torch.allclose(ad[name], ao[name], atol=1e-6), name  # measured: ~1e-8
    assert not any(v.abs().sum() == 0 for n, v in ad.items() if "lora_B" in n)  # it trained
