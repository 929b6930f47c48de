"""On-policy distillation (train.objective=on_policy): the student answers, the teacher judges each of its tokens.

Offline SFT and KD train on the teacher's prefixes; at inference the student continues its own, and its early
mistakes compound. Here a share `lmbda` of micro-batches is replaced, just before its forward pass, by the
current student's own answers to the same prompts (under each input's grammar with train.on_policy.grammar).
The teacher reads each answer in one forward pass and keeps its top-k log-probabilities at every one of its
tokens (after the same grammar's mask); they land on the student's tokens through the byte-span alignment of
the stored distribution (distill.kd), so the pair may have different tokenizers. Where a student token spells
several of the teacher's (or part of one) the two distributions have no common support, so a token that spells
exactly a run of the teacher's tokens is judged by the teacher's probability of that run (the chain rule of its
tokens' log-probabilities) against everything else (route `span`). Those micro-batches train on the divergence
alone: cross-entropy on the student's own samples would only sharpen what it already does.
The other micro-batches are the stored teacher answers, distilled as train.objective=kd does (or plain
cross-entropy when the data has no stored distribution).

Which micro-batches are on-policy, and what they sample, follow from (seed, step, micro-batch, process): a run
resumed from a checkpoint redraws the same answers from the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.config import OnPolicyTeacherConfig, PipelineConfig
from distill.errors import DistillError
from distill.kd import EXACT, ROUTES, ULD, Aligner, teacher_tokenizer
from distill.loss import NonFiniteLoss

log = logging.getLogger(__name__)
COST_FILE = "on_policy.json"  # in each checkpoint: the cost so far, so a resumed run keeps counting
OWN_ROUTES = (*ROUTES, "span")  # how the student's own tokens got the teacher's judgement


@dataclass
class Cost:
    """What on-policy training spent, over the whole run (a resume continues the checkpoint's counts)."""

    on_policy_batches: int = 0
    offline_batches: int = 0
    rows: int = 0
    sampled_tokens: int = 0  # student tokens drawn
    scored_tokens: int = 0  # teacher positions read for top-k (its tokens of the answers, end of turn included)
    teacher_logprob: float = 0.0  # the teacher's log-likelihood of every sampled answer, summed
    sampling_s: float = 0.0
    scoring_s: float = 0.0
    wall_s: float = 0.0  # of training as a whole, at the last checkpoint
    routes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OWN_ROUTES, 0))


