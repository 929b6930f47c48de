"""GPU training step at the paper's shape: `distill train`'s path against TRL's SFTTrainer, TRL + Liger, TRL
padding-free and Unsloth, with model FLOPs utilisation and (--profile) where the step's time goes.

  PYTHONPATH=src python scripts/bench_train_gpu.py [--steps 20] [--warmup-steps 3] [--prompt-len 900 1400]
      [--response-len 250 450] [--layers 18] [--variants NAME ...] [--profile] [--peak-tflops X] [--json FILE]

Model: Gemma 3 270M from configs/arch/gemma-3-270m-it.json (real 262,144-token vocabulary, all 18 layers by
default), random weights (seed 0), saved once in bf16 and loaded by every variant from that folder. Data:
random token ids in the student vocabulary (fine for throughput and memory, meaningless for quality), one
example = prompt of U[prompt-len] ids + response of U[response-len] ids, seeded, rendered through a
Gemma-shaped chat template (<bos><start_of_turn>user...<end_of_turn><start_of_turn>model...<end_of_turn>)
by a word-level tokenizer whose word "t<i>" is id i (written without spaces, cut out by a pattern), so the texts
map one to one onto the ids. Recipe
(the paper's "ours" configuration): LoRA r=128 alpha=128 on q,k,v,o,gate,up,down, bitsandbytes 8-bit
AdamW, lr 2e-5, batch 4 x grad-accum 2, bf16, max length 4096, loss on response tokens only. Every variant
trains the same examples for warm-up + timed (+ profiled) optimizer steps (one epoch).

Variants, each in its own child process (CUDA peaks never mix; the parent never touches the GPU):

  ours              `distill train`'s training step, from its own code: distill.stages.train's choose_backend,
                    load_student, tokenize (distill.sft_data.encode_example), training_args (8-bit AdamW betas
                    0.9/0.999, eps 1e-8, wd 0.01, 20 warm-up steps, linear decay, length-grouped batches,
                    non-pad token count), make_callbacks (the plan-step check and the non-finite-gradient check
                    before every optimizer step), causal_lm_of; distill.plan's build_plan (whether to recompute:
                    train.gradient_checkpointing=auto); attach_objective (distill.loss's response-only
                    chunked cross-entropy, chunk train.loss_chunk_size, and distill.sft_data's Collator); all
                    settings from distill.config's TrainConfig defaults. What `distill train`'s run() does around
                    it (run folder, generate-stage input, checkpoint resume, adapter saving, manifest) is left out.
  ours-ckpt         the same with train.gradient_checkpointing=true (the step measured before `auto`).
  ours-packed       train.packing=true: each micro-batch one row, position ids restarting per example;
                    train.attention=auto runs flex_attention there on CUDA.
  ours-packed-sdpa  the same with train.attention=sdpa (a dense block mask over the whole row).
  ours-unsloth      train.backend=unsloth: distill's own Unsloth path (FastLanguageModel, its checkpointing).
  trl               trl.SFTTrainer(model=<folder>, peft_config=LoraConfig(same adapters), SFTConfig defaults
                    except per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-5,
                    optim="adamw_8bit", max_length=4096, bf16=True, max_steps, completion_only_loss=True),
                    data pre-tokenized as `input_ids` + `completion_mask` (the same ids and trained positions
                    as ours). TRL loads a model given by path in float32 unless told otherwise (bf16 autocast
                    on top).
  trl-bf16w         the same with model_init_kwargs={"dtype": "bfloat16"}: bf16 weights like ours.
  trl-liger         trl-bf16w with use_liger_kernel=True (Liger's layer kernels; TRL 1.16 keeps its own fused
                    LM head instead of Liger's fused linear cross-entropy).
  trl-padfree       trl-bf16w with padding_free=True (TRL's flattened batches with position ids).
  trl-unsloth       Unsloth as its users run it: FastLanguageModel (bf16, same LoRA, its checkpointing; loaded by
                    distill.stages.train.load_student's Unsloth path, which makes the same two calls) handed
                    to trl.SFTTrainer with trl-bf16w's settings.
  ours-kd           train.objective=kd (generalised JSD beta 0.5, temperature 1, alpha 0.5) on a stored top-20
                    teacher distribution in generate's columns (random values, `add_top_k`: the step's cost does
                    not depend on them; the teacher's pass is generate's cost, outside training).
  trl-kd            TRL's closest offline distillation: trl.experimental.gkd.GKDTrainer with lmbda=0 (it never
                    generates), beta 0.5, temperature 1, a second random Gemma 3 270M (seed 1, same tokenizer)
                    as the in-memory teacher, bf16 weights for both, the same LoRA, batch, optimizer and rate.
                    Its loss is the JSD alone, ours-kd's the mix: the mean losses do not compare.

liger-kernel and unsloth run on CUDA only: --device cpu leaves those variants out.

All set report_to=[] and include_num_input_tokens_seen="non_padding" (for the token count;
`distill train` sets it anyway). The first --warmup-steps optimizer steps are excluded from timing; each
step's end is taken after torch.cuda.synchronize(). Peak GPU memory is the child's
torch.cuda.max_memory_allocated / max_memory_reserved over the whole run (warm-up included). Mean loss is
the Trainer's training_loss (mean over all steps).

MFU: the model FLOPs of the examples trained in the timed steps (`model_flops`: every matrix product of the
forward pass, the backward through the frozen body (input gradients only), the LoRA factors (input and weight
gradients), causal attention within Gemma's sliding windows, the LM head on trained positions only; recompute
not counted) over the timed wall time, over the card's dense bf16 peak (PEAK_TFLOPS by device name, or
--peak-tflops). HFU adds the recomputed forward where a variant recomputes.

--profile runs --profile-steps more optimizer steps after the timed ones under torch.profiler and writes, per
variant, where the GPU time went by kernel category, the GPU's idle share of the profiled wall time (host
gaps), and the top kernels. `--device cpu` runs a tiny fp32 smoke check of everything (CPU op times).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
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
# No spaces: the words are cut out by a pattern, so the text is exactly what its tokens spell, as distill's
# alignment of a stored teacher distribution (ours-kd) requires
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}"
    "{{ m['content'] }}<end_of_turn>{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{% endif %}"
)
WORDS = r"user|model|t\d+"
BF16W = {"model_init_kwargs": {"dtype": "bfloat16"}}
KD = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "alpha": 0.5}  # GKD's generalised JSD, as TRL's default
TOP_K = 20
# variant: (which child runs it, its settings: train.* for ours, SFTConfig fields for TRL)
VARIANTS: dict[str, tuple[str, dict]] = {
    "ours": ("ours", {}),
    "ours-ckpt": ("ours", {"gradient_checkpointing": True}),
    "ours-packed": ("ours", {"packing": True}),
    "ours-packed-sdpa": ("ours", {"packing": True, "attention": "sdpa"}),
    "ours-unsloth": ("ours", {"backend": "unsloth"}),
    "trl": ("trl", {}),
    "trl-bf16w": ("trl", BF16W),
    "trl-liger": ("trl", {**BF16W, "use_liger_kernel": True}),
    # the examples are shorter than 4096 already: TRL refuses max_length with padding-free and no packing
    "trl-padfree": ("trl", {**BF16W, "padding_free": True, "max_length": None}),
    "trl-unsloth": ("trl-unsloth", {}),
    "ours-kd": ("ours", {"objective": "kd", "kd": KD}),
    "trl-kd": ("trl-kd", {}),
}
KD_VARIANTS = {"ours-kd", "trl-kd"}
CUDA_ONLY = {"ours-unsloth", "trl-liger", "trl-unsloth"}
# dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets, by a part of the device's name; the first
# match wins, so longer names come first
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 5090": 209.5,
    "RTX 4090": 165.2,
}


# ---------------------------------------------------------------------------------------------- parent side


def build_student(target: Path, layers: int, seed: int = 0) -> None:
    """Random-weight Gemma 3 270M (bf16 safetensors) plus a word-level tokenizer over the full vocabulary."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, Gemma3ForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(ARCH)
    if layers != config.num_hidden_layers:
        config.layer_types = config.layer_types[:layers]
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    vocab = {SPECIAL.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORDS), behavior="isolated")
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
        return "".join(f"t{i}" for i in ids)

    return [
        {"id": f"b{i}", "prompt": words(rng.randint(*prompt_len)), "response": words(rng.randint(*response_len))}
        for i in range(n)
    ]


