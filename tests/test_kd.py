"""Distillation of the teacher's distribution: capture, storage, alignment across tokenizers, the loss."""

import json
import math

import numpy as np
import pytest
from conftest import check_captured_distribution, crew_task, kill_9_then_resume, write_config

from distill.config import load_config
from distill.errors import DistillError
from distill.kd import EXACT, NONE, ULD, Aligner, TokenLogprobs, pack, unpack, vocab_bytes

# `tiny_models`: a cross-tokenizer pair, the teacher byte-level BPE, the student SentencePiece with byte fallback

# ── storage ───────────────────────────────────────────────────────────────────────────────────────────────


def test_pack_round_trips_and_pads_short_rows() -> None:
    lp = TokenLogprobs([7, 9], [[7, 3, 1], [9]], [[-0.1, -2.5, -3.0], [-0.01]])
    tokens, ids, logprobs = unpack(json.loads(json.dumps(pack(lp, 3))))
    assert tokens.tolist() == [7, 9]
    assert ids.tolist() == [[7, 3, 1], [9, -1, -1]]
    assert np.allclose(logprobs[0], [-0.1, -2.5, -3.0], atol=2e-3) and logprobs.dtype == np.float16
    assert logprobs[1, 0] == pytest.approx(-0.01, abs=1e-3) and np.isneginf(logprobs[1, 1:]).all()


# ── alignment ─────────────────────────────────────────────────────────────────────────────────────────────


def test_vocab_bytes_spell_what_each_tokenizer_decodes(tiny_models) -> None:
    """Byte-level BPE and SentencePiece pieces (with "▁" spaces and <0xNN> byte fallback) read as bytes."""
    from transformers import AutoTokenizer

    text = "Squat: 3x8 @ 42.5 kg — é, ü, 😀\n- rest 60 s"
    for role in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(tiny_models / role)
        table = vocab_bytes(tok)
        ids = tok(text, add_special_tokens=False).input_ids
        assert b"".join(table[i] for i in ids).decode() == text, role
        assert table[tok.eos_token_id] is None  # the end of turn spells no text
    student = AutoTokenizer.from_pretrained(tiny_models / "student")
    pieces = student.convert_ids_to_tokens(student("😀", add_special_tokens=False).input_ids)
    assert all(p.startswith("<0x") for p in pieces), pieces  # the emoji really went through byte fallback


# Hand-made vocabularies. Teacher: 0 <eos>, 1 "Sq", 2 "uat", 3 "Squat", 4 " x", 5 "3", 6 " x3", 7 "\n", 8 "é".
TEACHER = [None, b"Sq", b"uat", b"Squat", b" x", b"3", b" x3", b"\n", "é".encode()]
# Student: 0 <end_of_turn>, 1 "Squat", 2 " x", 3 "3", 4 <0xC3>, 5 <0xA9>, 6 "Sq", 7 "\n", 8 " x3", 9 "Sq" again.
STUDENT = [None, b"Squat", b" x", b"3", b"\xc3", b"\xa9", b"Sq", b"\n", b" x3", b"Sq"]


def aligner(uld: bool = True) -> Aligner:
    return Aligner(TEACHER, STUDENT, {4, 5}, False, {0}, 0, uld)


def top(rows: list[list[tuple[int, float]]], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), k), -1)
    lps = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (tid, p) in enumerate(row):
            ids[i, j], lps[i, j] = tid, math.log(p)
    return ids, lps


def test_same_segmentation_maps_candidates_by_their_text_and_the_end_of_turn() -> None:
    # teacher wrote "Squat" " x" "3" <eos>; student writes the same pieces
    ids, lps = top(
        [[(3, 0.7), (1, 0.2), (8, 0.05)], [(4, 0.9), (6, 0.05)], [(5, 0.8), (7, 0.1)], [(0, 0.9), (7, 0.05)]]
    )
    out_ids, out_lp, route, counts = aligner().targets("Squat x3", [1, 2, 3, 0], np.array([3, 4, 5, 0]), ids, lps)
    assert route.tolist() == [EXACT] * 4 and counts == {"mapped": 4}
    # "Sq" has two student ids: the first one (6) is kept; "é" has no student piece, only two byte pieces: dropped
    assert out_ids[0].tolist() == [1, 6, -1] and np.allclose(np.exp(out_lp[0][:2]), [0.7, 0.2])
    assert out_ids[1].tolist() == [2, 8, -1]
    assert out_ids[3].tolist() == [0, 7, -1]  # the teacher's <eos> is the student's end of turn