def teacher_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the teacher's chat template renders it, thinking off: it judges the answer as written."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class TeacherGrammar:
    """The input's grammar over the teacher's vocabulary: which tokens it allows before each answer token."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def bitmasks(self, gbnf: str, ids: list[int]) -> Any:
        """xgrammar bitmasks [m, ceil(V/32)] for the first m answer positions: all of them, or up to the first
        token the grammar rejects (an answer that left it; past that the teacher is read unmasked)."""
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self.compiler.compile_grammar(gbnf))
        masks = xgrammar.allocate_token_bitmask(len(ids), self.vocab_size)
        for i, token in enumerate(ids):
            matcher.fill_next_token_bitmask(masks, i)
            if not matcher.accept_token(token):
                return masks[: i + 1]
        return masks


def _allowed(masks: Any, row: int, token: int) -> bool:
    return bool((int(masks[row, token // 32]) >> (token % 32)) & 1)


class LocalTeacher:
    """models.teacher in the training process (transformers)."""

    def __init__(self, path: str, k: int, device: Any, dtype: Any):
        from transformers import AutoModelForCausalLM

        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as exc:
            raise DistillError(
                f"models.teacher: on-policy training scores the student's answers with the teacher, which does not "
                f"load from {path} ({exc}); point models.teacher at its folder, or serve it and set "
                "train.on_policy.teacher.backend=openai"
            ) from None
        self.k, self.device = k, device

    def score(self, prompt_ids: list[int], answer_ids: list[int], masks: Any) -> tuple[Any, Any, Any]:
        """(top-k ids [n, k], their log-probabilities [n, k], each answer token's own log-probability [n])."""
        import torch

        n = len(answer_ids)
        with torch.inference_mode():
            # only the positions that predict the answer get logits: not a vocabulary row per prompt token
            out = self.model(torch.tensor([prompt_ids + answer_ids], device=self.device), logits_to_keep=n + 1)
            logits = out.logits[0, :-1].float()
            if masks is not None:
                import xgrammar

                xgrammar.apply_token_bitmask_inplace(logits[: len(masks)], masks.to(logits.device))
            logp = logits.log_softmax(-1)
            top = logp.topk(min(self.k, logits.shape[-1]), dim=-1)
            own = logp.gather(1, torch.tensor(answer_ids, device=logp.device)[:, None])[:, 0]
        return top.indices.cpu().numpy(), top.values.cpu().numpy(), own.cpu().numpy()


class ServerTeacher:
    """The teacher behind a vLLM OpenAI-compatible server: /v1/completions with the token ids as the prompt,
    one token generated, and `prompt_logprobs`: the top-k at every prompt position, before any sampling."""

    def __init__(self, settings: OnPolicyTeacherConfig, model: str, k: int, probe: list[int]):
        import httpx

        key = os.environ.get(settings.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url, self.model, self.k = settings.base_url.rstrip("/"), model, k
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=settings.timeout_s)
        try:
            self.score(probe[:-2], probe[-2:], None)
        except httpx.HTTPError as exc:
            self.client.close()
            raise DistillError(
                f"train.on_policy.teacher.base_url: {self.url} is not reachable ({type(exc).__name__}: {exc}); start "
                "the teacher's vLLM server or fix the URL"
            ) from None
        except DistillError:
            self.client.close()
            raise

    def score(self, prompt_ids: list[int], answer_ids: list[int], masks: Any) -> tuple[Any, Any, Any]:
        import numpy as np

        body = {
            "model": self.model,
            "prompt": prompt_ids + answer_ids,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": self.k,
        }
        reply = self.client.post("/completions", json=body)
        if reply.status_code != 200:
            raise DistillError(
                f"train.on_policy.teacher: {self.url} refused to score an answer (HTTP {reply.status_code}: "
                f"{reply.text.strip()[:200]}); a vLLM server started with --max-logprobs >= {self.k} scores them"
            )
        entries = (reply.json().get("choices") or [{}])[0].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompt_ids) + len(answer_ids):
            raise DistillError(
                f"train.on_policy.teacher.base_url: {self.url} returns no prompt log-probabilities (vLLM's "
                "`prompt_logprobs`), so it cannot score the student's answers; serve the teacher with vLLM, or set "
                "train.on_policy.teacher.backend=transformers"
            )
        n = len(answer_ids)
        ids = np.full((n, self.k), -1, dtype=np.int64)
        values = np.full((n, self.k), -np.inf, dtype=np.float32)
        own = np.full(n, -np.inf, dtype=np.float32)
        for row, (token, entry) in enumerate(zip(answer_ids, entries[len(prompt_ids) :])):
            # vLLM adds the scored token itself when it is not among the top-k: rank order, then the first k
            every = {int(t): v["logprob"] for t, v in (entry or {}).items()}
            ranked = sorted(every.items(), key=lambda c: -c[1])[: self.k]
            shift = 0.0
            if masks is not None and row < len(masks):
                ranked, shift = _renormalised_within(ranked, masks, row)
            for col, (candidate, logprob) in enumerate(ranked):
                ids[row, col], values[row, col] = candidate, logprob
            own[row] = every.get(token, -np.inf) - shift
        return ids, values, own

    def close(self) -> None:
        self.client.close()


