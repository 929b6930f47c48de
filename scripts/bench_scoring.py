"""What the teacher's judgement costs on-policy: scoring in the training process against a vLLM server's
prompt log-probabilities, on the same answers, in one run.

  .venv/bin/python scripts/bench_scoring.py [--model models/tiny/teacher] [--answers 32] [--k 20]

Each answer is one of the crew task's reference answers after its prompt in the teacher's chat template,
scored one after another as training scores them, by the two scorers `train.on_policy.teacher.backend`
chooses between (distill.on_policy): `transformers` (one forward pass, logits kept for the answer's positions
only) and `openai` (a vLLM server started here, fp32 and eager as on this CPU: `/v1/completions` with the
token ids, `max_tokens: 1`, `prompt_logprobs: k`). Both return the same top-k (tests/test_on_policy.py).
Prints, for each, seconds per answer and answer tokens per second, the server's reply size per position it
reports, and the ratio. The model's own arithmetic is the same in both; what differs is what the server does
besides: log-probabilities at every prompt position too, their JSON, HTTP.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/tiny/teacher"), help="the teacher's folder")
    parser.add_argument("--answers", type=int, default=32)
    parser.add_argument("--k", type=int, default=20, help="top-k log-probabilities per position")
    parser.add_argument("--start-s", type=float, default=300, help="how long the server may take to start")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"--model: no model in {args.model}; build the tiny ones with `distill tiny-models models/tiny`")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    import torch

    from distill.config import OnPolicyTeacherConfig
    from distill.kd import teacher_tokenizer
    from distill.on_policy import LocalTeacher, ServerTeacher, teacher_prompt_ids
    from distill.serving.fleet import Server, free_port, running
    from distill.tasks import default_task

    tokenizer = teacher_tokenizer(str(args.model))[0]
    task = default_task()
    pairs = []
    for i in range(args.answers):
        example = task.example("train", i)
        answer = tokenizer(example.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((teacher_prompt_ids(tokenizer, example.prompt), answer))
    prompt_tokens = sum(len(p) for p, _ in pairs)
    answer_tokens = sum(len(a) for _, a in pairs)
    print(
        f"{args.model}: {len(pairs)} answers, {answer_tokens / len(pairs):.0f} answer tokens after "
        f"{prompt_tokens / len(pairs):.0f} prompt tokens on average, top-{args.k}",
        flush=True,
    )

    def timed(scorer: Any) -> float:
        scorer.score(*pairs[0], None)  # warm-up
        started = time.perf_counter()
        for prompt, answer in pairs:
            scorer.score(prompt, answer, None)
        return time.perf_counter() - started

    local_s = timed(LocalTeacher(str(args.model), args.k, "cpu", torch.float32))

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model)]
    command += ["--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", "4096", "--enforce-eager", "--max-logprobs", str(args.k)]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as logs:
        server = Server(port, 1, torch.get_num_threads(), command, env, Path(logs) / "vllm.log")
        with running([server], args.start_s):
            settings = OnPolicyTeacherConfig(backend="openai", base_url=f"{server.url}/v1")
            served = ServerTeacher(settings, "teacher", args.k, pairs[0][0] + pairs[0][1])
            server_s = timed(served)
            prompt, answer = pairs[0]
            body = {"model": "teacher", "prompt": prompt + answer, "max_tokens": 1, "prompt_logprobs": args.k}
            reply_bytes = len(served.client.post("/completions", json=body).content)
            served.close()

    print(f"{'scorer':28} {'s per answer':>12} {'answer tokens/s':>15}")
    for name, seconds in (("in process (transformers)", local_s), ("vLLM server (prompt_logprobs)", server_s)):
        print(f"{name:28} {seconds / len(pairs):>12.4f} {answer_tokens / seconds:>15.0f}")
    positions = len(prompt) + len(answer)
    print(
        f"server reply: {reply_bytes:,} bytes for {positions:,} positions ({reply_bytes / positions:.0f} bytes each, "
        f"{len(answer)} of them the answer's)"
    )
    print(f"vLLM server / in process, time per answer: {server_s / local_s:.2f}x")


if __name__ == "__main__":
    main()
