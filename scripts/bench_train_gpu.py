"""GPU training step at the paper's shape: `distill train`'s path against TRL's SFTTrainer (its defaults).

  PYTHONPATH=src python scripts/bench_train_gpu.py [--steps 20] [--warmup-steps 3] [--prompt-len 900 1400]
      [--response-len 250 450] [--layers 18] [--variants ours trl trl-bf16w] [--json results.json]

Model: Gemma 3 270M from configs/arch/gemma-3-270m-it.json (real 262,144-token vocabulary, all 18 layers by
default), random weights (seed 0), saved once in bf16 and loaded by every variant from that folder. Data:
random token ids in the student vocabulary (fine for throughput and memory, meaningless for quality), one
example = prompt of U[prompt-len] ids + response of U[response-len] ids, seeded, rendered through a
Gemma-shaped chat template (<bos><start_of_turn>user ... <end_of_turn><start_of_turn>model ... <end_of_turn>)
by a word-level tokenizer whose word "t<i>" is id i, so the texts map one to one onto the ids. Recipe
(the paper's "ours" configuration): LoRA r=128 alpha=128 on q,k,v,o,gate,up,down, bitsandbytes 8-bit
AdamW, lr 2e-5, batch 4 x grad-accum 2, bf16, gradient checkpointing, max length 4096, loss on response
tokens only. Every variant trains the same examples for warm-up + timed optimizer steps (one epoch).

Variants, each in its own child process (CUDA peaks never mix; the parent never touches the GPU):

  ours       `distill train`'s training step, from its own code: distill.stages.train's load_student,
             tokenize (distill.sft_data.encode_example), training_args (8-bit AdamW betas 0.9/0.999, eps
             1e-8, wd 0.01, 20 warm-up steps, linear decay, gradient checkpointing non-reentrant,
             length-grouped batches, non-pad token count), make_callbacks (the plan-step check and the
             non-finite-gradient check before every optimizer step), causal_lm_of; distill.loss's
             attach_response_loss (response-only chunked cross-entropy, chunk train.loss_chunk_size);
             distill.sft_data's Collator; all settings from distill.config's TrainConfig defaults. What
             `distill train`'s run() does around it (run folder, generate-stage input, `distill plan`
             parameter check, checkpoint resume, adapter saving, manifest) is left out.
  trl        trl.SFTTrainer(model=<folder>, peft_config=LoraConfig(same adapters), SFTConfig defaults except
             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-5,
             optim="adamw_8bit", max_length=4096, bf16=True, max_steps, completion_only_loss=True), data
             pre-tokenized as `input_ids` + `completion_mask` (the same ids and trained positions as ours).
             TRL loads a model given by path in float32 unless told otherwise (bf16 autocast on top).
  trl-bf16w  the same with model_init_kwargs={"dtype": "bfloat16"}: bf16 weights like ours.

Both sides also set report_to=[] and include_num_input_tokens_seen="non_padding" (for the token count;
`distill train` sets it anyway). The first --warmup-steps optimizer steps are excluded from timing; each
step's end is taken after torch.cuda.synchronize(). Peak GPU memory is the child's
torch.cuda.max_memory_allocated / max_memory_reserved over the whole run (warm-up included). Mean loss is
the Trainer's training_loss (mean over all steps). `--device cpu` runs a tiny fp32 smoke check.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "configs/arch/gemma-3-270m-it.json"
PAD, EOS, BOS, UNK, START, END = 0, 1, 2, 3, 105, 106  # Gemma 3's ids for these tokens
SPECIAL = {
    PAD: "<pad>",
    EOS: "<eos>",
    BOS: "<bos>",
    UNK: "<unk>",
    START: "<start_of_turn>",
    END: "<end_of_turn>",
    4: "user",
    5: "model",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else 'user' }} "
    "{{ m['content'] }} <end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}"
)
VARIANTS = ("ours", "trl", "trl-bf16w")


# ---------------------------------------------------------------------------------------------- parent side


def build_student(target: Path, layers: int) -> None:
    """Random-weight Gemma 3 270M (bf16 safetensors) plus a word-level tokenizer over the full vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, Gemma3ForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(ARCH)
    if layers != config.num_hidden_layers:
        config.layer_types = config.layer_types[:layers]
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    vocab = {SPECIAL.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)


