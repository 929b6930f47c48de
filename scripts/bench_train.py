"""Training cost: the plain HF recipe and TRL against `distill train`, same data, same model, same optimizer.

  .venv/bin/python scripts/bench_train.py [--layers 2] [--examples 8] [--batch-size 2] [--grad-accum 2] [--no-kd]
      [--on-policy] [--variants NAME ...]

The model is Gemma 3 (configs/arch/gemma-3-270m-it.json: real 262,144-token vocabulary, real width)
with fewer layers and random weights, on CPU in fp32. The data are crew task examples (reference
answers), tokenized with the tiny student tokenizer. Every variant trains LoRA (paper shape) with
bitsandbytes 8-bit AdamW, the same learning rate, warm-up, batch and accumulation, and gradient
checkpointing for one epoch:

  (a) baseline: HF Trainer, the model's own loss over full-vocabulary logits, random batches padded
      to their longest example (DataCollatorForSeq2Seq);
  (b) ours:     `distill train` as shipped: response-only chunked loss, length-grouped batches;
  (c) trl-sft:  TRL's SFTTrainer with its defaults on prompt/completion conversations (completion-only
      loss through its fused LM head, random batches), except bf16=False and use_cpu=True for this CPU
      and max_length=4096 (its default 1,024 would cut these examples). Without Triton (on CPU) the fused
      head projects every position, prompt included, tile by tile, and recomputes each tile in the
      backward: little memory, more arithmetic than the baseline's full logits. TRL tokenizes the prompt and
      prompt+completion apart and starts the completion where they diverge: this tokenizer merges the
      generation prompt's final "\\n" into the answer's first word, so TRL warns, trains that merged token
      in place of the word, and also trains the "\\n" the template puts after the end of turn.

With --kd (the default) a second random Gemma 3 of the same shape (seed 1, same tokenizer) is the teacher:

  (d) trl-kd:   TRL's GKDTrainer (trl.experimental.gkd) with lmbda=0, so it never generates on-policy: the
      student learns the in-memory teacher's full-vocabulary distribution on the dataset's answers through
      the generalised JSD (beta 0.5; temperature 1.0, which GKD's loss uses anyway: its default 0.9 only
      tempers sampling), max_length=4096 (its collator keeps the last 1,024 tokens by default, cutting the
      prompt). Its collator counts the prompt's tokens apart, so the merged first answer token above goes
      untrained, and the "\\n" after the end of turn is trained. TRL's stable DistillationTrainer always
      generates from the student, so it is no offline KD.
  (e) ours-kd:  `distill train` with train.objective=kd (JSD beta 0.5, temperature 1, alpha 0.5: half the
      ordinary cross-entropy) on the teacher's top-20 log-probabilities, which the parent computes once
      before any timing, as `distill generate` with generate.logprobs=20 keeps them.

The mean losses of (d) and (e) are not comparable: trl-kd logs the JSD alone, ours-kd the mix.

With --on-policy, both distil on the student's own answers, every micro-batch (lmbda 1, so both do the same
work), sampled free at temperature 1 up to --max-new-tokens, generalised JSD with beta 0.5:

  (f) trl-gkd:  TRL's GKDTrainer with lmbda=1: the student generates, then student and teacher (in memory)
      make full-vocabulary logits at every position of the new sequence;
  (g) ours-op:  `distill train` with train.objective=on_policy, lmbda 1, the teacher in the training process:
      it scores the answer's positions only (top-20), aligned to the student's tokens, and the loss runs on
      the chunked top-k + tail buckets as ours-kd's does; answers drawn by transformers' generate;
  (h) ours-op-vllm: the same with train.on_policy.sampler=vllm: a vLLM engine in the training process draws
      the answers, the trained weights pushed into it before each draw.

Random weights never write the end of turn, so every answer runs to --max-new-tokens in both. Their tokens/s
count different inputs (GKD the stored example it was handed, ours the sequence it trained on): compare
samples/s.

Each variant runs in its own process; the parent reads that process's peak RSS from wait4(), so
weights, Python and the allocator's high-water mark are all counted. Each child's address space is capped
(--memory-cap-mib, default the memory available at start): a variant that needs more is reported out of
memory. GKD does on a 23 GiB machine: it makes fp32 logits of student and teacher at every position, prompt
included, and about 15 more full-vocabulary tensors in its JSD, ~17.5 MiB per token (~20 GiB for one
1,050-token example at batch 1).

tokens/s counts real (non-pad) input tokens over the Trainer's training loop only; the variants alternate
`--repeats` times and each one's fastest run is reported (the cores are shared with other work). Equal loss:
on one fixed batch of the untrained model the HF loss and ours are computed and printed, and each run's mean
logged loss is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "configs/arch/gemma-3-270m-it.json"
# what a child that allocates past its address-space cap prints (torch's allocator, Python, C++)
OUT_OF_MEMORY = (b"can't allocate memory", b"MemoryError", b"bad_alloc")
KD = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "alpha": 0.5}
TOP_K = 20


def build_models(work: Path, layers: int, teacher: bool) -> tuple[Path, Path]:
    """Student (seed 0) and, when asked, a teacher (seed 1), else the student again: Gemma 3 with the real
    vocabulary and width, `layers` deep, random weights, the tiny student's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM

    from distill.config import TinyModelsConfig
    from distill.models import build_tiny
    from distill.tasks import default_task

    tiny = build_tiny(work / "tiny", TinyModelsConfig(corpus_size=60), default_task())
    config = AutoConfig.from_pretrained(ARCH)
    config.num_hidden_layers = layers
    config.layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    # the tiny tokenizer uses Gemma's special ids (pad 0, eos 1, bos 2), so it fits the real vocabulary
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (config.pad_token_id, config.bos_token_id)

    def save(name: str, seed: int) -> Path:
        torch.manual_seed(seed)
        target = work / name
        Gemma3ForCausalLM(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
        shutil.copy(tiny["student"] / "generation_config.json", target / "generation_config.json")
        return target

    student = save("student", 0)
    return student, save("teacher", 1) if teacher else student


def write_run(
    work: Path,
    name: str,
    teacher: Path,
    student: Path,
    args: argparse.Namespace,
    top_k: int = 0,
    sampler: str | None = None,
) -> tuple[Path, float]:
    """A config for `distill train` plus a finished generate stage holding the examples. With `top_k`, a KD
    config whose examples also carry the teacher's top-k; the seconds the teacher took come back with it. With
    `sampler`, an on-policy config (lmbda 1) on the examples' prompts, its answers drawn by that sampler."""
    from datasets import Dataset, DatasetDict

    from distill.artifacts import StageRecord, prepare_output, stage_dir
    from distill.config import load_config
    from distill.tasks import load_task

    path = work / f"{name}.yaml"
    kd_train = f"  objective: kd\n  kd: {{{', '.join(f'{k}: {v}' for k, v in KD.items())}}}\n" if top_k else ""
    if sampler:
        kd_train = (
            "  objective: on_policy\n  on_policy: {lmbda: 1.0, divergence: jsd, beta: 0.5, temperature: 1.0, "
            f"max_new_tokens: {args.max_new_tokens}, grammar: false, sampler: {sampler}}}\n"
        )
    path.write_text(
        f"run_name: {name}\nrun_dir: {work / 'runs'}\nseed: 0\n"
        f"models: {{teacher: {teacher}, student: {student}}}\n"
        f"task: {{catalog_mode: {args.catalog_mode}}}\n"
        f"generate: {{backend: reference, num_examples: {args.examples}, validation_examples: 0, test_examples: 0"
        f"{f', logprobs: {top_k}' if top_k else ''}}}\n"
        "train:\n"
        "  backend: transformers\n  method: lora\n  lora: {r: 128, alpha: 128}\n  optim: adamw_8bit\n"
        "  lr: 2.0e-5\n  warmup_steps: 1\n  epochs: 1\n  precision: fp32\n  gradient_checkpointing: true\n"
        f"  batch_size: {args.batch_size}\n  grad_accum: {args.grad_accum}\n  max_length: 4096\n"
        f"  save_steps: 100000\n  logging_steps: 1\n{kd_train}"
    )
    cfg = load_config(path)
    task = load_task(cfg)
    rows: dict[str, list] = {"id": [], "prompt": [], "response": []}
    for i in range(args.examples):
        example = task.example("train", i)
        rows["id"].append(f"b{i}")
        rows["prompt"].append(example.prompt)
        rows["response"].append(example.reference)
    seconds = 0.0
    if top_k:
        columns, seconds = teacher_top_k(teacher, rows, top_k, cfg.train.max_length)
        rows.update(columns)
    prepare_output(cfg, "generate", overwrite=True)
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(stage_dir(cfg, "generate") / "dataset"))
    StageRecord(cfg, "generate").finish()
    return path, seconds


