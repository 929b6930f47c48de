"""The teacher's distribution: how it is stored while generating, and how it lands on the student's tokens.

While generating, a teacher backend keeps, for every token it writes, its k most likely next tokens and their
log-probabilities: the distribution the token was drawn from at temperature 1, before top-k/top-p and the
sampling temperature, and, with generate.grammar, after the grammar's mask (vLLM reports it so; the
transformers backend records it at the same point). The student then learns the teacher that wrote the
data, grammar included, not a freer one whose answers would have been rejected. An accepted
record carries them packed (int32 ids, float16 log-probabilities, base64) in the same line as its text, so
they are written, fsync'd and resumed exactly like the records; the dataset gets them as three columns.

For training, each student response token is matched with the teacher position that predicts the same text:
both token sequences are turned into byte spans of the response, and a student token gets the teacher's
distribution when a teacher token starts at the same byte.
- Same tokenizer: the teacher's candidates are the student's ids (route `direct`).
- Different tokenizers, same segmentation there (the teacher token spells exactly the student token): each
  candidate becomes the student token that spells the same bytes, the end-of-turn becomes the student's;
  candidates the student cannot spell join the tail (route `mapped`).
- A teacher token starts there but spells other text (another segmentation): only the shape of the
  distribution is comparable, so the vocabulary-free sorted-probability distance (ULD) is used, or nothing
  (route `uld`, by train.kd.unmapped).
- No teacher token starts there (the student token starts inside one of the teacher's): cross-entropy only.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError

COLUMNS = ("teacher_tokens", "teacher_top_ids", "teacher_top_logprobs")
ROUTES = ("none", "direct", "mapped", "uld")
NONE, EXACT, ULD = 0, 1, 2  # how the loss treats a position; direct and mapped are both EXACT
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenLogprobs:
    """Per generated token: its id, the k most likely ids at that step and their log-probabilities."""

    tokens: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def pack(lp: TokenLogprobs, k: int) -> dict[str, Any]:
    """The record form: fixed k per token (short rows padded with id -1, log-probability -inf)."""
    import numpy as np

    ids = np.full((len(lp.tokens), k), -1, dtype="<i4")
    logprobs = np.full((len(lp.tokens), k), -np.inf, dtype="<f2")
    for row, (cand, values) in enumerate(zip(lp.top_ids, lp.top_logprobs)):
        ids[row, : len(cand[:k])] = cand[:k]
        logprobs[row, : len(values[:k])] = values[:k]
    return {
        "k": k,
        "tokens": base64.b64encode(np.asarray(lp.tokens, dtype="<i4").tobytes()).decode(),
        "top_ids": base64.b64encode(ids.tobytes()).decode(),
        "top_logprobs": base64.b64encode(logprobs.tobytes()).decode(),
    }


def unpack(packed: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(tokens [n], top ids [n, k], top log-probabilities [n, k] float16) as numpy arrays."""
    import numpy as np

    tokens = np.frombuffer(base64.b64decode(packed["tokens"]), dtype="<i4")
    n, k = len(tokens), packed["k"]
    ids = np.frombuffer(base64.b64decode(packed["top_ids"]), dtype="<i4").reshape(n, k)
    logprobs = np.frombuffer(base64.b64decode(packed["top_logprobs"]), dtype="<f2").reshape(n, k)
    return tokens, ids, logprobs


def vocab_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id spells (None for special tokens, which spell no text).

    Byte-level BPE (Qwen, GPT-2, Llama 3) writes bytes as printable characters; SentencePiece (Gemma) writes
    a space as "▁" and a byte it has no piece for as "<0xNN>"."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    byte_level = "ByteLevel" in kinds
    from_char = {c: b for b, c in bytes_to_unicode().items()}
    added = tokenizer.added_tokens_decoder
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in added:
            out.append(None if added[i].special else added[i].content.encode())
        elif piece is None:
            out.append(None)
        elif byte_level:
            out.append(bytes(from_char[c] for c in piece) if all(c in from_char for c in piece) else piece.encode())
        elif match := _BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def same_vocabulary(teacher: Any, student: Any) -> bool:
    return teacher.get_vocab() == student.get_vocab()