def make_rows(n: int, prompt_len: tuple[int, int], response_len: tuple[int, int], vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    avoid = set(SPECIAL)

    def words(k: int) -> str:
        ids = []
        while len(ids) < k:
            i = rng.randrange(7, vocab)
            if i not in avoid:
                ids.append(i)
        return " ".join(f"t{i}" for i in ids)

    return [
        {"id": f"b{i}", "prompt": words(rng.randint(*prompt_len)), "response": words(rng.randint(*response_len))}
        for i in range(n)
    ]


def encode_rows(work: Path, max_length: int) -> list[dict]:
    """Token ids + labels through distill.sft_data.encode_example (the same function `distill train` uses)."""
    from transformers import AutoTokenizer

    from distill.sft_data import encode_example

    tokenizer = AutoTokenizer.from_pretrained(work / "student")
    rows = json.loads((work / "rows.json").read_text())
    encoded = [vars(encode_example(tokenizer, r["prompt"], r["response"], max_length, r["id"])) for r in rows]
    first = encoded[0]
    n_prompt = first["labels"].index(next(x for x in first["labels"] if x != -100))
    assert first["input_ids"][:5] == [BOS, START, 4] + [int(w[1:]) for w in rows[0]["prompt"].split()[:2]]
    assert first["input_ids"][n_prompt - 2 : n_prompt] == [START, 5] and first["input_ids"][-1] == END
    return encoded


def run_child(variant: str, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"result-{variant}.json"
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--workdir",
        str(work),
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--loss-chunk-size",
        str(args.loss_chunk_size),
    ]
    print(f"--- {variant}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, check=False)
    if proc.returncode != 0 or not out.is_file():
        return {"variant": variant, "error": f"child exited {proc.returncode}"}
    result = json.loads(out.read_text())
    result["child_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def print_table(results: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        (
            f"{'variant':10} {'steps':>5} {'samples/s':>9} {'tokens/s':>9} {'s/step':>7} {'med s/step':>10} "
            f"{'peak alloc GiB':>14} {'peak resv GiB':>13} {'mean loss':>9} {'pad %':>6}"
        )
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:10} FAILED: {r['error']}")
            continue
        lines.append(
            f"{r['variant']:10} {r['timed_steps']:>5} {r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9.0f} "
            f"{r['s_per_step']:>7.3f} {r['median_s_per_step']:>10.3f} {r['peak_alloc_gib']:>14.2f} "
            f"{r['peak_reserved_gib']:>13.2f} {r['mean_loss']:>9.4f} {r['pad_pct']:>6.1f}"
        )
    ok = {r["variant"]: r for r in results if "error" not in r}
    if "ours" in ok:
        for name, r in ok.items():
            if name == "ours":
                continue
            o = ok["ours"]
            lines.append(
                f"ours / {name}: samples/s {o['samples_per_s'] / r['samples_per_s']:.2f}x, tokens/s "
                f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x, s/step {o['s_per_step'] / r['s_per_step']:.2f}x, "
                f"peak alloc {o['peak_alloc_gib'] / r['peak_alloc_gib']:.2f}x, "
                f"peak reserved {o['peak_reserved_gib'] / r['peak_reserved_gib']:.2f}x"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="optimizer steps run first and not timed")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[900, 1400], metavar=("MIN", "MAX"))
    parser.add_argument("--response-len", type=int, nargs=2, default=[250, 450], metavar=("MIN", "MAX"))
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (the real model has 18)")
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="ours: train.loss_chunk_size")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke check only (fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from distill.config import TrainConfig

    t = TrainConfig()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    per_step = t.batch_size * t.grad_accum
    n = (args.steps + args.warmup_steps) * per_step
    started = time.perf_counter()
    build_student(work / "student", args.layers)
    (work / "rows.json").write_text(
        json.dumps(make_rows(n, tuple(args.prompt_len), tuple(args.response_len), 262144, args.seed))
    )
    encoded = encode_rows(work, t.max_length)
    (work / "encoded.json").write_text(json.dumps(encoded))
    lengths = [len(e["input_ids"]) for e in encoded]
    trained = [sum(x != -100 for x in e["labels"]) for e in encoded]
    header = (
        f"Gemma 3 270M (vocab 262,144, hidden 640, {args.layers} layers), random weights; LoRA r={t.lora.r} "
        f"alpha={t.lora.alpha} on {','.join(m.removesuffix('_proj') for m in t.lora.target_modules)}; {t.optim}; "
        f"lr {t.lr}; batch {t.batch_size} x grad-accum {t.grad_accum}; max length {t.max_length}; "
        f"{'bf16' if args.device == 'cuda' else 'fp32 (CPU smoke check)'}; gradient checkpointing\n"
        f"{n} examples = {args.warmup_steps} warm-up + {args.steps} timed steps x {per_step}; "
        f"tokens/example {min(lengths)}-{max(lengths)} (mean {sum(lengths) / n:.0f}), trained (response+eot) "
        f"{min(trained)}-{max(trained)} (mean {sum(trained) / n:.0f}); data built in "
        f"{time.perf_counter() - started:.1f} s"
    )
    print(header, flush=True)
    results = [run_child(v, work, args) for v in args.variants]
    lines = print_table(results, args)
    print("\n" + header)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "table": lines, "results": results}, indent=2))