def test_merges_and_splits_go_to_uld_or_nothing() -> None:
    # teacher wrote "Sq" "uat" " x3" <eos>; the student writes "Squat" " x" "3" <end_of_turn>
    ids, lps = top([[(1, 0.5), (3, 0.4)], [(2, 0.99)], [(6, 0.6), (4, 0.3)], [(0, 0.95)]])
    tokens = np.array([1, 2, 6, 0])
    _, out_lp, route, counts = aligner().targets("Squat x3", [1, 2, 3, 0], tokens, ids, lps)
    # "Squat" starts where teacher "Sq" starts but spells more: ULD with the teacher's probabilities, sorted
    # " x" starts where " x3" starts: ULD; "3" starts inside " x3": nothing; the end of turn maps exactly
    assert route.tolist() == [ULD, ULD, NONE, EXACT]
    assert np.allclose(np.exp(out_lp[0][:2]), [0.5, 0.4]) and np.allclose(np.exp(out_lp[1][:2]), [0.6, 0.3])
    assert counts == {"uld": 2, "none": 1, "mapped": 1}
    _, _, route, counts = aligner(uld=False).targets("Squat x3", [1, 2, 3, 0], tokens, ids, lps)
    assert route.tolist() == [NONE, NONE, NONE, EXACT] and counts == {"none": 3, "mapped": 1}


def test_byte_fallback_pieces_and_a_think_block() -> None:
    # the student spells "é" as two byte pieces; the teacher as one token: the first byte piece starts where
    # the teacher's token does (ULD), the second starts inside it (nothing). The think block is skipped.
    think = [1, 2]  # stands in for "<think>...</think>": the answer is searched after the last "</think>"
    teacher = TEACHER + [b"</think>"]
    al = Aligner(teacher, STUDENT, {4, 5}, False, {0}, 0, True)
    ids, lps = top([[(1, 0.9)], [(2, 0.9)], [(9, 0.9)], [(8, 0.9)], [(0, 0.9)]])
    tokens = np.array([*think, 9, 8, 0])
    _, _, route, _ = al.targets("é", [4, 5, 0], tokens, ids, lps)
    assert route.tolist() == [ULD, NONE, EXACT]
    # a teacher text that does not contain the answer gives nothing, rather than a wrong alignment
    _, _, route, counts = al.targets("Squat", [1, 0], tokens, ids, lps)
    assert route.tolist() == [NONE, NONE] and counts == {"none": 2}


def test_trailing_text_before_the_teachers_end_leaves_the_end_of_turn_unaligned() -> None:
    ids, lps = top([[(3, 0.9)], [(7, 0.9)], [(0, 0.9)]])
    _, _, route, _ = aligner().targets("Squat", [1, 0], np.array([3, 7, 0]), ids, lps)
    assert route.tolist() == [EXACT, NONE]  # the teacher wrote "\n" first: its <eos> is not at the answer's end


def test_real_tokenizers_cover_most_response_tokens(tiny_models) -> None:
    """Teacher tokens of real answers (greedy tokenization) onto the student's: most map, the eot always."""
    from transformers import AutoTokenizer

    from distill.kd import load_aligner
    from distill.sft_data import IGNORE, encode_example

    teacher = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    task = crew_task()
    for role in ("student", "teacher"):
        student = AutoTokenizer.from_pretrained(tiny_models / role)
        al = load_aligner(str(tiny_models / "teacher"), student, uld=True, align=True)
        totals: dict[str, int] = {}
        for i in range(4):
            answer = task.example("train", i).reference
            tokens = teacher(answer, add_special_tokens=False).input_ids + [teacher.eos_token_id]
            ids = np.array([[t, 5, 6] for t in tokens])
            lps = np.log(np.array([[0.8, 0.1, 0.05]] * len(tokens)))
            labels = [x for x in encode_example(student, "hi", answer, 4096, "e").labels[1:] if x != IGNORE]
            out_ids, _, route, counts = al.targets(answer, labels, np.array(tokens), ids, lps)
            assert route[-1] == EXACT and out_ids[-1, 0] == student.eos_token_id
            exact = route == EXACT
            assert (out_ids[exact, 0] == np.array(labels)[exact]).all()  # the token written is the top candidate
            for key, n in counts.items():
                totals[key] = totals.get(key, 0) + n
        share = 1 - totals.get("none", 0) / sum(totals.values())
        if role == "teacher":
            assert totals == {"direct": sum(totals.values())}
        else:
            assert share > 0.9 and totals["mapped"] > totals["uld"], totals