def _renormalised_within(
    ranked: list[tuple[int, float]], masks: Any, row: int
) -> tuple[list[tuple[int, float]], float]:
    """The server's candidates under the grammar (those it forbids leave, the rest share their mass) and the
    log-normaliser subtracted. Exact when the grammar forbids nothing outside the top-k, which the server does
    not report."""
    kept = [(t, lp) for t, lp in ranked if _allowed(masks, row, t)]
    forbidden = sum(math.exp(lp) for t, lp in ranked if not _allowed(masks, row, t))
    shift = math.log(max(1 - forbidden, 1e-6))
    return [(t, lp - shift) for t, lp in kept], shift


class RolloutCollator:
    """The offline batch, plus each row's prompt text and input payload: what a rollout needs to replace it."""

    def __init__(self, inner: Any):
        self.inner = inner

    @property
    def samples_seen(self) -> int:
        return self.inner.samples_seen

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(rows)
        batch["rollout_rows"] = [(r["id"], r["prompt"], r.get("payload")) for r in rows]
        return batch


class Rollouts:
    """Decides which micro-batches are on-policy and builds them: student samples, teacher scores, alignment.
    The main process appends its samples to `samples` (one JSON line per answer, by the step that trains it)."""

    def __init__(
        self,
        cfg: PipelineConfig,
        tokenizer: Any,
        aligner: Aligner,
        stored: bool,
        process: int,
        device: Any,
        dtype: Any,
        samples: Path,
    ):
        from transformers import AutoConfig

        o = cfg.train.on_policy
        self.cfg, self.settings, self.tokenizer, self.aligner = cfg, o, tokenizer, aligner
        self.offline_mode = "offline" if stored else "text"
        self.process, self.device = process, device
        self.samples = samples if process == 0 else None
        self.teacher_tok, ends = teacher_tokenizer(cfg.models.teacher)
        self.teacher_eot = self.teacher_tok.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.cost = Cost()
        self.began = time.perf_counter()
        self.student_grammars: Any = None
        self.task: Any = None
        self.teacher_grammar: TeacherGrammar | None = None
        k = cfg.generate.logprobs or 20
        if o.teacher.backend == "transformers":  # in the student's precision
            self.scorer: Any = LocalTeacher(cfg.models.teacher, k, device, dtype)
            vocab = self.scorer.model.config.vocab_size
        else:
            probe = teacher_prompt_ids(self.teacher_tok, "ping") + self.teacher_tok("ok")["input_ids"][:1]
            probe.append(self.teacher_eot)
            self.scorer = ServerTeacher(o.teacher, o.teacher.model or cfg.models.teacher, k, probe)
            config = AutoConfig.from_pretrained(cfg.models.teacher)
            vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
        # at the start, not at the first draw: a missing vLLM or a card without room for it is told before training
        self.engine = VllmSampler(cfg, device, dtype) if o.sampler == "vllm" else None
        if o.grammar:
            from distill.tasks import load_task

            self.task = load_task(cfg)
            self.teacher_grammar = TeacherGrammar(self.teacher_tok, vocab, sorted(ends))

    # ── which micro-batches ──

    def chosen(self, step: int, micro: int) -> bool:
        if step < self.settings.start_step:
            return False
        draw = random.Random(f"{self.cfg.train_seed}/{step}/{micro}/{self.process}").random()
        return draw < self.settings.lmbda

    def prepare(self, model: Any, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        """The micro-batch as trained: the stored answers (`kd_mode` offline or text), or the student's own."""
        rows = batch.pop("rollout_rows")
        if not self.chosen(step, micro):
            self.cost.offline_batches += 1
            return {**batch, "kd_mode": self.offline_mode}
        return self._on_policy(model, batch, rows, step, micro)

    def _seed(self, step: int, micro: int) -> int:
        return random.Random(f"sample/{self.cfg.train_seed}/{step}/{micro}/{self.process}").getrandbits(63)

    # ── building one on-policy micro-batch ──

    def _on_policy(
        self, model: Any, batch: dict[str, Any], rows: list[tuple[str, str, str | None]], step: int, micro: int
    ) -> dict[str, Any]:
        import numpy as np
        import torch

        from distill.constrain import task_grammar
        from distill.sft_data import IGNORE

        labels, ids = batch["labels"], batch["input_ids"]
        prompts = [ids[i, : int((labels[i] != IGNORE).nonzero()[0])].tolist() for i in range(len(rows))]
        grammars = None
        if self.task is not None and all(payload is not None for _, _, payload in rows):
            grammars = [task_grammar(self.task, json.loads(payload)) for _, _, payload in rows]
            grammars = grammars if all(g is not None for g in grammars) else None
        started = time.perf_counter()
        if self.engine is not None:
            known = len(self.aligner.student_bytes)
            answers = self.engine.sample(model, step, prompts, grammars, self._seed(step, micro), known)
        else:
            answers = self._sample(model, prompts, grammars, self._seed(step, micro))
        self.cost.sampling_s += time.perf_counter() - started
        started = time.perf_counter()
        parts = [
            self._targets(prompt, answer, grammar.gbnf if grammars else None)
            for (_, prompt, _), answer, grammar in zip(rows, answers, grammars or [None] * len(rows))
        ]
        self.cost.scoring_s += time.perf_counter() - started
        self.cost.on_policy_batches += 1
        self.cost.rows += len(rows)
        self.cost.sampled_tokens += sum(len(a) for a in answers)
        self.cost.teacher_logprob += sum(p[3] for p in parts)
        if self.samples is not None:
            eot = self.aligner.student_eot
            with self.samples.open("a", encoding="utf-8") as fh:
                for (example, _, _), answer, part in zip(rows, answers, parts):
                    entry = {
                        "step": step + 1,
                        "micro": micro,
                        "id": example,
                        "tokens": len(answer),
                        "ended": bool(answer) and answer[-1] == eot,
                        "teacher_logprob": round(part[3], 4),
                        "answer": self.tokenizer.decode(answer, skip_special_tokens=True),
                    }
                    fh.write(json.dumps(entry) + "\n")

        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        new_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            n = len(prompt) + len(answer)
            input_ids[i, :n] = torch.tensor(prompt + answer)
            new_labels[i, len(prompt) : n] = torch.tensor(answer)
            mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": new_labels,
            "kd_ids": torch.from_numpy(np.concatenate([p[0] for p in parts])),
            "kd_logprobs": torch.from_numpy(np.concatenate([p[1] for p in parts])),
            "kd_route": torch.from_numpy(np.concatenate([p[2] for p in parts])),
            "kd_mode": "on_policy",
        }

    def _sample(self, model: Any, prompts: list[list[int]], grammars: list[Any] | None, seed: int) -> list[list[int]]:
        """The student's answers (end of turn included where it wrote one), each within train.max_length."""
        import torch

        from distill.constrain import HFGrammars

        o, limit = self.settings, self.cfg.train.max_length
        eos = model.generation_config.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        room = [min(o.max_new_tokens, limit - len(p)) for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left-padded: every row continues from its last prompt token
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        processors = [_Spelled(len(self.aligner.student_bytes))]
        if grammars is not None:
            self.student_grammars = self.student_grammars or HFGrammars(model, self.tokenizer, stops)
            processors.append(self.student_grammars.processor(grammars))
        was_training = model.training
        model.eval()
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max(room),
                    do_sample=True,
                    temperature=o.temperature,
                    top_k=None,
                    top_p=None,
                    eos_token_id=stops,
                    pad_token_id=self.pad_id,
                    logits_processor=processors,
                    use_cache=True,
                )
        except RuntimeError as exc:  # weights already overflowed: the draw meets inf/nan probabilities
            if "probability tensor contains" not in str(exc):
                raise
            raise NonFiniteLoss("non-finite logits while sampling the student's answers") from None
        finally:
            model.train(was_training)
        answers = []
        for row, space in zip(out[:, width:].tolist(), room):
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[: min(end + 1, space)])
        return answers

    def _targets(self, prompt: str, answer: list[int], gbnf: str | None) -> tuple[Any, Any, Any, float]:
        """The teacher's top-k on this answer, as targets for the student's tokens (see Aligner.targets), and its
        log-likelihood of the whole answer (under the grammar's mask where one is given)."""
        import numpy as np

        eot = self.aligner.student_eot
        spelled = b"".join(self.aligner.student_bytes[t] or b"" for t in answer if t != eot)
        teacher_answer = self.teacher_tok(spelled.decode("utf-8", errors="replace"), add_special_tokens=False)
        teacher_ids = teacher_answer["input_ids"] + ([self.teacher_eot] if answer and answer[-1] == eot else [])
        prompt_ids = teacher_prompt_ids(self.teacher_tok, prompt)
        masks = self.teacher_grammar.bitmasks(gbnf, teacher_ids) if gbnf and self.teacher_grammar else None
        top_ids, top_logprobs, own = self.scorer.score(prompt_ids, teacher_ids, masks)
        self.cost.scored_tokens += len(teacher_ids)
        out_ids, out_lp, route, counts = self.aligner.targets(
            spelled, answer, np.asarray(teacher_ids, dtype=np.int64), top_ids, top_logprobs
        )
        self._spans(spelled, answer, teacher_ids, own, (out_ids, out_lp, route), counts)
        for name, count in counts.items():
            self.cost.routes[name] += count
        return out_ids, out_lp, route, float(np.sum(own))

    def _spans(
        self, spelled: bytes, answer: list[int], teacher_ids: list[int], own: Any, targets: tuple, counts: Counter
    ) -> None:
        """Route `span`, in place: each student token left without a distribution whose bytes are exactly a run
        of the teacher's tokens gets one candidate, itself, at the teacher's log-probability of that run."""
        import numpy as np

        out_ids, out_lp, route = targets
        teacher_bytes = self.aligner.teacher_bytes
        starts, ends, offset = {}, {}, 0
        for i, token in enumerate(teacher_ids):
            piece = teacher_bytes[token] if 0 <= token < len(teacher_bytes) else None
            if not piece:
                break  # the end of turn
            starts[offset] = i
            offset += len(piece)
            ends[offset] = i
        if offset != len(spelled):
            return  # bytes that are not UTF-8 were replaced for the teacher: offsets would not match
        position = 0
        for j, sid in enumerate(answer):
            piece = self.aligner.student_bytes[sid] if sid < len(self.aligner.student_bytes) else None
            if not piece:
                continue
            first, last = starts.get(position), ends.get(position + len(piece))
            position += len(piece)
            if route[j] == EXACT or first is None or last is None:
                continue
            counts["uld" if route[j] == ULD else "none"] -= 1
            counts["span"] += 1
            out_ids[j], out_lp[j] = -1, -np.inf
            out_ids[j, 0], out_lp[j, 0] = sid, float(np.sum(own[first : last + 1]))
            route[j] = EXACT

    # ── the cost, kept across a resume ──

    def restore(self, checkpoint: Path) -> None:
        saved = checkpoint / COST_FILE
        if saved.is_file():
            self.cost = Cost(**json.loads(saved.read_text()))
        else:
            log.warning("%s has no %s: on-policy costs count from this resume", checkpoint, COST_FILE)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        rollouts = self

        class SaveCost(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                rollouts.began = time.perf_counter() - rollouts.cost.wall_s

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.is_world_process_zero:
                    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    rollouts.cost.wall_s = time.perf_counter() - rollouts.began
                    tmp = folder / f".{COST_FILE}.tmp"
                    tmp.write_text(json.dumps(asdict(rollouts.cost)))
                    tmp.replace(folder / COST_FILE)

        return SaveCost()

    def summary(self) -> dict[str, Any]:
        """The manifest's record: settings, what was sampled and scored, and where the time went over the whole
        training, resumes included (counts summed over the data-parallel processes, times the slowest one's)."""
        c = self.cost
        counts = [c.on_policy_batches, c.offline_batches, c.rows, c.sampled_tokens, c.scored_tokens]
        counts += [c.routes[r] for r in OWN_ROUTES]
        times = [c.sampling_s, c.scoring_s, time.perf_counter() - self.began]
        counts, times = _all_processes(counts, "sum"), _all_processes(times, "max")
        (judged,) = _all_processes([c.teacher_logprob], "sum", exact=False)
        routes = dict(zip(OWN_ROUTES, counts[5:]))
        tokens = sum(routes.values())
        o = self.settings
        return {
            "lmbda": o.lmbda,
            "start_step": o.start_step,
            "divergence": o.divergence,
            "beta": o.beta,
            "temperature": o.temperature,
            "max_new_tokens": o.max_new_tokens,
            "grammar": o.grammar,
            "teacher": o.teacher.backend,
            "offline": self.offline_mode,
            "on_policy_batches": counts[0],
            "offline_batches": counts[1],
            "share": round(counts[0] / max(counts[0] + counts[1], 1), 4),
            "rows": counts[2],
            "sampled_tokens": counts[3],
            "scored_tokens": counts[4],
            # how unlikely the teacher finds the student's answers, per student token: what on-policy lowers
            "teacher_nll_per_token": round(-judged / counts[3], 4) if counts[3] else None,
            "sampling_s": round(times[0], 2),
            "scoring_s": round(times[1], 2),
            "training_s": round(max(times[2] - times[0] - times[1], 0.0), 2),
            "wall_s": round(times[2], 2),
            "coverage": {"tokens": tokens, **routes, "share": round((tokens - routes["none"]) / max(tokens, 1), 4)},
        }

    def close(self) -> None:
        if isinstance(self.scorer, ServerTeacher):
            self.scorer.close()
        if self.engine is not None:
            self.engine.close()


class VllmSampler:
    """The student's answers drawn by a vLLM engine in this process (train.on_policy.sampler=vllm), holding the
    weights being trained: they are pushed into the engine before the first draw after each optimizer step
    (LoRA merged on the way, the model itself untouched). The draw is seeded through torch's generator, which
    vLLM's sampler uses for requests without a seed of their own: the same weights draw the same answers."""

    def __init__(self, cfg: PipelineConfig, device: Any, dtype: Any):
        import torch

        try:
            from vllm import LLM
        except ImportError:
            raise DistillError(
                "train.on_policy.sampler=vllm: vLLM is not installed; `pip install vllm` (CUDA) or the CPU build, or "
                "set train.on_policy.sampler=transformers"
            ) from None
        o = cfg.train.on_policy
        cuda = torch.device(device).type == "cuda"
        self.rpc = tempfile.mkdtemp(prefix="distill-vllm-")  # its IPC sockets, removed by close()
        # the engine core in this process (the weights are handed over by reference, not pickled to another one);
        # vLLM reads these from the environment, which close() gives back as it was
        settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_RPC_BASE_PATH": self.rpc}
        if not cuda:
            settings["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB: ~29k tokens of Gemma-3-270M, fp32
        self.environ = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        kwargs: dict[str, Any] = {
            "model": cfg.models.student,
            "dtype": str(dtype).removeprefix("torch."),  # the trained weights go in as they are
            "max_model_len": cfg.train.max_length,
            "seed": cfg.train_seed,
            "enforce_eager": not cuda,  # CUDA graphs survive an in-place reload; on CPU there are none to capture
        }
        if cuda:
            kwargs["gpu_memory_utilization"] = o.vllm_memory
        # vLLM's CPU worker makes torch.set_num_threads a no-op for the whole process: training's is put back
        set_num_threads = torch.set_num_threads
        try:
            # the engine seeds torch: training's own draws (dropout, the data order) go on as they were
            with torch.random.fork_rng(devices=[device] if cuda else []):
                self.llm = LLM(**kwargs)
        except BaseException:
            self._restore()
            raise
        finally:
            torch.set_num_threads = set_num_threads
        self.settings, self.device, self.cuda, self.synced = o, device, cuda, -1

    def sample(
        self, model: Any, step: int, prompts: list[list[int]], grammars: list[Any] | None, seed: int, known: int
    ) -> list[list[int]]:
        """One answer per prompt, from ids below `known` (those the tokenizer spells; see _Spelled)."""
        import torch
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        if self.synced != step:
            self._push(model)
            self.synced = step
        eos = model.generation_config.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [])
        limit = self.llm.llm_engine.model_config.max_model_len
        rows = self.llm.llm_engine.model_config.get_vocab_size()
        allowed = list(range(known)) if known < rows else None
        params = []
        for i, prompt in enumerate(prompts):
            p = SamplingParams(
                temperature=self.settings.temperature,
                top_k=0,
                top_p=1.0,
                max_tokens=min(self.settings.max_new_tokens, limit - len(prompt)),
                stop_token_ids=stops,
                detokenize=False,
                allowed_token_ids=allowed,
            )
            if grammars is not None:
                p.structured_outputs = StructuredOutputsParams(grammar=grammars[i].gbnf)
            params.append(p)
        with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
            torch.manual_seed(seed)
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def _push(self, model: Any) -> None:
        """The trained weights into the engine, under the names of the student's checkpoint."""
        import torch

        weights = []
        with torch.no_grad():
            for name, module in model.named_modules():
                base = getattr(module, "base_layer", None)
                if base is not None and hasattr(module, "get_delta_weight"):  # a LoRA layer: W + the adapter's delta
                    merged = base.weight + sum(module.get_delta_weight(a) for a in module.active_adapters)
                    weights.append((_checkpoint_name(f"{name}.weight"), merged))
            merged_names = {n for n, _ in weights}
            for name, tensor in model.state_dict().items():
                key = _checkpoint_name(name)
                if "lora_" not in name and key not in merged_names:
                    weights.append((key, tensor))
        # in place, through the loader's own processing (the CPU build repacks weights after loading them)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
        self._restore()

    def _restore(self) -> None:
        shutil.rmtree(self.rpc, ignore_errors=True)
        for key, value in self.environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Spelled:
    """A logits processor that leaves only the ids the student's tokenizer spells: a model's vocabulary is often
    padded past its tokenizer's (Qwen 3: 151,936 rows for 151,669 tokens), and a padding row drawn at temperature
    1 is an answer no one can read, nor the teacher judge."""

    def __init__(self, known: int):
        self.known = known

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self.known :] = float("-inf")
        return scores


def _checkpoint_name(name: str) -> str:
    """A parameter's name in the student's own checkpoint: without peft's wrappers."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _all_processes(values: list[float], how: str, exact: bool = True) -> list[float]:
    """Summed (counts: `exact` keeps them integers) or the largest, over the data-parallel processes."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX)
    return [int(v) if how == "sum" and exact else float(v) for v in tensor.tolist()]


def trainer_class() -> Any:
    """The HF Trainer with micro-batches replaced by rollouts before the tokens of the accumulated batch are
    counted, so the loss is normalised over what is really trained."""
    from transformers import Trainer

    class OnPolicyTrainer(Trainer):
        rollouts: Rollouts

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            model = self.accelerator.unwrap_model(self.model)
            step = self.state.global_step
            batches = [self.rollouts.prepare(model, b, step, i) for i, b in enumerate(batches)]
            return batches, self._get_num_items_in_batch(batches, device)

    return OnPolicyTrainer