class Aligner:
    """Turns one example's stored teacher distribution into per-response-token targets for the student."""

    def __init__(
        self,
        teacher_bytes: list[bytes | None],
        student_bytes: list[bytes | None],
        student_byte_pieces: set[int],
        same: bool,
        teacher_end_ids: set[int],
        student_eot: int,
        uld: bool,
    ):
        self.same = same
        self.teacher_bytes = teacher_bytes
        self.student_bytes = student_bytes
        self.teacher_end = teacher_end_ids
        self.student_eot = student_eot
        self.uld = uld
        # Where one text has two student ids (a piece and its byte-fallback twin), the piece wins: it is what
        # the student's own tokenizer writes.
        self.by_bytes: dict[bytes, int] = {}
        for sid in sorted(range(len(student_bytes)), key=lambda i: i in student_byte_pieces):
            piece = student_bytes[sid]
            if piece:
                self.by_bytes.setdefault(piece, sid)

    @classmethod
    def from_tokenizers(cls, teacher: Any, student: Any, teacher_end_ids: set[int], uld: bool) -> Aligner:
        same = same_vocabulary(teacher, student)
        teacher_bytes = vocab_bytes(teacher)
        pieces = student.convert_ids_to_tokens(list(range(len(student))))
        byte_pieces = {i for i, p in enumerate(pieces) if p and _BYTE_PIECE.fullmatch(p)}
        student_bytes = teacher_bytes if same else vocab_bytes(student)
        return cls(teacher_bytes, student_bytes, byte_pieces, same, teacher_end_ids, student.eos_token_id, uld)

    def _candidates(self, ids: Any, logprobs: Any) -> tuple[list[int], list[float]]:
        """The teacher's candidates as student ids; two that spell the same student token add up."""
        import math

        if self.same:
            keep = [(int(i), float(lp)) for i, lp in zip(ids, logprobs) if i >= 0 and math.isfinite(lp)]
            return [i for i, _ in keep], [lp for _, lp in keep]
        merged: dict[int, float] = {}
        for tid, lp in zip(ids.tolist(), logprobs.tolist()):
            if tid < 0 or not math.isfinite(lp):
                continue
            if tid in self.teacher_end:
                sid: int | None = self.student_eot
            else:
                b = self.teacher_bytes[tid] if tid < len(self.teacher_bytes) else None
                sid = self.by_bytes.get(b) if b else None
            if sid is not None:
                merged[sid] = float(math.log(math.exp(merged[sid]) + math.exp(lp))) if sid in merged else lp
        return list(merged), list(merged.values())

    def targets(
        self, response: str | bytes, answer_ids: list[int], tokens: Any, top_ids: Any, top_logprobs: Any
    ) -> tuple[Any, Any, Any, Counter]:
        """(student ids [n, k], teacher log-probabilities [n, k], loss route [n], route counts) for the n
        student answer tokens (the response and its end of turn, as trained). A sampled answer comes as the
        bytes its tokens spell, which need not be valid UTF-8."""
        import numpy as np

        n, k = len(answer_ids), top_ids.shape[1]
        out_ids = np.full((n, k), -1, dtype=np.int64)
        out_lp = np.full((n, k), -np.inf, dtype=np.float32)
        route = np.zeros(n, dtype=np.int64)
        counts: Counter = Counter()
        spans = [self.teacher_bytes[t] if 0 <= t < len(self.teacher_bytes) else None for t in tokens.tolist()]
        text = b"".join(b or b"" for b in spans)
        wanted = response if isinstance(response, bytes) else response.encode()
        # the answer is what follows the last think block, without surrounding whitespace
        think = text.rfind(b"</think>")
        origin = text.find(wanted, think + len(b"</think>") if think >= 0 else 0)
        if origin < 0:
            counts["none"] += n
            return out_ids, out_lp, route, counts
        starts: dict[int, int] = {}  # response byte offset -> first teacher token starting there
        end_at: int | None = None  # the teacher's end-of-turn right after the answer
        offset = -origin
        for i, b in enumerate(spans):
            if b and 0 <= offset < len(wanted):
                starts.setdefault(offset, i)
            elif b is None and offset == len(wanted) and end_at is None and int(tokens[i]) in self.teacher_end:
                end_at = i
            offset += len(b or b"")
        position = 0
        for j, sid in enumerate(answer_ids):
            piece = self.student_bytes[sid] if sid < len(self.student_bytes) else None
            if sid == self.student_eot:
                i: int | None = end_at if position == len(wanted) else None
                exact = i is not None
            elif piece is None or wanted[position : position + len(piece)] != piece:
                i, exact = None, False  # the student spells something else here: nothing to align
            else:
                i = starts.get(position)
                exact = i is not None and spans[i] == piece
            if piece:
                position += len(piece)
            if i is None:
                counts["none"] += 1
                continue
            cand, values = self._candidates(top_ids[i], top_logprobs[i].astype(np.float32)) if exact else ([], [])
            if exact and cand:
                out_ids[j, : len(cand)] = cand
                out_lp[j, : len(values)] = values
                route[j] = EXACT
                counts["direct" if self.same else "mapped"] += 1
            elif self.uld and not exact:
                out_lp[j] = np.sort(top_logprobs[i].astype(np.float32))[::-1]
                route[j] = ULD
                counts["uld"] += 1
            else:
                counts["none"] += 1
        return out_ids, out_lp, route, counts