# ── the loss ──────────────────────────────────────────────────────────────────────────────────────────────


def naive_objective(hidden, weight, labels, ids, teacher, route, kd, softcap=None):
    """The same objective written plainly: full-vocabulary logits for every position, softmax, bucket sums."""
    import torch

    logits = hidden[:, :-1] @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    targets = labels[:, 1:]
    keep = targets != -100
    logits, targets = logits[keep], targets[keep]
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    t = kd.temperature
    q_full = torch.softmax(logits / t, dim=-1)
    total = torch.zeros(())
    for n in range(logits.shape[0]):
        valid = torch.isfinite(teacher[n])
        p_top = teacher[n][valid].exp()
        p = torch.cat([p_top, (1 - p_top.sum()).clamp(min=1e-6)[None]]) ** (1 / t)
        p = p / p.sum()
        if route[n] == EXACT:
            q_top = q_full[n, ids[n][valid]]
            q = torch.cat([q_top, (1 - q_top.sum())[None]])
            if kd.divergence == "forward_kl":
                d = (p * (p.log() - q.log())).sum()
            elif kd.divergence == "reverse_kl":
                d = (q * (q.log() - p.log())).sum()
            else:
                m = kd.beta * p + (1 - kd.beta) * q
                d = kd.beta * (p * (p / m).log()).sum() + (1 - kd.beta) * (q * (q / m).log()).sum()
            total = total + d * t * t
        elif route[n] == ULD:
            q_top = torch.sort(q_full[n], descending=True).values[: ids.shape[1]]
            q = torch.cat([q_top, (1 - q_top.sum())[None]])
            p_sorted = torch.cat([p[:-1], torch.zeros(ids.shape[1] - int(valid.sum()))])
            p_sorted = torch.cat([torch.sort(p_sorted, descending=True).values, p[-1:]])
            total = total + (p_sorted - q).abs().sum()
    return kd.alpha * ce + (1 - kd.alpha) * total


@pytest.mark.parametrize(
    "divergence,temperature,softcap",
    [
        ("forward_kl", 1.0, None),
        ("reverse_kl", 1.0, None),
        ("jsd", 1.0, None),
        ("forward_kl", 2.0, 3.0),
        ("jsd", 0.5, None),
    ],
)
def test_chunked_kd_loss_and_gradients_equal_the_naive_full_logits_objective(divergence, temperature, softcap) -> None:
    import torch

    from distill.loss import KdSettings, kd_loss_sum

    torch.manual_seed(0)
    vocab, width, k = 50, 16, 4
    hidden = torch.randn(2, 9, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 9))
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[1, -1] = -100  # padding
    n = int((labels[:, 1:] != -100).sum())
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(n)])
    ids[1, 2:] = -1  # a row with two candidates
    raw = torch.randn(n, k, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.cat([raw, torch.zeros(n, 1, dtype=torch.float64)], dim=-1), dim=-1)[:, :k]
    teacher[ids < 0] = float("-inf")
    route = torch.tensor([EXACT, EXACT, ULD, NONE, EXACT, ULD, EXACT, EXACT, ULD, EXACT][:n])
    assert len(route) == n
    ids[route == ULD] = -1
    kd = KdSettings(divergence, 0.3, temperature, 0.25)

    class Head:
        def __init__(self, w):
            self.weight = w
            self.bias = None

    total, count = kd_loss_sum(hidden, labels, Head(weight), 3, softcap, kd, ids, teacher, route)
    grads = torch.autograd.grad(total, (hidden, weight))
    expected = naive_objective(hidden, weight, labels, ids, teacher, route, kd, softcap)
    want = torch.autograd.grad(expected, (hidden, weight))
    assert count == n
    assert torch.allclose(total, expected.to(total.dtype), rtol=1e-5, atol=1e-6), (total, expected)
    for got, ref in zip(grads, want):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (got - ref).abs().max()