def ids_of(text: str) -> list[int]:
    return [int(i) for i in re.findall(r"t(\d+)", text)]


def add_top_k(rows: list[dict], vocab: int, seed: int) -> None:
    """A stored teacher distribution in `distill generate`'s columns (generate.logprobs=20), for ours-kd: at each
    answer token, the token itself and 19 other random ids, with random log-probabilities in falling order. The
    step's cost does not depend on the values, and computing the real ones would spend the device's time on a
    teacher pass that generate pays once, outside training."""
    rng = random.Random(seed + 1)
    for row in rows:
        tokens = ids_of(row["response"]) + [END]
        ids, logprobs = [], []
        for token in tokens:
            ids.append([token, *[i for i in rng.sample(range(7, vocab), TOP_K) if i != token][: TOP_K - 1]])
            weights = sorted((rng.random() for _ in range(TOP_K)), reverse=True)
            total = sum(weights) * 1.25  # a fifth of the mass left to the tail
            logprobs.append([math.log(w / total) for w in weights])
        row.update(teacher_tokens=tokens, teacher_top_ids=ids, teacher_top_logprobs=logprobs)


def encode_rows(work: Path, max_length: int) -> list[dict]:
    """Token ids + labels through distill.sft_data.encode_example (the same function `distill train` uses)."""
    from transformers import AutoTokenizer

    from distill.sft_data import encode_example

    tokenizer = AutoTokenizer.from_pretrained(work / "student")
    rows = json.loads((work / "rows.json").read_text())
    encoded = [vars(encode_example(tokenizer, r["prompt"], r["response"], max_length, r["id"])) for r in rows]
    first = encoded[0]
    n_prompt = first["labels"].index(next(x for x in first["labels"] if x != -100))
    assert first["input_ids"][:5] == [BOS, START, 4] + ids_of(rows[0]["prompt"])[:2]
    assert first["input_ids"][n_prompt - 2 : n_prompt] == [START, 5] and first["input_ids"][-1] == END
    return encoded


