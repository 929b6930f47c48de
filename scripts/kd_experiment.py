"""Does distilling the teacher's distribution beat training on its text? One CPU run, every step a `distill`
command (configs/kd-tiny.yaml):

  1. tiny models: a Qwen3-style teacher, a Gemma-3-style student with its own SentencePiece tokenizer (the
     cross-tokenizer pair), the same student speaking the teacher's tokenizer (the same-tokenizer pair), and a
     copy of the teacher's architecture to train;
  2. the teacher learns the task: `distill run` on the task's reference answers (generate, train, merge), so
     it has a distribution worth distilling;
  3. per student family, the trained teacher writes the data with its top-20 log-probabilities
     (`generate.logprobs`), under the task's grammar; then, at the same number of student steps,
     `train.objective=sft`, `kd` and `on_policy` (one run per `--lmbda`), each merged and evaluated on the
     same held-out inputs;
  4. at equal wall time: on-policy again (the first `--lmbda`), its steps cut so that its training takes what
     offline KD's took (`--no-equal-time` leaves it out);
  5. with `--warm`: twice the epochs, KD throughout against KD for the first half and on-policy (each `--lmbda`)
     from there (`train.on_policy.start_step`), the schedule the on-policy literature uses: its students
     start from a fine-tuned model, not from one that writes noise.

  .venv/bin/python scripts/kd_experiment.py [--teacher-examples 768] [--teacher-epochs 3] [--lmbda 0.25 0.5]
      [--held-out 16] [--warm [--train-seeds 1 2]] [--no-equal-time]

Every student is also judged by the teacher: its negative log-likelihood, per byte, of the student's free
held-out answers (what on-policy training lowers on the student's own answers), and, over all the answers of
all rows, the rank correlation between that judgement and the task's quality score: a teacher whose
judgement does not follow quality cannot teach quality on-policy. Quality comes with a 90% bootstrap interval
over the held-out inputs.

Prints one table (held-out validity, quality, perplexity on the teacher's answers, agreement with the
teacher, the teacher's judgement, wall time, on-policy sampling and scoring time) and writes it, with every
number, to runs/kd-results.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/kd-tiny.yaml"
MODELS = Path("models/kd-tiny")


def distill(*args: str) -> float:
    """Run one distill command; its wall time in seconds."""
    started = time.perf_counter()
    print("$ distill " + " ".join(args), flush=True)
    with subprocess.Popen([sys.executable, "-m", "distill.cli", *args], cwd=REPO) as proc:
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the command ends too, cleaning up as it does on SIGTERM
            proc.terminate()
            proc.wait()
            raise
    if code:
        sys.exit(f"distill {' '.join(args)} failed (exit {code})")
    return time.perf_counter() - started


def variant(work: Path, name: str, **sections: dict[str, Any]) -> Path:
    """configs/kd-tiny.yaml with some keys replaced (nested dicts merge, other values replace)."""

    def merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    data = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    merge(data, sections)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def manifest(run: str, stage: str) -> dict[str, Any]:
    return json.loads((REPO / "runs" / run / stage / "manifest.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-examples", type=int, default=768, help="reference answers the teacher learns")
    parser.add_argument("--teacher-epochs", type=float, default=3)
    parser.add_argument("--lmbda", type=float, nargs="+", default=[0.25, 0.5], help="on-policy shares to run")
    parser.add_argument("--families", nargs="+", default=["cross", "same"], choices=["cross", "same"])
    parser.add_argument("--held-out", type=int, default=16, help="held-out inputs generated and evaluated")
    parser.add_argument("--warm", action="store_true", help="add KD-then-on-policy at twice the epochs")
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=[],
        help="with --warm: its rows again at each of these train.seed values (the same data, training reseeded)",
    )
    parser.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    os.chdir(REPO)  # the configs name their models and runs relative to the repository
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = REPO / "runs/kd-configs"
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(CONFIG.read_text())
    tiny = base["models"]["tiny"]

    # 1. models, all from the same tokenizer corpus and seed: the teacher's tokenizer is the same in each build
    builds = {
        "cross": {},
        "same": {"student_tokenizer": "teacher"},
        "trainee": {"student_arch": "qwen3", "student": tiny["teacher"]},
    }
    for name, spec in builds.items():
        if not (REPO / MODELS / name / "student/config.json").is_file():
            distill(
                "tiny-models",
                str(MODELS / name),
                "--config",
                str(variant(work, f"models-{name}", models={"tiny": spec})),
            )

    from transformers import AutoTokenizer

    vocab = {n: AutoTokenizer.from_pretrained(REPO / MODELS / n / "student").get_vocab() for n in ("same", "trainee")}
    assert vocab["same"] == vocab["trainee"], "the same-tokenizer student must speak the teacher's tokenizer"

    # 2. the teacher learns the task from the reference answers
    teacher_cfg = variant(
        work,
        "teacher",
        run_name="kd-teacher",
        models={"teacher": str(MODELS / "cross/teacher"), "student": str(MODELS / "trainee/student"), "tiny": None},
        generate={
            "backend": "reference",
            "grammar": False,
            "logprobs": 0,
            "num_examples": args.teacher_examples,
            "batch_size": 64,
        },
        train={"epochs": args.teacher_epochs},
    )
    teacher_s = distill("run", str(teacher_cfg), "--until", "merge")

    # 3. per student family: the teacher's data with its distribution, then SFT and KD at the same steps
    rows: list[dict[str, Any]] = []
    for family in args.families:
        run = f"kd-{family}"
        cfg = variant(
            work,
            run,
            run_name=run,
            models={"student": str(MODELS / family / "student"), "tiny": None},
            generate={"test_examples": args.held_out},
            eval={"num_prompts": args.held_out},
        )
        generate_s = distill("generate", str(cfg))
        if family == "cross":
            distill("eval", str(cfg), "--model", "teacher")
            rows.append({"variant": "teacher (its held-out answers)", **scores(manifest(run, "eval/teacher"))})
        pair = f"{family}-tokenizer"
        variants = [("SFT", ["train.objective=sft"]), ("KD", ["train.objective=kd"])]
        variants += [
            (f"on-policy lmbda {x}", ["train.objective=on_policy", f"train.on_policy.lmbda={x}"]) for x in args.lmbda
        ]
        family_rows = [student(run, cfg, f"{name} {pair}", settings) for name, settings in variants]
        if args.equal_time:  # on-policy's steps cut to what offline KD's training took
            kd, first = family_rows[1], family_rows[2]
            steps = max(1, round(first["steps"] * kd["train_s"] / first["train_s"]))
            settings = [*variants[2][1], f"train.max_steps={steps}"]
            family_rows.append(student(run, cfg, f"{variants[2][0]} {pair}, KD's wall time", settings))
        if args.warm:
            half, epochs = family_rows[1]["steps"], 2 * base["train"]["epochs"]
            longer = [("KD", ["train.objective=kd"])]
            longer += [
                (f"KD, then on-policy lmbda {x} from step {half}", [*s, f"train.on_policy.start_step={half}"])
                for (_, s), x in zip(variants[2:], args.lmbda)
            ]
            for seed in [None, *args.train_seeds]:
                label, reseed = ("", []) if seed is None else (f", train seed {seed}", [f"train.seed={seed}"])
                family_rows += [
                    student(run, cfg, f"{name} {pair}{label}", [*s, f"train.epochs={epochs}", *reseed])
                    for name, s in longer
                ]
        for row in family_rows:
            row["generate_s"] = round(generate_s, 1)
        family_rows[1]["bytes_per_token"] = manifest(run, "generate")["logprobs"]["bytes_per_token"]
        rows += family_rows
    table = markdown(rows, teacher_s)
    print(table)
    (REPO / "runs/kd-results.md").write_text(table)
    (REPO / "runs/kd-results.json").write_text(json.dumps({"teacher_s": teacher_s, "rows": rows}, indent=2))


def student(run: str, cfg: Path, name: str, settings: list[str]) -> dict[str, Any]:
    """Train, merge and evaluate one student variant; its row."""
    wall = distill("train", str(cfg), *settings, "--overwrite")
    wall += distill("merge", str(cfg), *settings, "--overwrite")
    distill("eval", str(cfg), *settings, "--model", "merged", "--overwrite")
    train = manifest(run, "train")
    on_policy = train.get("on_policy")
    answers = JUDGE(cfg, settings, REPO / "runs" / run / "eval/merged/generations.jsonl")
    row = {
        "variant": name,
        "steps": train["steps"],
        "train_s": train["wall_s"],
        "train_merge_s": round(wall, 1),
        "final_loss": train["final_loss"],
        "coverage": (on_policy or train.get("kd") or {}).get("coverage"),
        "on_policy": on_policy,
        **scores(manifest(run, "eval/merged")),
        "judged_nll": sum(a["nll_per_byte"] for a in answers) / len(answers),
        "quality_interval": bootstrap([a["quality"] for a in answers]),
        "answers": answers,
    }
    if on_policy:  # the teacher's judgement of the student's own samples, first quarter against last
        drawn = [json.loads(line) for line in (REPO / "runs" / run / "train/samples.jsonl").read_text().splitlines()]
        quarter = max(len(drawn) // 4, 1)
        row["own_nll"] = [per_token(drawn[:quarter]), per_token(drawn[-quarter:])]
    return row


def per_token(samples: list[dict[str, Any]]) -> float:
    return -sum(s["teacher_logprob"] for s in samples) / max(sum(s["tokens"] for s in samples), 1)


def bootstrap(values: list[float], draws: int = 2000) -> list[float]:
    """The 5th and 95th percentiles of the mean over the held-out inputs drawn again with replacement."""
    rng = random.Random(0)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(draws))
    return [means[draws // 20], means[draws - 1 - draws // 20]]


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties take their mean rank)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


class Judge:
    """The trained teacher reads each free held-out answer of a student after its own chat-template prompt, as
    on-policy training's scorer does (unmasked here: a free answer may leave the grammar)."""

    def __init__(self) -> None:
        self.scorer: Any = None

    def __call__(self, cfg: Path, settings: list[str], generations: Path) -> list[dict[str, Any]]:
        import torch

        from distill.config import load_config
        from distill.data import test_rows
        from distill.kd import teacher_tokenizer
        from distill.on_policy import LocalTeacher, teacher_prompt_ids

        config = load_config(cfg, settings)
        if self.scorer is None:
            self.scorer = LocalTeacher(config.models.teacher, 1, "cpu", torch.float32)
            self.tokenizer = teacher_tokenizer(config.models.teacher)[0]
        prompts = {r["id"]: r["prompt"] for r in test_rows(config)}
        judged = []
        for line in generations.read_text().splitlines():
            g = json.loads(line)
            answer = self.tokenizer(g["text"], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            _, _, own = self.scorer.score(teacher_prompt_ids(self.tokenizer, prompts[g["id"]]), answer, None)
            nll = -float(own.sum()) / max(len(g["text"].encode()), 1)
            judged.append({"id": g["id"], "nll_per_byte": nll, "quality": g["quality"], "valid": g["valid"]})
        return judged


JUDGE = Judge()


def scores(m: dict[str, Any]) -> dict[str, Any]:
    grammar = m.get("constrained") or {}
    return {
        "validity": m["validity"],
        "quality": m["mean_quality"],
        "perplexity": m.get("perplexity"),
        "split_match": m["agreement"].get("split_match"),
        "overlap": m["agreement"].get("exercise_overlap"),
        "grammar_validity": grammar.get("validity"),
        "grammar_overlap": (grammar.get("agreement") or {}).get("exercise_overlap"),
    }


def markdown(rows: list[dict[str, Any]], teacher_s: float) -> str:
    def num(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        f"Teacher trained on reference answers in {teacher_s / 60:.1f} min (generate + train + merge).",
        "",
        (
            "| variant | steps | valid | quality (90% interval) | perplexity on teacher answers | split match "
            "| exercise overlap | + grammar: valid, overlap | teacher NLL per byte of its free answers "
            "| teacher NLL per token of its own samples, first / last quarter | train + merge s "
            "| of which sampling / scoring s | coverage (direct / mapped / ULD / span / none) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, op, own, ci = r.get("coverage"), r.get("on_policy"), r.get("own_nll"), r.get("quality_interval")
        routes = ("direct", "mapped", "uld", "span", "none")
        cover = f"{c['share']:.0%} ({' / '.join(str(c.get(k, '-')) for k in routes)})" if c else ""
        cost = f"{op['sampling_s']:.0f} / {op['scoring_s']:.0f}" if op else ""
        interval = f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
        lines.append(
            f"| {r['variant']} | {r.get('steps', '')} | {num(r['validity'], '.0%')} "
            f"| {num(r['quality'], '.3f')}{interval} | {num(r['perplexity'], '.3f')} | {num(r['split_match'], '.0%')} "
            f"| {num(r['overlap'], '.0%')} | {num(r['grammar_validity'], '.0%')}, {num(r['grammar_overlap'], '.0%')} "
            f"| {num(r.get('judged_nll'), '.3f')} | {f'{own[0]:.3f} / {own[1]:.3f}' if own else ''} "
            f"| {num(r.get('train_merge_s'), '.0f')} | {cost} | {cover} |"
        )
    answers = [a for r in rows for a in r.get("answers", [])]
    if answers:
        rho = rank_correlation([-a["nll_per_byte"] for a in answers], [a["quality"] for a in answers])
        lines += [
            "",
            (
                f"Over the {len(answers)} free answers of all students, the rank correlation between the teacher's "
                f"judgement (log-likelihood per byte) and the task's quality score is {rho:+.2f}."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
