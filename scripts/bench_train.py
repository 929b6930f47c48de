"""Training cost: the plain HF recipe against `distill train`, same data, same model, same optimizer.

  .venv/bin/python scripts/bench_train.py [--layers 2] [--examples 8] [--batch-size 2] [--grad-accum 2]

The model is Gemma 3 (configs/arch/gemma-3-270m-it.json: real 262,144-token vocabulary, real width)
with fewer layers and random weights, on CPU in fp32. The data are crew task examples (reference
answers), tokenized with the tiny student tokenizer. Both variants train LoRA (paper shape) with
bitsandbytes 8-bit AdamW and gradient checkpointing for one epoch:

  (a) baseline: HF Trainer, the model's own loss over full-vocabulary logits, random batches padded
      to their longest example (DataCollatorForSeq2Seq);
  (b) ours:     `distill train` as shipped: response-only chunked loss, length-grouped batches.

Each variant runs in its own process; the parent reads that process's peak RSS from wait4(), so
weights, Python and the allocator's high-water mark are all counted. tokens/s counts real (non-pad)
input tokens over the Trainer's training loop only; the variants alternate `--repeats` times and each
one's fastest run is reported (the cores are shared with other work). Equal loss: on one fixed batch of the untrained
model both losses are computed and printed, and each run's mean logged loss is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "configs/arch/gemma-3-270m-it.json"


def build_model(work: Path, layers: int) -> Path:
    """Gemma 3 with the real vocabulary and width, `layers` deep, random weights, tiny-student tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM

    from distill.config import TinyModelsConfig
    from distill.models import build_tiny
    from distill.tasks import default_task

    tiny = build_tiny(work / "tiny", TinyModelsConfig(corpus_size=60), default_task())
    config = AutoConfig.from_pretrained(ARCH)
    config.num_hidden_layers = layers
    config.layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    target = work / "student"
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    # the tiny tokenizer uses Gemma's special ids (pad 0, eos 1, bos 2), so it fits the real vocabulary
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (config.pad_token_id, config.bos_token_id)
    tokenizer.save_pretrained(target)
    shutil.copy(tiny["student"] / "generation_config.json", target / "generation_config.json")
    return target


def write_run(work: Path, student: Path, args: argparse.Namespace) -> Path:
    """A config for `distill train` plus a finished generate stage holding the examples."""
    from datasets import Dataset, DatasetDict

    from distill.artifacts import StageRecord, prepare_output, stage_dir
    from distill.config import load_config
    from distill.tasks import load_task

    path = work / "bench.yaml"
    path.write_text(
        f"run_name: bench\nrun_dir: {work / 'runs'}\nseed: 0\n"
        f"models: {{teacher: {student}, student: {student}}}\n"
        f"task: {{catalog_mode: {args.catalog_mode}}}\n"
        f"generate: {{backend: reference, num_examples: {args.examples}, validation_examples: 0, test_examples: 0}}\n"
        "train:\n"
        "  backend: transformers\n  method: lora\n  lora: {r: 128, alpha: 128}\n  optim: adamw_8bit\n"
        "  lr: 2.0e-5\n  warmup_steps: 1\n  epochs: 1\n  precision: fp32\n  gradient_checkpointing: true\n"
        f"  batch_size: {args.batch_size}\n  grad_accum: {args.grad_accum}\n  max_length: 4096\n"
        "  save_steps: 100000\n  logging_steps: 1\n"
    )
    cfg = load_config(path)
    task = load_task(cfg)
    rows: dict[str, list] = {"id": [], "prompt": [], "response": []}
    for i in range(args.examples):
        example = task.example("train", i)
        rows["id"].append(f"b{i}")
        rows["prompt"].append(example.prompt)
        rows["response"].append(example.reference)
    prepare_output(cfg, "generate", overwrite=True)
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(stage_dir(cfg, "generate") / "dataset"))
    StageRecord(cfg, "generate").finish()
    return path