def run_child(variant: str, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"result-{variant}.json"
    out.unlink(missing_ok=True)  # a result only from this run's child
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
        "--profile-steps",
        str(args.profile_steps if args.profile else 0),
    ]
    print(f"--- {variant}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, check=False)
    if not out.is_file():
        return {"variant": variant, "error": f"child exited {proc.returncode}"}
    result = json.loads(out.read_text())
    result["child_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def print_table(results: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        (
            f"{'variant':16} {'steps':>5} {'samples/s':>9} {'tokens/s':>9} {'s/step':>7} {'med s/step':>10} "
            f"{'peak alloc GiB':>14} {'peak resv GiB':>13} {'mean loss':>9} {'pad %':>6} {'MFU %':>6} {'HFU %':>6}"
        )
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:16} FAILED: {r['error']}")
            continue
        mfu = f"{r['mfu_pct']:>6.2f} {r['hfu_pct']:>6.2f}" if r.get("mfu_pct") is not None else f"{'-':>6} {'-':>6}"
        lines.append(
            f"{r['variant']:16} {r['timed_steps']:>5} {r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9.0f} "
            f"{r['s_per_step']:>7.3f} {r['median_s_per_step']:>10.3f} {r['peak_alloc_gib']:>14.2f} "
            f"{r['peak_reserved_gib']:>13.2f} {r['mean_loss']:>9.4f} {r['pad_pct']:>6.1f} {mfu}"
        )
    ok = {r["variant"]: r for r in results if "error" not in r}
    for mine in [name for name in ok if name.startswith("ours")]:
        o = ok[mine]
        for name, r in ok.items():
            if name.startswith("ours") or (name in KD_VARIANTS) != (mine in KD_VARIANTS):
                continue
            lines.append(
                f"{mine} / {name}: samples/s {o['samples_per_s'] / r['samples_per_s']:.2f}x, tokens/s "
                f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x, "
                f"peak alloc {o['peak_alloc_gib'] / r['peak_alloc_gib']:.2f}x, "
                f"peak reserved {o['peak_reserved_gib'] / r['peak_reserved_gib']:.2f}x"
            )
    for r in results:
        for line in r.get("profile", {}).get("table", []):
            lines.append(f"{r['variant']}: {line}")
    return lines


