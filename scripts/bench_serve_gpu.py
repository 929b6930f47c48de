"""Serving on a real GPU: the paper's n llama-server processes against one llama-server with N slots, both
sized by `distill serve`'s plan for the same budget, under the same swept load.

  PYTHONPATH=src python scripts/bench_serve_gpu.py --llama-server PATH [--budget-mib 6144]
      [--levels 1 4 16 64] [--requests 8] [--max-tokens 350] [--slo-ms 1000] [--json results.json]

Model: Gemma 3 270M from configs/arch/gemma-3-270m-it.json (all 18 layers, the real 262,144-row
vocabulary), random weights (seed 0), exported to Q8_0 GGUF by distill's own writer. Its tokenizer is the
tiny demo student's SentencePiece model (--tokenizer) grown to 262,144 pieces with plain words, so prompts
tokenize as in the demo and every generated token streams text. Prompts: the crew task's held-out inputs from
configs/paper.yaml (full catalog, 5 past workouts). Random weights never choose end-of-sequence, so every
answer is --max-tokens long, and their validity means nothing: goodput here counts answers within the SLO.

The plan (distill.serving.memory) sizes both fleets for --budget-mib (default: the RTX 2060's 6 GiB);
both run with every layer on the GPU through distill.stages.serve's measure_fleet: the same requests per
level (at least one per user), streamed, TTFT / time per output token / end to end at p50/p95/p99,
capacity = most users with p95 end to end within the SLO. GPU memory: per process from nvidia-smi where
the container shows processes, and always the card's used memory above the idle baseline (peak).
Printed: each fleet's sweep, then the one-server fleet's ratios against the paper's processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "configs/arch/gemma-3-270m-it.json"


class LatencyOnly:
    """Random weights write no valid answer: every answer counts, so goodput is answers within the SLO."""

    def check(self, answer: str, payload: dict[str, Any]) -> list[Any]:
        return []


def full_vocabulary(model_file: Path, size: int) -> bytes:
    """The tiny SentencePiece model grown to `size` pieces with plain words ("▁w<i>", lowest score, so
    prompts tokenize as before): random weights then write text, token by token, as a real model does,
    instead of unused tokens that stream nothing."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    have = {p.piece for p in proto.pieces}
    words = (f"\u2581w{i}" for i in range(size * 2))
    while len(proto.pieces) < size:
        word = next(words)
        if word not in have:
            proto.pieces.add(piece=word, score=-1000.0, type=pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def build_gguf(tokenizer_dir: Path, work: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.gguf_writer import write_gguf

    folder = work / "gemma-3-270m-random"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ARCH)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(full_vocabulary(tokenizer_dir / "tokenizer.model", config.vocab_size))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    target = work / "gemma-3-270m-q8_0.gguf"
    written = write_gguf(folder, target, "q8_0")
    print(f"GGUF: {target} {written['file_bytes'] / 2**20:,.1f} MiB", flush=True)
    return target


class CardMemory:
    """The card's used memory (nvidia-smi), sampled every 0.2 s: peak above the idle baseline."""

    def __init__(self) -> None:
        self.baseline = self.read()
        self.peak = self.baseline
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    @staticmethod
    def read() -> int:
        """0 without an NVIDIA GPU (a CPU smoke run of this script)."""
        if shutil.which("nvidia-smi") is None:
            return 0
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0]) * 2**20

    def loop(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.read())
            self.done.wait(0.2)

    def __enter__(self) -> CardMemory:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--tokenizer", type=Path, default=REPO / "models/tiny/student")
    parser.add_argument("--budget-mib", type=float, default=6144)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=350)
    parser.add_argument("--slo-ms", type=float, default=1000)
    parser.add_argument("--max-slots", type=int, default=None, help="cap on the one server's slots")
    parser.add_argument("--max-processes", type=int, default=None, help="cap on the paper fleet's processes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from distill.config import load_config
    from distill.serving.memory import format_plan, plan_serving, server_bytes
    from distill.stages.serve import measure_fleet
    from distill.tasks import load_task

    levels = "[" + ",".join(map(str, args.levels)) + "]"
    cfg = load_config(
        REPO / "configs/paper.yaml",
        [
            f"serve.llama_server={args.llama_server}",
            f"serve.v_gpu_mb={args.budget_mib}",
            f"serve.concurrency={levels}",
            f"serve.requests={args.requests}",
            f"serve.max_tokens={args.max_tokens}",
            f"serve.slo_ms={args.slo_ms}",
            "serve.ready_timeout_s=300",
            "serve.request_timeout_s=300",
        ],
    )
    task = load_task(cfg)
    requests = []
    for i in range(max(args.requests, *args.levels)):
        example = task.example("test", i)
        requests.append({"prompt": example.prompt, "payload": example.payload})
    card = "cpu (no nvidia-smi)"
    if shutil.which("nvidia-smi"):
        card = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    print(f"card: {card}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf = build_gguf(args.tokenizer, work)
        plan = plan_serving(cfg, model_bytes=gguf.stat().st_size)
        for key, value in format_plan(plan):
            print(f"  {key}: {value}")
        slots = min(plan["slots"], args.max_slots or plan["slots"])
        processes = min(plan["instances"], args.max_processes or plan["instances"])
        fleets: dict[str, Any] = {}
        for name, count, each, threads, planned in (
            ("processes", processes, 1, 1, plan["v_small_bytes"] + plan["v_batch_bytes"]),
            ("slots", 1, slots, max(1, processes), server_bytes(plan, slots)),
        ):
            if count < 1:
                print(f"{name}: nothing fits the budget", flush=True)
                continue
            start = time.perf_counter()
            with CardMemory() as memory:
                fleet = measure_fleet(
                    cfg,
                    gguf,
                    task=LatencyOnly(),
                    requests=requests,
                    log_dir=work,
                    name=name,
                    count=count,
                    slots=each,
                    threads=threads,
                    planned_each=planned,
                    v_gpu=plan["v_gpu_bytes"],
                )  # type: ignore[arg-type]
            fleet["card_peak_above_idle_bytes"] = memory.peak - memory.baseline
            fleet["wall_s"] = round(time.perf_counter() - start, 1)
            fleets[name] = fleet
            card_mib, planned_mib = fleet["card_peak_above_idle_bytes"] / 2**20, count * planned / 2**20
            print(
                f"\n{name}: {count} x {each} slot(s), card memory {card_mib:,.0f} MiB above idle (planned "
                f"{planned_mib:,.0f} MiB, budget {plan['v_gpu_bytes'] / 2**20:,.0f}), capacity {fleet['capacity']} "
                f"users, {fleet['wall_s']} s",
                flush=True,
            )
            for lv in fleet["levels"]:
                e2e = lv["e2e_ms"]
                print(
                    f"  users {lv['concurrency']:>3}: {lv['requests_per_s']:>7} req/s {lv['output_tokens_per_s']:>8} "
                    f"tok/s TTFT p50 {lv['ttft_ms']['p50']:>8} TPOT p50 {lv['tpot_ms']['p50']:>6} e2e p50/p95/p99 "
                    f"{e2e['p50']}/{e2e['p95']}/{e2e['p99']} ms, within SLO {lv['within_slo_share']:.0%}",
                    flush=True,
                )
    if len(fleets) == 2:
        p, s = fleets["processes"], fleets["slots"]

        def best(f: dict[str, Any]) -> float:
            return max(lv["requests_per_s"] for lv in f["levels"])

        print(
            f"\none server with {slots} slots / paper's {processes} processes: capacity "
            f"{s['capacity']} / {p['capacity']} users, best req/s {best(s) / best(p):.2f}x, card memory "
            f"{s['card_peak_above_idle_bytes'] / max(1, p['card_peak_above_idle_bytes']):.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"card": card, "plan": plan, "fleets": fleets}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
