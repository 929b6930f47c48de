"""Training cost: the plain baseline vs our trainer, same data, same model, measured in one run.

A Gemma 3 architecture with the real 262,144-token vocabulary (reduced depth and width so it fits this
CPU) gets LoRA adapters and a few 8-bit AdamW steps on synthetic examples shaped like the task
(long prompt, shorter response). Each variant runs in its own process so peak memory (max RSS) is its
own:

  baseline: full-vocabulary logits and HF's own loss, batches in random order padded to the longest
  ours:     response-only chunked loss (distill.loss), batches grouped by length (distill's sampler)

Prints tokens/s, peak memory, the loss of the first batch under each (they must agree), and ratios.
    .venv/bin/python scripts/bench_train.py [--steps 3] [--hidden 256] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def build(args: argparse.Namespace):  # noqa: ANN201 - torch objects
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=262_144, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
        layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"], tie_word_embeddings=True,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def examples(args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Prompts of varied length with a response ~1/5 of the prompt, as in the task."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(args.batch * args.steps * 2):
        prompt = rng.randint(args.seq // 3, args.seq * 5 // 6)
        response = prompt // 5
        ids = [rng.randrange(10, 262_000) for _ in range(prompt + response)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def variant(name: str, args: argparse.Namespace) -> dict[str, float]:
    import random

    import bitsandbytes as bnb
    import torch

    from distill.loss import attach_response_loss
    from distill.sft_data import Collator

    model = build(args)
    rows = examples(args)
    collate = Collator(pad_id=0)
    if name == "ours":
        attach_response_loss(model.get_base_model(), chunk_size=1024)
        # length-grouped: sort within a shuffled mega-batch, as the Trainer's LengthGroupedSampler does
        random.Random(1).shuffle(rows)
        rows.sort(key=lambda r: len(r["input_ids"]), reverse=True)
    else:
        random.Random(1).shuffle(rows)
    batches = [collate(rows[i : i + args.batch]) for i in range(0, len(rows), args.batch)]
    first = collate(examples(args)[: args.batch])  # the same batch for both, to compare losses
    with torch.no_grad():
        reference_loss = float(model(**first).loss)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, min_8bit_size=4096)
    model.train()
    tokens = 0
    start = None
    for step, batch in enumerate(batches[: args.steps + 1]):
        if step == 1:  # the first step warms up allocators and kernels
            start, tokens = time.perf_counter(), 0
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    padded = sum(b["input_ids"].numel() for b in batches[1 : args.steps + 1])
    return {
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_batch_loss": reference_loss,
        "padding_share": 1 - tokens / padded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024, help="longest example in tokens")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variant", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(variant(args.variant, args)))
        return
    results = {}
    for name in ("baseline", "ours"):
        cmd = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(out)
    base, ours = results["baseline"], results["ours"]
    print(f"{'variant':<10} {'tokens/s':>10} {'peak RSS MiB':>13} {'padding':>8} {'first-batch loss':>17}")
    for name, r in results.items():
        print(f"{name:<10} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>13.0f} {r['padding_share']:>8.1%} {r['first_batch_loss']:>17.5f}")
    print(f"speed-up (tokens/s ours / baseline): {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    print(f"peak memory (ours / baseline): {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    print(f"loss difference on the same batch: {abs(ours['first_batch_loss'] - base['first_batch_loss']):.2e}")


if __name__ == "__main__":
    main()