def baseline(config: Path, out: Path) -> None:
    """Variant (a), run in a child process: the plain recipe most SFT scripts use."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from distill.artifacts import stage_dir
    from distill.config import load_config
    from distill.sft_data import encode_example

    cfg = load_config(config)
    t = cfg.train
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    rows = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))["train"]
    data = rows.map(
        lambda r: vars(encode_example(tokenizer, r["prompt"], r["response"], t.max_length, r["id"])),
        remove_columns=rows.column_names,
    ).remove_columns(["truncated"])
    model = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    lora = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                      target_modules=t.lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(out.parent / "baseline-ckpt"), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, warmup_steps=t.warmup_steps,
        lr_scheduler_type="linear", num_train_epochs=t.epochs, weight_decay=t.weight_decay, optim=t.optim,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding", logging_steps=1, save_strategy="no", seed=cfg.seed,
        data_seed=cfg.seed, report_to=[], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {"tokens": trainer.state.num_input_tokens_seen, "wall_s": wall, "steps": trainer.state.global_step,
              "samples": len(data) * t.epochs, "losses": losses}  # fmt: skip
    out.write_text(json.dumps(result))


def ours(config: Path) -> dict:
    from distill.artifacts import read_manifest, stage_dir
    from distill.config import load_config

    folder = stage_dir(load_config(config), "train")
    metrics = read_manifest(folder)["metrics"]
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    return {"tokens": metrics["train_tokens"], "wall_s": metrics["wall_s"], "steps": metrics["steps"],
            "samples": metrics["examples"], "losses": losses}  # fmt: skip


def run_measured(command: list[str]) -> float:
    """Run a child process and return its peak resident memory in MiB (from wait4, not self-reported)."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return usage.ru_maxrss / 1024


def equal_loss_check(config: Path) -> tuple[float, float]:
    """HF full-logits loss and our chunked loss of the untrained model on the same two examples."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.artifacts import stage_dir
    from distill.config import load_config
    from distill.loss import attach_response_loss
    from distill.sft_data import Collator, encode_example

    cfg = load_config(config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    rows = load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))["train"].select(range(2))
    batch = Collator(tokenizer.pad_token_id)(
        [vars(encode_example(tokenizer, r["prompt"], r["response"], 4096, r["id"])) for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    with torch.no_grad():
        full = float(model(**batch).loss)
        attach_response_loss(model, cfg.train.loss_chunk_size)
        chunked = float(model(**batch).loss)
    return full, chunked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the real model has 18)")
    parser.add_argument("--examples", type=int, default=8, help="training examples (one epoch)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating; the best counts")
    parser.add_argument("--catalog-mode", choices=["available", "full"], default="available")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--child-baseline", nargs=2, type=Path, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_baseline:
        baseline(*args.child_baseline)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    student = build_model(work, args.layers)
    config = write_run(work, student, args)
    print(f"model: Gemma 3, vocab 262,144, hidden 640, {args.layers} layers, random weights, fp32 CPU; "
          f"LoRA r=128 on q,k,v,o,gate,up,down; 8-bit AdamW; gradient checkpointing; "
          f"{args.examples} examples, batch {args.batch_size} x grad-accum {args.grad_accum}, 1 epoch")  # fmt: skip

    # Alternate the variants and keep each one's best run: the cores are shared, and a neighbour's load
    # would otherwise land on whichever variant happened to run at the time.
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        out = work / "baseline.json"
        rss = run_measured([sys.executable, __file__, "--child-baseline", str(config), str(out)])
        runs = {"baseline": {**json.loads(out.read_text()), "peak_rss_mb": rss}}
        rss = run_measured([sys.executable, "-m", "distill.cli", "train", str(config), "--overwrite"])
        runs["ours"] = {**ours(config), "peak_rss_mb": rss}
        for name, r in runs.items():
            print(f"  {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
            if name not in results or r["wall_s"] < results[name]["wall_s"]:
                results[name] = r

    print(f"{'variant':10} {'tokens':>8} {'steps':>5} {'train s':>8} {'tokens/s':>9} {'samples/s':>9} "
          f"{'peak RSS MiB':>12} {'mean loss':>9}")  # fmt: skip
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["samples_per_s"] = r["samples"] / r["wall_s"]
        r["mean_loss"] = sum(r["losses"]) / len(r["losses"])
        print(f"{name:10} {r['tokens']:>8} {r['steps']:>5} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['samples_per_s']:>9.3f} {r['peak_rss_mb']:>12.0f} {r['mean_loss']:>9.4f}")  # fmt: skip
    a, b = results["baseline"], results["ours"]
    full, chunked = equal_loss_check(config)
    print(f"tokens/s ratio (ours / baseline): {b['tokens_per_s'] / a['tokens_per_s']:.2f}x (target >= 2)")
    print(f"peak memory ratio (ours / baseline): {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x (target <= 0.5)")
    print(f"same batch, untrained model: full-logits loss {full:.6f}, chunked response loss {chunked:.6f}, "
          f"|diff| {abs(full - chunked):.2e}")  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"details: {work / 'results.json'}")


if __name__ == "__main__":
    main()