# ----------------------------------------------------------------------------------------------- child side


def step_timer(args: argparse.Namespace, cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and non-pad tokens seen at the end of every optimizer step (after a device sync)."""

        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int]] = []

        def on_train_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((0, time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))
            if state.global_step in (1, args.warmup_steps, args.warmup_steps + args.steps):
                print(f"  step {state.global_step}: {self.marks[-1][1] - self.marks[-2][1]:.3f} s", flush=True)

    return StepTimer()


def summarise(variant: str, trainer, train_output, timer, args, extra: dict, padded_tokens: int) -> dict:
    import statistics

    import torch

    marks = timer.marks
    w = args.warmup_steps
    (s0, t0, k0), (s1, t1, k1) = marks[w], marks[-1]
    wall = t1 - t0
    steps = s1 - s0
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    durations = [b[1] - a[1] for a, b in zip(marks[w:], marks[w + 1 :])]
    result = {
        "variant": variant,
        "timed_steps": steps,
        "total_steps": trainer.state.global_step,
        "timed_wall_s": round(wall, 3),
        "s_per_step": wall / steps,
        "median_s_per_step": statistics.median(durations),
        "step_s": [round(d, 4) for d in durations],
        "samples_per_s": steps * per_step / wall,
        "tokens_per_s": (k1 - k0) / wall,
        "timed_tokens": k1 - k0,
        "total_tokens": trainer.state.num_input_tokens_seen,
        "pad_pct": 100 * (1 - trainer.state.num_input_tokens_seen / padded_tokens) if padded_tokens else float("nan"),
        "mean_loss": train_output.training_loss,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": "{0.__module__}.{0.__name__}".format(
            type(getattr(trainer.optimizer, "optimizer", trainer.optimizer))
        ),
        **extra,
    }
    if torch.cuda.is_available():
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["device_name"] = torch.cuda.get_device_name()
    else:
        import resource

        result["peak_alloc_gib"] = result["peak_reserved_gib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )  # CPU smoke check: peak RSS
    result["versions"] = versions()
    return result


def versions() -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class PadCounter:
    """Wraps a collator and adds up the padded (input) tokens it emits, for the padding share."""

    def __init__(self, inner) -> None:
        self.inner, self.tokens = inner, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.tokens += batch["input_ids"].numel()
        return batch


def child(args: argparse.Namespace) -> None:
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu for the smoke check")
    work = args.workdir
    if args.child == "ours":
        result = child_ours(args, work, cuda)
    else:
        result = child_trl(args, work, cuda, bf16_weights=args.child == "trl-bf16w")
    (work / f"result-{args.child}.json").write_text(json.dumps(result, indent=2))


def child_ours(args: argparse.Namespace, work: Path, cuda: bool) -> dict:
    from transformers import Trainer, set_seed

    import distill.stages.train as train_stage
    from distill.config import PipelineConfig
    from distill.loss import attach_response_loss
    from distill.sft_data import Collator

    student = str(work / "student")
    steps = args.steps + args.warmup_steps
    cfg = PipelineConfig(
        run_name="bench",
        run_dir=work / "runs",
        seed=0,
        models={"teacher": student, "student": student},
        train={
            "backend": "transformers",
            "precision": "auto" if cuda else "fp32",
            "loss_chunk_size": args.loss_chunk_size,
        },
    )
    t = cfg.train
    backend = "transformers"
    bf16 = train_stage.use_bf16(cfg)
    set_seed(cfg.seed)
    model, tokenizer = train_stage.load_student(cfg, backend, bf16)
    rows = json.loads((work / "rows.json").read_text())
    dataset, truncated, _ = train_stage.tokenize(cfg, tokenizer, rows)
    reference = json.loads((work / "encoded.json").read_text())
    assert dataset["input_ids"] == [r["input_ids"] for r in reference], "tokenize() disagrees with encode_example"
    assert dataset["labels"] == [r["labels"] for r in reference]
    attach_response_loss(train_stage.causal_lm_of(model), t.loss_chunk_size)
    collator = PadCounter(Collator(tokenizer.pad_token_id))
    planned = len(dataset) // (t.batch_size * t.grad_accum)
    assert planned == steps, (planned, steps)
    callbacks = train_stage.make_callbacks(model, work / "runs" / "log-ours.jsonl", planned)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    timer = step_timer(args, cuda)
    training_args = train_stage.training_args(cfg, backend, bf16, work / "ckpt-ours")
    if t.optim == "adamw_8bit":
        train_stage._forget_earlier_optimizer_overrides()
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[*callbacks, timer]
    )
    if cuda:
        torch_mem = __import__("torch").cuda.memory_allocated() / 2**30
    else:
        torch_mem = 0.0
    out = trainer.train()
    extra = {
        "bf16": bf16,
        "weights_dtype": str(next(train_stage.causal_lm_of(model).parameters()).dtype),
        "gib_before_train": torch_mem,
        "truncated": truncated,
        "group_by_length": training_args.train_sampling_strategy,
        "grad_ckpt": training_args.gradient_checkpointing,
        "loss_chunk_size": t.loss_chunk_size,
    }
    return summarise("ours", trainer, out, timer, args, extra, collator.tokens)


def child_trl(args: argparse.Namespace, work: Path, cuda: bool, bf16_weights: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.config import TrainConfig

    t = TrainConfig()
    variant = "trl-bf16w" if bf16_weights else "trl"
    student = str(work / "student")
    encoded = json.loads((work / "encoded.json").read_text())
    data = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in encoded],
            "completion_mask": [[int(x != -100) for x in e["labels"]] for e in encoded],
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(student)
    config = SFTConfig(
        output_dir=str(work / f"ckpt-{variant}"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        optim=t.optim,
        max_length=t.max_length,
        bf16=cuda,
        max_steps=args.steps + args.warmup_steps,
        completion_only_loss=True,  # pre-tokenized data: TRL only applies `completion_mask` when told to
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        **({"model_init_kwargs": {"dtype": "bfloat16"}} if bf16_weights else {}),
        **({} if cuda else {"use_cpu": True}),
    )
    lora = LoraConfig(
        r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout,
        target_modules=t.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    timer = step_timer(args, cuda)
    trainer = SFTTrainer(
        model=student, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=[timer]
    )
    # the trained positions must be the ones ours trains
    assert trainer.train_dataset["labels"] == [e["labels"] for e in encoded], "TRL's labels differ from distill's"
    collator = PadCounter(trainer.data_collator)
    trainer.data_collator = collator
    gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    out = trainer.train()
    weights = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    extra = {
        "bf16": config.bf16,
        "weights_dtype": str(next(weights.parameters()).dtype),
        "gib_before_train": gib,
        "group_by_length": config.train_sampling_strategy,
        "grad_ckpt": config.gradient_checkpointing,
        "grad_ckpt_kwargs": config.gradient_checkpointing_kwargs,
        "loss_type": config.loss_type,
        "padding_free": config.padding_free,
        "packing": config.packing,
    }
    return summarise(variant, trainer, out, timer, args, extra, collator.tokens)


if __name__ == "__main__":
    main()
