"""train.objective=on_policy: the student's own answers, scored by the teacher across tokenizers."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import CLI, REPO, invoke_cli, vllm_server, write_config
from test_kd import CAPTURE, KD_RUN, KD_TRAIN

from distill.config import load_config

# `tiny_models`: a cross-tokenizer pair (Qwen 3 teacher, byte-level BPE; Gemma 3 student, SentencePiece)
ON_POLICY = {**KD_TRAIN, "objective": "on_policy", "on_policy": {"lmbda": 0.5, "max_new_tokens": 48}}


def samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_the_batch_mode_picks_the_objective(tiny_models) -> None:
    """Stored answers mix cross-entropy and the divergence; the student's own are the divergence alone; stored
    answers without a distribution are cross-entropy alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.kd import EXACT, ULD
    from distill.loss import KdSettings, attach_response_loss, kd_loss_sum, response_loss_sum

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float64)
    offline, own = KdSettings("forward_kl", 0.5, 1.0, 0.5), KdSettings("reverse_kl", 0.5, 1.0, 0.0)
    attach_response_loss(model, 4, offline, own)
    ids = torch.randint(5, 200, (1, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    n, k = int((labels[:, 1:] != -100).sum()), 3
    kd = {
        "kd_ids": torch.stack([torch.randperm(200)[:k] for _ in range(n)]),
        "kd_logprobs": torch.log_softmax(torch.randn(n, k + 1, dtype=torch.float64), -1)[:, :k],
        "kd_route": torch.tensor([EXACT, EXACT, ULD, EXACT, 0, EXACT, ULD]),
    }
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        head, softcap = model.lm_head, model.config.final_logit_softcapping
        args = (kd["kd_ids"], kd["kd_logprobs"], kd["kd_route"])
        want = {
            "offline": kd_loss_sum(hidden, labels, head, 4, softcap, offline, *args)[0] / n,
            "on_policy": kd_loss_sum(hidden, labels, head, 4, softcap, own, *args)[0] / n,
            "text": response_loss_sum(hidden, labels, head, 4, softcap)[0] / n,
        }
        got = {mode: float(model(input_ids=ids, labels=labels, kd_mode=mode, **kd).loss) for mode in want}
        assert float(model(input_ids=ids, labels=labels, **kd).loss) == pytest.approx(got["offline"], rel=1e-9)
    for mode, value in want.items():
        assert got[mode] == pytest.approx(float(value), rel=1e-9), mode
    assert len({round(v, 6) for v in got.values()}) == 3  # three different objectives


def test_a_student_token_spelling_a_run_of_teacher_tokens_is_judged_as_a_whole() -> None:
    """The student wrote "Squat" " x" "3" <end_of_turn>; the teacher reads it as "Sq" "uat" " x3" <eos>. "Squat"
    spells "Sq"+"uat" exactly: the teacher's probability of that run. " x" ends inside " x3": it stays ULD."""
    import numpy as np
    from test_kd import aligner, top

    from distill.kd import EXACT, NONE, ULD
    from distill.on_policy import Rollouts

    rollouts = Rollouts.__new__(Rollouts)  # only the aligner is needed here, not a teacher
    rollouts.aligner = aligner()
    teacher, answer = [1, 2, 6, 0], [1, 2, 3, 0]
    ids, lps = top([[(1, 0.5), (3, 0.3)], [(2, 0.9)], [(6, 0.6), (4, 0.3)], [(0, 0.9)]])
    own = np.log(np.array([0.5, 0.9, 0.6, 0.9], dtype=np.float32))
    targets = rollouts.aligner.targets(b"Squat x3", answer, np.array(teacher), ids, lps)
    out_ids, out_lp, route, counts = targets
    assert counts == {"uld": 2, "none": 1, "mapped": 1}
    rollouts._spans(b"Squat x3", answer, teacher, own, (out_ids, out_lp, route), counts)
    assert counts == {"uld": 1, "span": 1, "none": 1, "mapped": 1}
    assert route.tolist() == [EXACT, ULD, NONE, EXACT]
    assert out_ids[0].tolist() == [1, -1, -1] and out_lp[0, 0] == pytest.approx(np.log(0.5 * 0.9))
    assert np.isneginf(out_lp[0, 1:]).all()


@pytest.mark.parametrize("sampler", ["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def test_on_policy_training_samples_under_the_grammar_and_counts_its_cost(tmp_path, tiny_models, sampler) -> None:
    import xgrammar
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from distill.constrain import task_grammar
    from distill.metrics import TrainMetrics
    from distill.report import objective_words
    from distill.stages import generate, train
    from distill.tasks import load_task

    train_settings = {**ON_POLICY, "on_policy": {**ON_POLICY["on_policy"], "sampler": sampler}}
    cfg = load_config(write_config(tmp_path, tiny_models, **KD_RUN, generate=CAPTURE, train=train_settings))
    data = generate.run(cfg)
    out = train.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    op = m["on_policy"]
    assert m["objective"] == "on_policy" and op["teacher"] == "transformers" and op["offline"] == "offline"
    assert op["on_policy_batches"] + op["offline_batches"] == m["steps"] == 3  # 6 examples, 2 per step
    assert op["on_policy_batches"] >= 1 and op["rows"] == 2 * op["on_policy_batches"]
    assert op["share"] == round(op["on_policy_batches"] / 3, 4)
    # every sampled token is in the coverage, and the pair is cross-tokenizer: mapped by text, never direct
    cover = op["coverage"]
    assert cover["tokens"] == op["sampled_tokens"] == sum(s["tokens"] for s in samples(out))
    assert cover["direct"] == 0 and cover["mapped"] > 0 and cover["span"] > 0 and cover["share"] > 0.5
    assert cover["tokens"] == sum(cover[r] for r in ("none", "direct", "mapped", "uld", "span"))
    assert op["scored_tokens"] > 0 and op["sampling_s"] > 0 and op["scoring_s"] > 0
    assert op["training_s"] < op["wall_s"] and manifest["files"]["samples"] == "samples.jsonl"
    assert m["kd"]["coverage"]["share"] > 0.8  # the stored answers' distribution, as train.objective=kd has it
    # what the student wrote: under each input's grammar, at most max_new_tokens, on the steps that trained on it
    rows = {r["id"]: json.loads(r["payload"]) for r in load_from_disk(str(data / "dataset"))["train"]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer))
    task = load_task(cfg)
    drawn = samples(out)
    assert len(drawn) == op["rows"] and {s["step"] for s in drawn} <= {1, 2, 3}
    # the teacher's judgement of each answer, and its mean per sampled token in the manifest
    assert all(s["teacher_logprob"] < 0 for s in drawn)
    judged = -sum(s["teacher_logprob"] for s in drawn) / op["sampled_tokens"]
    assert op["teacher_nll_per_token"] == pytest.approx(judged, abs=1e-3)
    for sample in drawn:
        assert 0 < sample["tokens"] <= 48
        grammar = task_grammar(task, rows[sample["id"]])
        matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(grammar.gbnf))
        assert matcher.accept_string(sample["answer"]), sample["answer"][:200]
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    words = objective_words(TrainMetrics(**m))
    assert "on-policy distillation" in words and f"{op['sampled_tokens']:,} tokens" in words


def test_answers_keep_to_the_ids_the_tokenizer_spells(tiny_models) -> None:
    """A model whose vocabulary is padded past its tokenizer's, with the padding rows made the likeliest: no
    padding id is drawn (the teacher could not read it, nor anyone the answer)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import OnPolicyConfig
    from distill.on_policy import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    known = model.config.vocab_size
    model.resize_token_embeddings(known + 64, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[known:] = 5 * model.get_output_embeddings().weight[:64].abs().max()
    rollouts = Rollouts.__new__(Rollouts)  # sampling needs the settings, the tokenizer and what it spells
    rollouts.cfg, rollouts.settings = SimpleNamespace(train=SimpleNamespace(max_length=256)), OnPolicyConfig()
    rollouts.settings.max_new_tokens = 16
    rollouts.tokenizer, rollouts.device, rollouts.pad_id = tokenizer, "cpu", tokenizer.pad_token_id
    rollouts.aligner, rollouts.student_grammars = SimpleNamespace(student_bytes=[b""] * known), None
    prompt = tokenizer("Plan my next workouts", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert model(torch.tensor([prompt])).logits[0, -1].argmax() >= known  # unmasked, padding would win
    answers = rollouts._sample(model, [prompt, prompt], None, seed=3)
    assert all(answers) and all(t < known for answer in answers for t in answer)


def test_no_answer_of_the_students_is_drawn_before_start_step() -> None:
    from types import SimpleNamespace

    from distill.config import OnPolicyConfig
    from distill.on_policy import Rollouts

    rollouts = Rollouts.__new__(Rollouts)  # the draw needs only the settings, the seed and the process
    rollouts.cfg, rollouts.process = SimpleNamespace(train_seed=0), 0
    rollouts.settings = OnPolicyConfig(lmbda=1.0, start_step=3)
    assert [rollouts.chosen(step, micro) for step in range(5) for micro in range(2)] == [False] * 6 + [True] * 4
    rollouts.settings = OnPolicyConfig(lmbda=0.5, start_step=3)
    later = [rollouts.chosen(step, micro) for step in range(3, 200) for micro in range(2)]
    assert 0.4 < sum(later) / len(later) < 0.6  # from start_step on, lmbda's share as before


def _train_until_killed(config: Path, checkpoint: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "train", str(config)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoint / "trainer_state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_then_resume_draws_the_same_answers_full_fine_tuning(tmp_path, tiny_models) -> None:
    # one epoch: the Trainer's length-grouped order of a later epoch is drawn afresh on resume, on-policy or not
    on_policy = {"lmbda": 0.5, "max_new_tokens": 24}
    train = {**ON_POLICY, "method": "full", "lr": 1e-3, "batch_size": 1, "on_policy": on_policy}
    whole = write_config(
        tmp_path, tiny_models, name="whole.yaml", **{**KD_RUN, "run_name": "whole"}, generate=CAPTURE, train=train
    )
    cut = write_config(
        tmp_path, tiny_models, name="cut.yaml", **{**KD_RUN, "run_name": "cut"}, generate=CAPTURE, train=train
    )
    assert invoke_cli("generate", str(whole)).returncode == 0
    shutil.copytree(tmp_path / "runs/whole/generate", tmp_path / "runs/cut/generate")  # the same data for both
    assert invoke_cli("train", str(whole)).returncode == 0
    _train_until_killed(cut, tmp_path / "runs/cut/train/checkpoints/checkpoint-2")
    assert not (tmp_path / "runs/cut/train/manifest.json").exists()
    result = invoke_cli("train", str(cut))
    assert result.returncode == 0, result.stderr
    a, b = (tmp_path / f"runs/{name}/train" for name in ("whole", "cut"))
    ma, mb = (json.loads((f / "manifest.json").read_text())["metrics"] for f in (a, b))
    assert mb["resumed_from"] is not None and ma["steps"] == mb["steps"] == 6
    # the sampling RNG follows the step: the resumed run drew exactly the uninterrupted run's answers
    assert samples(a) == samples(b) and len(samples(a)) == ma["on_policy"]["on_policy_batches"] > 0
    for key in ("on_policy_batches", "offline_batches", "rows", "sampled_tokens", "scored_tokens", "coverage"):
        assert ma["on_policy"][key] == mb["on_policy"][key], key
    la, lb = ([json.loads(line)["loss"] for line in (f / "log.jsonl").read_text().splitlines()] for f in (a, b))
    assert la == pytest.approx(lb, rel=1e-4)
    assert (b / "model/model.safetensors").is_file()


def test_non_finite_weights_stop_sampling_with_the_step_and_the_last_checkpoint(tmp_path, tiny_models) -> None:
    from test_train import make_run

    from distill.errors import DistillError
    from distill.stages.train import run

    # the stored answers without a distribution (plain cross-entropy off-policy), the student's own every step;
    # step 2 at this learning rate sends the weights to ~1e30, so step 3's answers cannot be drawn
    on_policy = {"lmbda": 1.0, "max_new_tokens": 8, "grammar": False}
    path = make_run(tmp_path, tiny_models, n=8, max_steps=4, lr=1e30, save_steps=1, grad_accum=1, batch_size=2)
    cfg = load_config(path, ["train.objective=on_policy", *(f"train.on_policy.{k}={v}" for k, v in on_policy.items())])
    with pytest.raises(DistillError, match=r"non-finite .* at step 3; the last good checkpoint is .*checkpoint-2\."):
        run(cfg)
    assert not (tmp_path / "runs/t/train/manifest.json").exists()


class _NoPromptLogprobs(BaseHTTPRequestHandler):
    """A completions endpoint that answers, as llama-server does, without prompt log-probabilities."""

    def do_GET(self) -> None:
        self._reply({"data": [{"id": "teacher"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_bad_teachers_are_one_line_and_change_nothing(tmp_path, tiny_models, cli) -> None:
    from distill.serving.fleet import free_port

    path = write_config(tmp_path, tiny_models, **KD_RUN, generate=CAPTURE, train=ON_POLICY)
    assert cli("generate", str(path)).returncode == 0
    dataset = tmp_path / "runs/kd/generate"
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoPromptLogprobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    openai = "train.on_policy.teacher.backend=openai"
    try:
        for settings, words in (
            (
                [openai, f"train.on_policy.teacher.base_url=http://127.0.0.1:{server.server_address[1]}/v1"],
                "returns no prompt log-probabilities",
            ),
            ([openai, f"train.on_policy.teacher.base_url=http://127.0.0.1:{free_port()}/v1"], "is not reachable"),
            ([f"models.teacher={tmp_path / 'nowhere'}"], "models.teacher"),
            (["train.kd.align=false"], "train.kd.align"),
        ):
            result = cli("train", str(path), *settings)
            assert result.returncode == 1, result.stderr
            assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
            assert not (tmp_path / "runs/kd/train/manifest.json").exists()
    finally:
        server.shutdown()
        server.server_close()
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_vllm_server_scores_as_the_teacher_in_process_does(tmp_path, tiny_models) -> None:
    """One vLLM server holds the teacher: its prompt log-probabilities are the in-process teacher's, and a
    training run scores the student's answers there."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from distill.config import OnPolicyTeacherConfig
    from distill.on_policy import LocalTeacher, ServerTeacher, teacher_prompt_ids

    with vllm_server(tiny_models / "teacher", start_s=240) as port:
        tokenizer = AutoTokenizer.from_pretrained(tiny_models / "teacher")
        prompt = teacher_prompt_ids(tokenizer, "Plan the next three workouts for a pilot.")
        answer = tokenizer("Day 1: squat x3, run 5 km")["input_ids"] + [tokenizer.eos_token_id]
        settings = OnPolicyTeacherConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1")
        remote = ServerTeacher(settings, "teacher", 5, prompt + answer[:2])
        here = LocalTeacher(str(tiny_models / "teacher"), 5, "cpu", torch.float32)
        (ids, values, own), (want_ids, want_values, want_own) = (
            remote.score(prompt, answer, None),
            here.score(prompt, answer, None),
        )
        remote.close()
        assert ids.shape == want_ids.shape == (len(answer), 5)
        assert (ids[:, 0] == want_ids[:, 0]).all()  # the teacher's first choice at every answer token
        assert np.abs(values - want_values).max() < 1e-3
        assert np.abs(own - want_own).max() < 1e-3  # each answer token's own log-probability, in the top-k or not
        path = write_config(tmp_path, tiny_models, **KD_RUN, generate=CAPTURE, train=ON_POLICY)
        assert invoke_cli("generate", str(path)).returncode == 0
        result = invoke_cli(
            "train",
            str(path),
            "train.on_policy.teacher.backend=openai",
            f"train.on_policy.teacher.base_url=http://127.0.0.1:{port}/v1",
            "train.on_policy.teacher.model=teacher",
            "train.on_policy.lmbda=1",
        )
        assert result.returncode == 0, result.stderr
        op = json.loads((tmp_path / "runs/kd/train/manifest.json").read_text())["metrics"]["on_policy"]
        assert op["teacher"] == "openai" and op["on_policy_batches"] == 3 and op["coverage"]["mapped"] > 0


@pytest.mark.slow
def test_the_vllm_sampler_draws_from_the_weights_being_trained(tmp_path, tiny_models) -> None:
    """After a LoRA step the engine's next-token log-probabilities are the trained model's, not the base's;
    the same seed draws the same answers, and each stops at the student's end of turn."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from distill.on_policy import VllmSampler

    cfg = load_config(write_config(tmp_path, tiny_models, train={**ON_POLICY, "max_length": 512}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "student")
    base = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: B is zero only at the start
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Plan my next workouts"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        with model.disable_adapter():
            untrained = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    set_num_threads = torch.set_num_threads
    sampler = VllmSampler(cfg, "cpu", torch.float32)
    assert torch.set_num_threads is set_num_threads  # vLLM's CPU worker replaces it; training's is put back
    try:
        first = sampler.sample(model, 7, [prompt, prompt], None, seed=11, known=len(tokenizer))
        greedy = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
        out = sampler.llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy, use_tqdm=False)[0].outputs[0]
        got = {token: lp.logprob for token, lp in out.logprobs[0].items()}
        for token, logprob in got.items():
            assert logprob == pytest.approx(float(want[token]), abs=1e-3), token
        assert max(abs(lp - float(untrained[t])) for t, lp in got.items()) > 1e-2  # the adapter mattered
        assert sampler.sample(model, 7, [prompt, prompt], None, seed=11, known=len(tokenizer)) == first
        eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        for answer in first:
            assert 0 < len(answer) <= ON_POLICY["on_policy"]["max_new_tokens"]
            assert eot not in answer[:-1]  # nothing after an end of turn
    finally:
        sampler.close()
    assert not Path(sampler.rpc).exists()
    assert os.environ.get("VLLM_RPC_BASE_PATH") != sampler.rpc  # the process's environment is given back


def test_the_vllm_sampler_without_vllm_is_one_line(tmp_path, tiny_models, monkeypatch) -> None:
    import torch

    from distill.errors import DistillError
    from distill.on_policy import VllmSampler

    cfg = load_config(write_config(tmp_path, tiny_models, train=ON_POLICY))
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where it is not installed
    with pytest.raises(
        DistillError, match=r"sampler=vllm: vLLM is not installed; .* set train.on_policy.sampler=transformers"
    ):
        VllmSampler(cfg, "cpu", torch.float32)