def model_flops(config: dict, length: int, trained: int, lora_r: int, targets: list[str]) -> dict[str, float]:
    """Matrix-product FLOPs of one example's training step (forward and backward, no recompute) and of one
    recomputed forward, for Gemma 3 with LoRA: `length` tokens, `trained` of them predicting a trained label."""
    h, m, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {  # in, out features of each projection
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, m),
        "up_proj": (h, m),
        "down_proj": (m, h),
    }
    base = sum(i * o for i, o in shapes.values())
    lora = sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    window = config["sliding_window"]
    layer_types = config["layer_types"][: config["num_hidden_layers"]]
    full_pairs = length * (length + 1) / 2  # causal (query, key) pairs
    w = min(window, length)
    sliding_pairs = full_pairs - (length - w) * (length - w + 1) / 2  # each query sees its last `window` keys
    pairs = sum(full_pairs if kind == "full_attention" else sliding_pairs for kind in layer_types)
    body_forward = 2 * length * (base + lora) * len(layer_types) + 4 * q * pairs  # QK^T and AV: 2 x 2 x q per pair
    head_forward = 2 * trained * h * config["vocab_size"]
    backward = (
        2 * length * base * len(layer_types)  # frozen weights: input gradients only
        + 2 * 2 * length * lora * len(layer_types)  # LoRA factors: input and weight gradients
        + 2 * 4 * q * pairs
        + head_forward  # tied embedding frozen: the hidden states' gradient only
    )
    return {"step": body_forward + head_forward + backward, "recompute": body_forward}


def peak_tflops(device_name: str | None, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for part, peak in PEAK_TFLOPS.items():
        if device_name and part in device_name:
            return peak, f"data sheet, dense bf16 ({part})"
    return None, "unknown card: pass --peak-tflops"


def add_utilisation(results: list[dict], flops: dict[str, float], total_tokens: int, args) -> None:
    """MFU and HFU of each variant's timed steps: the epoch's FLOPs in proportion to the tokens those steps saw
    (the steps' examples differ between variants' orders, their token counts say how much work they held)."""
    for r in results:
        if "error" in r or not r.get("device_name"):
            continue
        peak, source = peak_tflops(r["device_name"], args.peak_tflops)
        share = r["timed_tokens"] / total_tokens
        step = flops["step"] * share / r["timed_steps"]
        r["model_tflop_per_step"] = step / 1e12
        r["peak_tflops"], r["peak_source"] = peak, source
        if peak is None:
            r["mfu_pct"] = r["hfu_pct"] = None
            continue
        seconds = r["timed_wall_s"]
        r["mfu_pct"] = 100 * flops["step"] * share / seconds / (peak * 1e12)
        recompute = flops["recompute"] * share if r.get("grad_ckpt") else 0
        r["hfu_pct"] = 100 * (flops["step"] * share + recompute) / seconds / (peak * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="optimizer steps run first and not timed")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[900, 1400], metavar=("MIN", "MAX"))
    parser.add_argument("--response-len", type=int, nargs=2, default=[250, 450], metavar=("MIN", "MAX"))
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (the real model has 18)")
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="ours: train.loss_chunk_size")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: all")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke check only (fp32)")
    parser.add_argument("--profile", action="store_true", help="profile --profile-steps steps after the timed ones")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.device == "cuda" or v not in CUDA_ONLY]
    elif args.device == "cpu" and CUDA_ONLY & set(args.variants):
        sys.exit(f"{', '.join(sorted(CUDA_ONLY & set(args.variants)))}: CUDA only; leave them out with --device cpu")

    from distill.config import TrainConfig

    t = TrainConfig()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    per_step = t.batch_size * t.grad_accum
    n = (args.steps + args.warmup_steps + (args.profile_steps if args.profile else 0)) * per_step
    started = time.perf_counter()
    build_student(work / "student", args.layers)
    rows = make_rows(n, tuple(args.prompt_len), tuple(args.response_len), 262144, args.seed)
    if KD_VARIANTS & set(args.variants):
        build_student(work / "teacher", args.layers, seed=1)
        add_top_k(rows, 262144, args.seed)
    (work / "rows.json").write_text(json.dumps(rows))
    encoded = encode_rows(work, t.max_length)
    (work / "encoded.json").write_text(json.dumps(encoded))
    lengths = [len(e["input_ids"]) for e in encoded]
    trained = [sum(x != -100 for x in e["labels"][1:]) for e in encoded]
    config = json.loads((work / "student/config.json").read_text())
    per_example = [model_flops(config, n_, r, t.lora.r, t.lora.target_modules) for n_, r in zip(lengths, trained)]
    flops = {key: sum(f[key] for f in per_example) for key in ("step", "recompute")}
    header = (
        f"Gemma 3 270M (vocab 262,144, hidden 640, {args.layers} layers), random weights; LoRA r={t.lora.r} "
        f"alpha={t.lora.alpha} on {','.join(m.removesuffix('_proj') for m in t.lora.target_modules)}; {t.optim}; "
        f"lr {t.lr}; batch {t.batch_size} x grad-accum {t.grad_accum}; max length {t.max_length}; "
        f"{'bf16' if args.device == 'cuda' else 'fp32 (CPU smoke check)'}\n"
        f"{n} examples = {args.warmup_steps} warm-up + {args.steps} timed"
        f"{f' + {args.profile_steps} profiled' if args.profile else ''} steps x {per_step}; "
        f"tokens/example {min(lengths)}-{max(lengths)} (mean {sum(lengths) / n:.0f}), trained (response+eot) "
        f"{min(trained)}-{max(trained)} (mean {sum(trained) / n:.0f}); model FLOPs per step (mean, no recompute) "
        f"{flops['step'] / 1e12 / (n / per_step):.2f} T, a recompute adds {flops['recompute'] / 1e12 / (n / per_step):.2f} T; "
        f"data built in {time.perf_counter() - started:.1f} s"
    )
    print(header, flush=True)
    results: list[dict] = []
    for variant in args.variants:
        results.append(run_child(variant, work, args))
        add_utilisation(results[-1:], flops, sum(lengths), args)
        lines = print_table(results, args)
        if args.json:  # after every variant: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"header": header, "table": lines, "results": results}, indent=2))
    print("\n" + header)
    print("\n".join(lines))


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