def teacher_tokenizer(teacher_path: str) -> tuple[Any, set[int]]:
    """The teacher's tokenizer and the ids that end its turn."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        teacher = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError) as exc:
        raise DistillError(
            f"models.teacher: the teacher's tokenizer is needed to read its distribution ({exc}); point "
            "models.teacher at the folder the data was generated with"
        ) from None
    ends = {teacher.eos_token_id} if teacher.eos_token_id is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(teacher_path).eos_token_id
        ends |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    return teacher, ends


def load_aligner(teacher_path: str, student_tokenizer: Any, uld: bool, align: bool) -> Aligner:
    """The aligner for this teacher and student; a different-tokenizer pair needs train.kd.align."""
    teacher, ends = teacher_tokenizer(teacher_path)
    if not align and not same_vocabulary(teacher, student_tokenizer):
        raise DistillError(
            "train.kd.align: the teacher and the student have different tokenizers, and aligning them is off; set "
            "train.kd.align=true or use a student that shares the teacher's tokenizer"
        )
    return Aligner.from_tokenizers(teacher, student_tokenizer, ends, uld)


class KdCollator:
    """The SFT batch plus, for every trainable label in order, the teacher's targets (kd_ids, kd_logprobs,
    kd_route): the layout the distillation loss reads."""

    def __init__(self, pad_id: int, aligner: Aligner, pack: bool = False):
        from distill.sft_data import Collator

        self.sft = Collator(pad_id, pack)
        self.aligner = aligner

    @property
    def samples_seen(self) -> int:
        return self.sft.samples_seen

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        from distill.sft_data import IGNORE

        batch = self.sft(rows)
        parts = [self.aligner.targets(*example_targets(row, IGNORE))[:3] for row in rows]
        batch["kd_ids"] = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        batch["kd_logprobs"] = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        batch["kd_route"] = torch.from_numpy(np.concatenate([p[2] for p in parts]))
        return batch


def example_targets(row: dict[str, Any], ignore: int) -> tuple[str, list[int], Any, Any, Any]:
    """Aligner.targets' arguments for one tokenized row: its trainable labels (cut like the row) and the
    teacher's stored distribution."""
    import numpy as np

    answer = [label for label in row["labels"][1:] if label != ignore]
    top_ids = np.asarray(row["teacher_top_ids"], dtype=np.int64)
    k = top_ids.shape[1] if top_ids.ndim == 2 else 0
    logprobs = np.asarray(row["teacher_top_logprobs"], dtype=np.float32).reshape(-1, k)
    return row["response"], answer, np.asarray(row["teacher_tokens"], dtype=np.int64), top_ids.reshape(-1, k), logprobs