def teacher_top_k(teacher: Path, rows: dict[str, list], k: int, max_length: int) -> tuple[dict[str, list], float]:
    """The teacher's k most likely tokens and their log-probabilities at every answer position (teacher forcing,
    batch 1), and the seconds the forward passes took (loading excluded, as TRL loads its teacher untimed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.sft_data import IGNORE, encode_example

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    columns: dict[str, list] = {"teacher_tokens": [], "teacher_top_ids": [], "teacher_top_logprobs": []}
    started = time.perf_counter()
    for example_id, prompt, response in zip(rows["id"], rows["prompt"], rows["response"], strict=True):
        enc = encode_example(tokenizer, prompt, response, max_length, example_id)
        answer = [t for t in enc.labels if t != IGNORE]
        # the format a same-tokenizer teacher writes: the response's own tokens and the end of turn
        tokens = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if enc.truncated or answer != tokens:
            sys.exit(f"example {example_id}: the student's trained tokens are not the response's tokens + end of turn")
        with torch.no_grad():
            # the answer ends the sequence: its tokens are predicted by the len(answer) positions before the last
            output = model(input_ids=torch.tensor([enc.input_ids]), logits_to_keep=len(answer) + 1, use_cache=False)
        top = torch.log_softmax(output.logits[0, :-1].float(), dim=-1).topk(k, dim=-1)
        columns["teacher_tokens"].append(tokens)
        columns["teacher_top_ids"].append(top.indices.tolist())
        columns["teacher_top_logprobs"].append(top.values.tolist())
    return columns, time.perf_counter() - started


def train_rows(cfg: Any) -> Any:
    from datasets import load_from_disk

    from distill.artifacts import stage_dir

    return load_from_disk(str(stage_dir(cfg, "generate") / "dataset"))["train"]


def trainer_args(cfg: Any, output_dir: Path) -> dict[str, Any]:
    """TrainingArguments every Trainer-based variant shares: our optimizer and schedule, CPU, a log entry per step."""
    t = cfg.train
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr,
        "warmup_steps": t.warmup_steps,
        "lr_scheduler_type": "linear",
        "num_train_epochs": t.epochs,
        "weight_decay": t.weight_decay,
        "optim": t.optim,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "include_num_input_tokens_seen": "non_padding",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": [],
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "disable_tqdm": True,
    }


def train_and_record(trainer: Any, samples: float, out: Path) -> None:
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "tokens": trainer.state.num_input_tokens_seen,
        "wall_s": wall,
        "steps": trainer.state.global_step,
        "samples": samples,
        "losses": losses,
    }
    out.write_text(json.dumps(result))


def baseline(config: Path, out: Path) -> None:
    """Variant (a), run in a child process: the plain recipe most SFT scripts use."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from distill.config import load_config
    from distill.sft_data import encode_example
    from distill.stages.train import lora_config

    cfg = load_config(config)
    t = cfg.train
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    rows = train_rows(cfg)
    data = rows.map(
        lambda r: vars(encode_example(tokenizer, r["prompt"], r["response"], t.max_length, r["id"])),
        remove_columns=rows.column_names,
    ).remove_columns(["truncated"])
    model = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    model = get_peft_model(model, lora_config(t))
    args = TrainingArguments(**trainer_args(cfg, out.parent / "baseline-ckpt"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    train_and_record(trainer, len(data) * t.epochs, out)


def trl_sft(config: Path, out: Path) -> None:
    """Variant (c), run in a child process: TRL's SFTTrainer, given conversations, the model folder and our LoRA."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.config import load_config
    from distill.stages.train import lora_config

    cfg = load_config(config)
    rows = train_rows(cfg)
    data = rows.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["response"]}],
        },
        remove_columns=rows.column_names,
    )
    # SFTConfig defaults to bf16, kept off here like every other variant on this CPU; its default max_length
    # of 1,024 would cut these examples, which run to ~1,700 tokens
    args = SFTConfig(**trainer_args(cfg, out.parent / "trl-sft-ckpt"), bf16=False, max_length=cfg.train.max_length)
    trainer = SFTTrainer(
        model=str(cfg.models.student),
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(cfg.models.student),
        peft_config=lora_config(cfg.train),
    )
    train_and_record(trainer, len(trainer.train_dataset) * cfg.train.epochs, out)


def trl_kd(config: Path, out: Path) -> None:
    """Variant (d), run in a child process: TRL's GKDTrainer on the dataset's answers, teacher in memory."""
    gkd(config, out, on_policy=False)


def trl_gkd(config: Path, out: Path) -> None:
    """Variant (f), run in a child process: TRL's GKDTrainer on the student's own answers, teacher in memory."""
    gkd(config, out, on_policy=True)


def gkd(config: Path, out: Path, on_policy: bool) -> None:
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.config import load_config
    from distill.stages.train import lora_config

    cfg = load_config(config)
    rows = train_rows(cfg)
    # GKD's collator reads whole conversations from "messages"; a "prompt" column would be taken as rendered text
    data = rows.map(
        lambda r: {
            "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        },
        remove_columns=rows.column_names,
    )
    # lmbda=0: no student generation, offline KD on fixed data (lmbda=1: every step generates); GKD's collator
    # keeps the last max_length tokens, so its default 1,024 would cut the prompts
    o = cfg.train.on_policy
    args = GKDConfig(
        **trainer_args(cfg, out.parent / "trl-gkd-ckpt"),
        bf16=False,
        max_length=cfg.train.max_length,
        lmbda=1.0 if on_policy else 0.0,
        beta=KD["beta"],
        temperature=o.temperature if on_policy else KD["temperature"],
        max_new_tokens=o.max_new_tokens,
    )
    trainer = GKDTrainer(
        model=str(cfg.models.student),
        teacher_model=str(cfg.models.teacher),
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(cfg.models.student),
        peft_config=lora_config(cfg.train),
    )
    train_and_record(trainer, len(data) * cfg.train.epochs, out)


CHILDREN = {"baseline": baseline, "trl-sft": trl_sft, "trl-kd": trl_kd, "trl-gkd": trl_gkd}


def ours(config: Path) -> dict:
    from distill.artifacts import read_manifest, stage_dir
    from distill.config import load_config

    folder = stage_dir(load_config(config), "train")
    metrics = read_manifest(folder)["metrics"]
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    return {
        "tokens": metrics["train_tokens"],
        "wall_s": metrics["wall_s"],
        "steps": metrics["steps"],
        "samples": metrics["examples"],
        "losses": losses,
    }


class OutOfMemory(Exception):
    """A child needed more memory than its cap (or the kernel's OOM killer ended it); args[0] is its peak RSS."""


def run_measured(command: list[str], cap_mib: int) -> float:
    """Run a child process and return its peak resident memory in MiB (from wait4, not self-reported).

    The child's address space is capped, so one that needs more memory than the machine has fails on its own
    allocation instead of waking the kernel's OOM killer, which may pick a neighbour's process."""
    cap = cap_mib * 2**20
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # set from here rather than in a preexec_fn, which may deadlock in a parent with threads (torch's)
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (cap, cap))
    assert proc.stderr is not None
    try:
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C or SIGTERM: no child trains on after the bench is gone
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / 1024
    if proc.returncode == -signal.SIGKILL or (proc.returncode != 0 and any(m in stderr for m in OUT_OF_MEMORY)):
        raise OutOfMemory(rss)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return rss


def measure(name: str, config: Path, work: Path, cap_mib: int) -> dict:
    """One run of a variant in its own process: its figures and peak RSS, or that it ran out of memory."""
    try:
        if name.startswith("ours"):
            rss = run_measured([sys.executable, "-m", "distill.cli", "train", str(config), "--overwrite"], cap_mib)
            return {**ours(config), "peak_rss_mb": rss}
        out = work / f"{name}.json"
        rss = run_measured([sys.executable, __file__, "--child", name, str(config), str(out)], cap_mib)
        return {**json.loads(out.read_text()), "peak_rss_mb": rss}
    except OutOfMemory as exc:
        return {"out_of_memory": True, "peak_rss_mb": exc.args[0]}


def available_mib() -> int:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) // 1024


def equal_loss_check(config: Path) -> tuple[float, float]:
    """HF full-logits loss and our chunked loss of the untrained model on the same two examples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import load_config
    from distill.loss import attach_response_loss
    from distill.sft_data import Collator, encode_example

    cfg = load_config(config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    rows = train_rows(cfg).select(range(2))
    batch = Collator(tokenizer.pad_token_id)(
        [vars(encode_example(tokenizer, r["prompt"], r["response"], 4096, r["id"])) for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    with torch.no_grad():
        full = float(model(**batch).loss)
        attach_response_loss(model, cfg.train.loss_chunk_size)
        chunked = float(model(**batch).loss)
    return full, chunked


def compare(
    results: dict[str, dict], mine: str, other: str, targets: tuple[str, str] = ("", ""), per: str = "tokens"
) -> None:
    a, b = results[other], results[mine]
    if a.get("out_of_memory") or b.get("out_of_memory"):
        fits = {
            n: f"{r['peak_rss_mb']:.0f} MiB" + (" (out of memory)" if r.get("out_of_memory") else "")
            for n, r in ((mine, b), (other, a))
        }
        print(f"{mine} / {other}: no ratio; peak RSS {mine} {fits[mine]}, {other} {fits[other]}")
        return
    print(
        f"{mine} / {other}: {per}/s {b[f'{per}_per_s'] / a[f'{per}_per_s']:.2f}x{targets[0]}, "
        f"peak memory {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x{targets[1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the real model has 18)")
    parser.add_argument("--examples", type=int, default=8, help="training examples (one epoch)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating; the best counts")
    parser.add_argument("--catalog-mode", choices=["available", "full", "allowed"], default="available")
    parser.add_argument(
        "--kd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also distil a teacher: TRL's GKD (trl-kd) against train.objective=kd (ours-kd)",
    )
    parser.add_argument(
        "--on-policy",
        action="store_true",
        help="also distil on the student's own answers: TRL's GKD with lmbda 1 (trl-gkd) against "
        "train.objective=on_policy (ours-op)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens each on-policy answer samples")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these (default: every one asked for)")
    parser.add_argument(
        "--memory-cap-mib",
        type=int,
        default=available_mib(),
        help="each child's address-space limit; a variant that needs more is reported out of memory "
        "(default: the memory available at start)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, config, out = args.child
        CHILDREN[name](Path(config), Path(out))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    from distill.errors import DistillError

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    student, teacher = build_models(work, args.layers, args.kd or args.on_policy)
    config, _ = write_run(work, "bench", student, student, args)
    variants = {"baseline": config, "ours": config, "trl-sft": config}
    print(
        f"model: Gemma 3, vocab 262,144, hidden 640, {args.layers} layers, random weights, fp32 CPU; "
        f"LoRA r=128 on q,k,v,o,gate,up,down; 8-bit AdamW; gradient checkpointing; "
        f"{args.examples} examples, batch {args.batch_size} x grad-accum {args.grad_accum}, 1 epoch",
        flush=True,
    )
    teacher_s = 0.0
    if args.kd:
        try:
            kd_config, teacher_s = write_run(work, "bench-kd", teacher, student, args, TOP_K)
        except DistillError as exc:
            sys.exit(f"{exc}\n(--no-kd runs the variants that need no KD objective)")
        variants |= {"trl-kd": kd_config, "ours-kd": kd_config}
        print(
            f"teacher: the same shape, seed 1; its top-{TOP_K} over {args.examples} examples (batch 1, no_grad): "
            f"{teacher_s:.1f} s, paid once at generation time and outside ours-kd's figures, where trl-kd "
            "runs the teacher's forward inside every training step",
            flush=True,
        )

    if args.on_policy:
        op_config, _ = write_run(work, "bench-op", teacher, student, args, sampler="transformers")
        op_vllm, _ = write_run(work, "bench-op-vllm", teacher, student, args, sampler="vllm")
        variants |= {"trl-gkd": op_config, "ours-op": op_config, "ours-op-vllm": op_vllm}
        print(
            f"on-policy: lmbda 1, {args.max_new_tokens} new tokens per answer at temperature 1, free, JSD beta 0.5; "
            "the teacher in memory for both",
            flush=True,
        )
    if args.variants:
        variants = {name: path for name, path in variants.items() if name in args.variants}

    # Alternate the variants and keep each one's best run: the cores are shared, and a neighbour's load
    # would otherwise land on whichever variant happened to run at the time.
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, variant_config in variants.items():
            if results.get(name, {}).get("out_of_memory"):
                continue  # memory does not depend on a neighbour's load: it would run out again
            r = measure(name, variant_config, work, args.memory_cap_mib)
            if r.get("out_of_memory"):
                print(
                    f"  {name}: out of memory under the {args.memory_cap_mib} MiB cap, at peak RSS "
                    f"{r['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
                results[name] = r
                continue
            print(f"  {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
            if name not in results or r["wall_s"] < results[name]["wall_s"]:
                results[name] = r

    print(
        f"{'variant':10} {'tokens':>8} {'steps':>5} {'train s':>8} {'tokens/s':>9} {'samples/s':>9} "
        f"{'peak RSS MiB':>12} {'mean loss':>9}"
    )
    for name, r in results.items():
        if r.get("out_of_memory"):
            print(
                f"{name:10} out of memory ({args.memory_cap_mib} MiB address-space cap; peak RSS "
                f"{r['peak_rss_mb']:.0f} MiB when it failed)"
            )
            continue
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["samples_per_s"] = r["samples"] / r["wall_s"]
        r["mean_loss"] = sum(r["losses"]) / len(r["losses"])
        print(
            f"{name:10} {r['tokens']:>8} {r['steps']:>5} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['samples_per_s']:>9.3f} {r['peak_rss_mb']:>12.0f} {r['mean_loss']:>9.4f}"
        )
    for mine, other, targets in (
        ("ours", "baseline", (" (target >= 2)", " (target <= 0.5)")),
        ("ours", "trl-sft", ("", "")),
        ("ours-kd", "trl-kd", ("", "")),
    ):
        if mine in results and other in results:
            compare(results, mine, other, targets)
    for mine, other in (("ours-op", "trl-gkd"), ("ours-op-vllm", "trl-gkd"), ("ours-op-vllm", "ours-op")):
        if mine in results and other in results:
            compare(results, mine, other, per="samples")
    if {"ours-kd", "trl-kd"} <= set(results) and not any(
        results[n].get("out_of_memory") for n in ("ours-kd", "trl-kd")
    ):
        kd, trl = results["ours-kd"], results["trl-kd"]
        print(
            f"ours-kd / trl-kd tokens/s with the teacher's top-{TOP_K} pass added to ours-kd's time: "
            f"{kd['tokens'] / (kd['wall_s'] + teacher_s) / trl['tokens_per_s']:.2f}x"
        )
    if "baseline" in variants:
        full, chunked = equal_loss_check(config)
        print(
            f"same batch, untrained model: full-logits loss {full:.6f}, chunked response loss {chunked:.6f}, "
            f"|diff| {abs(full - chunked):.2e}"
        )
    (work / "results.json").write_text(json.dumps({"teacher_top_k_s": teacher_s, **results}, indent=2))
    print(f"details: {work / 'results.json'}")


if __name__ == "__main__":
    main()