# kernel (CUDA) or operator (CPU) name -> where the time goes; the first match wins
CATEGORIES = (
    ("attention", r"flash|fmha|attention|flex|sdpa"),
    ("optimizer", r"optimizer|bnb|kOptimizer|adam|8bit"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("softmax / reductions", r"logsumexp|softmax|reduce|cross_entropy|nll|aten::(sum|max|mean)$"),
    ("copies / indexing", r"memcpy|memset|copy|cat|index|gather|scatter|aten::(to|contiguous|clone)$"),
    ("elementwise / norms", r"elementwise|vectorized|triton|norm|mul|add|tanh|gelu|exp|rsqrt|pow|sub|div|where"),
)


class Profiled:
    """A TrainerCallback that runs torch.profiler over the optimizer steps after the timed ones."""

    def __init__(self, args: argparse.Namespace, cuda: bool) -> None:
        self.first = args.warmup_steps + args.steps  # global_step when the first profiled step begins
        self.last = self.first + args.profile_steps
        self.cuda, self.prof, self.wall = cuda, None, 0.0

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                if state.global_step == outer.first and outer.last > outer.first and outer.prof is None:
                    outer.start()

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == outer.last and outer.prof is not None:
                    outer.stop()

        return Callback()

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.began = time.perf_counter()

    def stop(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.began
        self.prof.__exit__(None, None, None)

    def summary(self) -> dict:
        """Time by category, the device's idle share of the profiled wall time (CUDA), the top names."""
        import re

        import torch

        if self.prof is None:
            return {}
        if self.cuda:  # kernels, as the GPU ran them
            kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
            busy, reach = 0.0, float("-inf")
            for start, end in spans:  # union of kernel intervals: overlapping streams count once
                busy += max(0.0, end - max(start, reach))
                reach = max(reach, end)
            times: dict[str, float] = {}
            for e in kernels:
                times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us()
            total = sum(times.values())
        else:  # operators' own CPU time
            times = {e.key: e.self_cpu_time_total for e in self.prof.key_averages()}
            total, busy = sum(times.values()), None
        by_category: dict[str, float] = {}
        for name, us in times.items():
            category = next((c for c, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")
            by_category[category] = by_category.get(category, 0.0) + us
        steps = self.last - self.first
        wall_us = self.wall * 1e6
        table = [
            f"profile of {steps} steps, {self.wall:.3f} s wall, {total / 1e3:.1f} ms {'kernel' if self.cuda else 'CPU op'} time"
        ]
        if busy is not None:
            table.append(f"  GPU idle (host gaps, launches, syncs): {100 * (1 - busy / wall_us):.1f}% of the wall time")
        for category, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
            table.append(f"  {category:22} {us / 1e3 / steps:9.1f} ms/step {100 * us / total:5.1f}%")
        top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
        table += [f"    {us / 1e3 / steps:8.2f} ms/step  {name[:110]}" for name, us in top]
        return {
            "steps": steps,
            "wall_s": self.wall,
            "gpu_busy_pct": None if busy is None else 100 * busy / wall_us,
            "ms_per_step": {c: us / 1e3 / steps for c, us in by_category.items()},
            "top": [{"name": name, "ms_per_step": us / 1e3 / steps} for name, us in top],
            "table": table,
        }


def summarise(variant: str, trainer, train_output, timer, args, extra: dict, padded_tokens: int) -> dict:
    import statistics

    import torch

    w, end = args.warmup_steps, args.warmup_steps + args.steps
    marks = timer.marks[: end + 1]  # the profiled steps after these are slowed by the profiler
    (s0, t0, k0), (s1, t1, k1) = marks[w], marks[end]
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
    runner, settings = VARIANTS[args.child]
    if runner == "trl-unsloth" or settings.get("backend") == "unsloth":
        import unsloth  # noqa: F401  Unsloth patches transformers and TRL when imported before them

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu for the smoke check")
    work = args.workdir
    profiled = Profiled(args, cuda)
    try:
        if runner == "ours":
            result = child_ours(args, work, cuda, settings, profiled)
        elif runner == "trl-kd":
            result = child_trl_kd(args, work, cuda, profiled)
        else:
            result = child_trl(args, work, cuda, settings, profiled, unsloth=runner == "trl-unsloth")
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated() / 2**30
        result = {"variant": args.child, "error": f"out of memory ({peak:.1f} GiB allocated at the peak)"}
    (work / f"result-{args.child}.json").write_text(json.dumps(result, indent=2))


def bench_config(args: argparse.Namespace, work: Path, cuda: bool, settings: dict):
    """`distill train`'s config for the bench's student: TrainConfig's defaults with `settings` (train.*)."""
    from distill.config import PipelineConfig

    student = str(work / "student")
    return PipelineConfig(
        run_name="bench",
        run_dir=work / "runs",
        seed=0,
        models={"teacher": student, "student": student},
        train={
            "backend": "transformers",
            "precision": "auto" if cuda else "fp32",
            "loss_chunk_size": args.loss_chunk_size,
            **settings,
        },
    )


def child_ours(args: argparse.Namespace, work: Path, cuda: bool, settings: dict, profiled: Profiled) -> dict:
    from datasets import Dataset
    from transformers import Trainer, set_seed

    import distill.stages.train as train_stage
    from distill.plan import build_plan

    steps = args.steps + args.warmup_steps + args.profile_steps
    cfg = bench_config(args, work, cuda, settings)
    device = "cuda" if cuda else "cpu"
    t = cfg.train
    backend = train_stage.choose_backend(cfg)
    bf16 = train_stage.use_bf16(cfg)
    recompute = build_plan(cfg)["gradient_checkpointing"]
    set_seed(cfg.seed)
    model, tokenizer = train_stage.load_student(cfg, backend, bf16, recompute)
    if t.packing:
        train_stage.check_packing(model, device)
    rows = Dataset.from_list(json.loads((work / "rows.json").read_text()))
    dataset, truncated, _ = train_stage.tokenize(cfg, tokenizer, rows)
    reference = json.loads((work / "encoded.json").read_text())
    assert dataset["input_ids"] == [r["input_ids"] for r in reference], "tokenize() disagrees with encode_example"
    assert dataset["labels"] == [r["labels"] for r in reference]
    inner, coverage, _ = train_stage.attach_objective(cfg, model, tokenizer, dataset, t.objective == "kd", 0, device)
    collator = PadCounter(inner)
    planned = len(dataset) // (t.batch_size * t.grad_accum)
    assert planned == steps, (planned, steps)
    callbacks = train_stage.make_callbacks(model, work / "runs" / f"log-{args.child}.jsonl", planned)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    timer = step_timer(args, cuda)
    training_args = train_stage.training_args(cfg, backend, bf16, recompute, work / f"ckpt-{args.child}")
    if t.optim == "adamw_8bit":
        train_stage._forget_earlier_optimizer_overrides()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[*callbacks, timer, profiled.callback()],
    )
    if cuda:
        torch_mem = __import__("torch").cuda.memory_allocated() / 2**30
    else:
        torch_mem = 0.0
    out = trainer.train()
    extra = {
        "bf16": bf16,
        "backend": backend,
        "weights_dtype": str(next(train_stage.causal_lm_of(model).parameters()).dtype),
        "attention": train_stage.causal_lm_of(model).config._attn_implementation,
        "packing": t.packing,
        "gib_before_train": torch_mem,
        "truncated": truncated,
        "group_by_length": training_args.train_sampling_strategy,
        "grad_ckpt": recompute,
        "loss_chunk_size": t.loss_chunk_size,
        "objective": t.objective,
        "kd_coverage": coverage,
        "profile": profiled.summary(),
    }
    return summarise(args.child, trainer, out, timer, args, extra, collator.tokens)


def child_trl(
    args: argparse.Namespace, work: Path, cuda: bool, settings: dict, profiled: Profiled, unsloth: bool
) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import distill.stages.train as train_stage
    from distill.config import TrainConfig

    t = TrainConfig()
    student = str(work / "student")
    encoded = json.loads((work / "encoded.json").read_text())
    data = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in encoded],
            "completion_mask": [[int(x != -100) for x in e["labels"]] for e in encoded],
        }
    )
    config = SFTConfig(
        output_dir=str(work / f"ckpt-{args.child}"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        optim=t.optim,
        bf16=cuda,
        max_steps=args.steps + args.warmup_steps + args.profile_steps,
        completion_only_loss=True,  # pre-tokenized data: TRL only applies `completion_mask` when told to
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        **{"max_length": t.max_length, **settings},
        **({} if cuda else {"use_cpu": True}),
    )
    if unsloth:  # Unsloth's loader and adapters with our settings, as distill's own Unsloth path makes them
        unsloth_cfg = bench_config(args, work, cuda, {"backend": "unsloth"})
        model_arg, tokenizer = train_stage.load_student(unsloth_cfg, "unsloth", bf16=True, recompute=True)
        peft = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(student)
        model_arg, peft = student, train_stage.lora_config(t)
    timer = step_timer(args, cuda)
    trainer = SFTTrainer(
        model=model_arg,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[timer, profiled.callback()],
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
        "attention": weights.config._attn_implementation,
        "gib_before_train": gib,
        "group_by_length": config.train_sampling_strategy,
        "grad_ckpt": bool(config.gradient_checkpointing or unsloth),
        "grad_ckpt_kwargs": config.gradient_checkpointing_kwargs,
        "loss_type": config.loss_type,
        "padding_free": config.padding_free,
        "packing": config.packing,
        "use_liger_kernel": config.use_liger_kernel,
        "profile": profiled.summary(),
    }
    return summarise(args.child, trainer, out, timer, args, extra, collator.tokens)


def child_trl_kd(args: argparse.Namespace, work: Path, cuda: bool, profiled: Profiled) -> dict:
    """TRL's closest offline distillation: GKDTrainer with lmbda=0 (never generates), the teacher in memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.config import TrainConfig
    from distill.stages.train import lora_config

    t = TrainConfig()
    rows = json.loads((work / "rows.json").read_text())
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in rows
        ]
    )
    dtype = {"dtype": "bfloat16" if cuda else "float32"}  # GKD reads the key whenever it loads a teacher by name
    config = GKDConfig(
        output_dir=str(work / f"ckpt-{args.child}"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        optim=t.optim,
        max_length=t.max_length,  # its collator keeps the last max_length tokens
        bf16=cuda,
        max_steps=args.steps + args.warmup_steps + args.profile_steps,
        lmbda=0.0,
        beta=KD["beta"],
        temperature=KD["temperature"],
        model_init_kwargs=dtype,
        teacher_model_init_kwargs=dtype,
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        **({} if cuda else {"use_cpu": True}),
    )
    timer = step_timer(args, cuda)
    trainer = GKDTrainer(
        model=str(work / "student"),
        teacher_model=str(work / "teacher"),
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(work / "student"),
        peft_config=lora_config(t),
        callbacks=[timer, profiled.callback()],
    )
    collator = PadCounter(trainer.data_collator)
    trainer.data_collator = collator
    gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    out = trainer.train()
    extra = {
        "bf16": config.bf16,
        "gib_before_train": gib,
        "grad_ckpt": bool(config.gradient_checkpointing),
        "objective": "gkd lmbda=0",
        "profile": profiled.summary(),
    }
    return summarise(args.child, trainer, out, timer, args, extra, collator.tokens)


if __name__ == "__main__":
    main()
