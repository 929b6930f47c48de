"""Teacher throughput: the same prompts through vLLM and through transformers `generate`, one run.

Both are the engines `distill generate` drives (vLLM offline chat, HF generate), on the same model folder,
with the same sampling settings and a fixed number of new tokens per prompt (min_tokens = max_tokens
on vLLM, no early stop on transformers) so both produce the same amount of text.
    .venv/bin/python scripts/bench_generate.py --model models/tiny/teacher [--prompts 32] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/tiny/teacher")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from distill.tasks import default_task

    task = default_task()
    prompts = [task.example("train", i).prompt for i in range(args.prompts)]
    chats = [[{"role": "user", "content": p}] for p in prompts]

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=4096, seed=0)
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=args.tokens, min_tokens=args.tokens)
    llm.chat(chats[:2], params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})  # warm-up
    start = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    vllm_s = time.perf_counter() - start
    vllm_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True, enable_thinking=False) for c in chats
    ]
    hf_tokens, start = 0, time.perf_counter()
    batch_size = 8
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=True,
                temperature=0.7,
                top_p=0.8,
                top_k=20,
                pad_token_id=tok.pad_token_id,
            )
        hf_tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    hf_s = time.perf_counter() - start

    print(f"{'backend':<14} {'output tokens':>14} {'seconds':>9} {'tokens/s':>10}")
    print(f"{'vllm':<14} {vllm_tokens:>14} {vllm_s:>9.2f} {vllm_tokens / vllm_s:>10.1f}")
    print(f"{'transformers':<14} {hf_tokens:>14} {hf_s:>9.2f} {hf_tokens / hf_s:>10.1f}")
    print(f"vLLM / transformers output tokens/s: {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()