# ── capture, storage and training, end to end ─────────────────────────────────────────────────────────────


KD_RUN = {"run_name": "kd", "seed": 0, "task": {"catalog_mode": "allowed", "history_len": 3}}
CAPTURE = {
    "backend": "transformers",
    "grammar": True,
    "logprobs": 5,
    "num_examples": 6,
    "validation_examples": 0,
    "test_examples": 0,
    "batch_size": 3,
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 400},
}
KD_TRAIN = {
    "objective": "kd",
    "lora": {"r": 8, "alpha": 16},
    "lr": 5.0e-3,
    "warmup_steps": 1,
    "batch_size": 2,
    "grad_accum": 1,
    "max_length": 3072,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "save_steps": 2,
    "logging_steps": 1,
    "loss_chunk_size": 64,
}


def test_capture_then_kd_training_with_lora(tmp_path, tiny_models) -> None:
    from distill.artifacts import read_manifest
    from distill.plan import distribution_bytes_per_token
    from distill.stages import generate, train

    cfg = load_config(write_config(tmp_path, tiny_models, **KD_RUN, generate=CAPTURE, train=KD_TRAIN))
    folder = generate.run(cfg)
    check_captured_distribution(folder, tiny_models / "teacher", 5, ends_with_eos=True)
    stats = read_manifest(folder)["metrics"]["logprobs"]
    # what `distill plan` projects per token is what the dataset really takes
    assert stats["k"] == 5 and stats["bytes_per_token"] == pytest.approx(distribution_bytes_per_token(5), rel=0.05)
    out = train.run(cfg)
    metrics = read_manifest(out)["metrics"]
    assert metrics["objective"] == "kd" and metrics["kd"]["divergence"] == "forward_kl"
    coverage = metrics["kd"]["coverage"]
    assert coverage["direct"] == 0 and coverage["mapped"] > coverage["uld"] > 0  # a cross-tokenizer pair
    assert coverage["share"] > 0.8 and coverage["tokens"] == sum(
        coverage[r] for r in ("direct", "mapped", "uld", "none")
    )
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == metrics["steps"] == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_kill_9_during_capture_then_resume_keeps_records_and_distributions_in_step(tmp_path, tiny_models) -> None:
    path = write_config(tmp_path, tiny_models, **KD_RUN, generate={**CAPTURE, "num_examples": 18}, train=KD_TRAIN)
    before = kill_9_then_resume(path, tmp_path / "runs/kd/generate/shards/shard-0-of-1/records.jsonl", 6, 300)
    assert 6 <= before.count(b"\n") < 18, "the run must be killed mid-way"
    check_captured_distribution(tmp_path / "runs/kd/generate", tiny_models / "teacher", 5, ends_with_eos=True)


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, tiny_models, cli) -> None:
    path = write_config(tmp_path, tiny_models, **KD_RUN, generate=CAPTURE, train=KD_TRAIN)
    for setting, words in (
        ("generate.backend=reference generate.grammar=false", "generate.logprobs: the reference backend"),
        ("generate.backend=openai generate.logprobs=21", "at most 20"),
    ):
        result = cli("generate", str(path), *setting.split())
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "runs/kd/generate").exists()
    # a dataset without the distribution: kd names the generate option, and the dataset is untouched
    generate = {**CAPTURE, "backend": "reference", "grammar": False, "logprobs": 0}
    plain = write_config(tmp_path, tiny_models, name="plain.yaml", **KD_RUN, generate=generate, train=KD_TRAIN)
    assert cli("generate", str(plain)).returncode == 0
    dataset = tmp_path / "runs/kd/generate/dataset"
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    result = cli("train", str(plain))
    assert result.returncode == 1 and "generate.logprobs=20" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before


def test_different_tokenizers_without_alignment_is_an_error(tiny_models) -> None:
    from transformers import AutoTokenizer

    from distill.kd import load_aligner

    student = AutoTokenizer.from_pretrained(tiny_models / "student")
    with pytest.raises(DistillError, match="train.kd.align"):
        load_aligner(str(tiny_models / "teacher"), student, uld=True, align=False)
    same = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    assert load_aligner(str(tiny_models / "teacher"), same, uld=True, align=False).same
