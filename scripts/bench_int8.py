"""CPU decode speed of the compact variant's int8 copy (torchao dynamic int8, what `distill export` writes)
against the float model it came from and against `torch.ao`'s fbgemm dynamic int8 (deprecated, what a user had
before), in one run on the same held-out prompts; also torchao's weight-only int8. Prints tokens/s and each
one's ratio to torchao dynamic int8, and max |Δlogit| against float on the first prompt.
    .venv/bin/python scripts/bench_int8.py --model runs/gpt2-compact/prune/model \
        --dataset runs/gpt2-compact/generate/dataset [--prompts 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/gpt2-compact/prune/model")
    parser.add_argument("--dataset", default="runs/gpt2-compact/generate/dataset")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import torch
    from datasets import load_from_disk
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.int8 import _quantize, _to_linear

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = load_from_disk(args.dataset)["test"].select(range(args.prompts))
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for r in rows
    ]
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    weight_only = _to_linear(copy.deepcopy(fp32))
    quantize_(weight_only, Int8WeightOnlyConfig(set_inductor_config=False))
    with warnings.catch_warnings():  # the peer's own deprecation: it is what is being replaced
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        if "fbgemm" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "fbgemm"
        fbgemm = quantize_dynamic(_to_linear(copy.deepcopy(fp32)), {torch.nn.Linear}, dtype=torch.qint8)
    variants = {
        "torchao dynamic int8 (distill export)": _quantize(copy.deepcopy(fp32)),
        "fp32 (the pruned model)": fp32,
        "torch.ao fbgemm dynamic int8 (deprecated)": fbgemm,
        "torchao weight-only int8": weight_only,
    }
    rates, diffs = {}, {}
    with torch.inference_mode():
        reference = fp32(prompts[0]).logits[0, -1]
        for name, model in variants.items():
            diffs[name] = float((model(prompts[0]).logits[0, -1] - reference).abs().max())
            model.generate(prompts[0], max_new_tokens=2, do_sample=False)  # first-call set-up out of the timing
            start = time.perf_counter()
            for ids in prompts:
                model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            rates[name] = args.tokens * len(prompts) / (time.perf_counter() - start)
    ours = rates["torchao dynamic int8 (distill export)"]
    print(f"{len(prompts)} held-out prompts x {args.tokens} new tokens, greedy, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"{name:45s} {rate:7.1f} tokens/s  {rate / ours:5.2f}x ours  max|dlogit| {diffs[name]:.4f}")


if __name__ == "__main__":
    main()
