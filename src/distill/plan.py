"""`distill plan`: sizes, steps and a memory estimate, from the student built on the meta device.

No weights are loaded or downloaded: the architecture comes from a local model folder's config.json
or from the shipped architecture-only config (`models.student_arch`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig
from distill.errors import DistillError

BYTES = {"bf16": 2, "fp32": 4}


def load_arch(cfg: PipelineConfig, role: str = "student") -> Any:
    """transformers config of the teacher or student, without touching a hub."""
    from transformers import AutoConfig

    source = Path(getattr(cfg.models, role))
    arch = getattr(cfg.models, f"{role}_arch")
    if (source / "config.json").is_file():
        return AutoConfig.from_pretrained(source)
    if arch is None:
        raise DistillError(
            f"models.{role}: '{source}' is not a local model folder and models.{role}_arch is not set; "
            f"point models.{role}_arch at an architecture config such as configs/arch/gemma-3-270m-it.json"
        )
    if not Path(arch).is_file():
        raise DistillError(f"models.{role}_arch: {arch} not found; ship the architecture config.json there")
    return AutoConfig.from_pretrained(arch)


def meta_model(cfg: PipelineConfig, role: str = "student") -> Any:
    """The model with shapes but no storage (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_arch(cfg, role)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_trainable_params(model: Any, target_modules: list[str], r: int) -> int:
    """LoRA adds A (r x in) and B (out x r) to every targeted Linear: r * (in + out) parameters each."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            total += r * (module.in_features + module.out_features)
    return total


def steps_per_epoch(num_examples: int, cfg: PipelineConfig, world_size: int = 1) -> int:
    """Optimizer steps per epoch as the HF Trainer counts them (a partial last accumulation still steps)."""
    batches = math.ceil(num_examples / (cfg.train.batch_size * world_size))
    return math.ceil(batches / cfg.train.grad_accum)


def train_steps(num_examples: int, cfg: PipelineConfig, world_size: int = 1) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return math.ceil(steps_per_epoch(num_examples, cfg, world_size) * cfg.train.epochs)


def distribution_bytes_per_token(k: int) -> int:
    """Arrow bytes of one teacher token's stored distribution: its id (int32), k candidate ids (int32) and k
    float16 log-probabilities, and the offsets of the two per-token lists (int32 each)."""
    return 4 + 6 * k + 2 * 4


MEASURED = 256  # examples tokenized for the plan: enough for a mean, quick on any dataset


def generated(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The generate stage's statistics once it is complete for this config."""
    from distill.artifacts import is_complete, read_manifest, stage_dir

    return read_manifest(stage_dir(cfg, "generate"))["metrics"] if is_complete(cfg, "generate") else None


def example_counts(cfg: PipelineConfig, stats: dict[str, Any] | None) -> dict[str, int]:
    """Examples per split: generate's own counts once it is done; before, those asked for, with `all` read as the
    task's usable inputs (a task without an end has no `all`: generate refuses it)."""
    if stats is not None and stats.get("counts"):
        return {split: stats["counts"][split] for split in ("train", "validation", "test")}
    from distill.stages.generate import input_counts, requested

    asked = requested(cfg)
    if None in asked.values():
        from distill.tasks import load_task

        usable = {split: n or 0 for split, (_, n) in input_counts(cfg, load_task(cfg)).items()}
        return {split: usable[split] if n is None else n for split, n in asked.items()}
    return asked


def example_lengths(cfg: PipelineConfig, stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Tokens per training example under the student's tokenizer, each cut at train.max_length as training cuts
    it (mean and longest): measured on up to MEASURED training examples, evenly spaced, once generate is done, or
    before that on the task's first inputs with their reference answers where the pack has them. Without a local
    student tokenizer, from generate's statistics (whose mean, uncut, is an upper bound); None where neither is
    at hand."""
    cap = cfg.train.max_length
    tokens = (stats or {}).get("example_tokens")
    if not (Path(cfg.models.student) / "config.json").is_file():  # the plan never reaches for a hub
        if tokens is None:
            return None
        return {"mean": min(cap, tokens["mean"]), "longest": min(cap, tokens["max"]), "source": "generate statistics"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    pairs, source = _measured_examples(cfg, stats)
    lengths = []
    for prompt, answer in pairs:
        chat = [{"role": "user", "content": prompt}]
        n = len(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"])
        if answer is not None:
            n += len(tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        lengths.append(min(cap, n))
    if not lengths:
        return None
    longest = max(lengths + ([min(cap, tokens["max"])] if tokens else []))  # a sample may miss the longest
    return {"mean": round(sum(lengths) / len(lengths), 1), "longest": longest, "source": source}


def _measured_examples(cfg: PipelineConfig, stats: dict[str, Any] | None) -> tuple[list[tuple[str, Any]], str]:
    """(prompt, answer or None) pairs to measure, and where they come from, in words."""
    if stats is not None:
        from distill.stages.train import load_dataset_split

        rows = load_dataset_split(cfg)  # what training reads, with its one-line errors
        step = max(1, -(-len(rows) // MEASURED))
        sample = rows.select(range(0, len(rows), step))
        pairs = list(zip(sample["prompt"], sample["response"]))
        return pairs, f"{len(pairs):,} of the {len(rows):,} training examples"
    from distill.tasks import load_task

    task = load_task(cfg)
    pairs = []
    for index in range(MEASURED):
        example = task.example("train", index)
        if example is None:
            break
        pairs.append((example.prompt, example.reference))
    answered = all(answer is not None for _, answer in pairs)
    what = "prompts and reference answers" if answered else "prompts only (no reference answers)"
    return pairs, f"{len(pairs)} task inputs, {what}"


def checkpointing(cfg: PipelineConfig, without: int) -> bool:
    """train.gradient_checkpointing, where auto is resolved from `without`, the planned bytes of training that
    keeps every layer's activations. On CUDA recompute only when that would not fit in half the card: the
    estimate counts the main activations only, and the other half leaves room for what it leaves out. On CPU
    always: the memory is the machine's own, shared with everything else running on it."""
    import torch

    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return True
    return without > torch.cuda.get_device_properties(0).total_memory / 2


def build_plan(cfg: PipelineConfig) -> dict[str, Any]:
    model = meta_model(cfg)
    text_cfg = model.config
    base = sum(p.numel() for p in model.parameters())
    trainable = (
        lora_trainable_params(model, cfg.train.lora.target_modules, cfg.train.lora.r)
        if cfg.train.method == "lora"
        else base
    )
    if trainable == 0:
        raise DistillError(
            f"train.lora.target_modules: none of {cfg.train.lora.target_modules} is a Linear layer of the student"
        )
    total = base + trainable if cfg.train.method == "lora" else base
    stats = generated(cfg)
    counts = example_counts(cfg, stats)
    examples = counts["train"]
    steps = train_steps(examples, cfg)
    lengths = example_lengths(cfg, stats)
    seq = cfg.train.max_length if lengths is None else lengths["mean"]
    tokens = examples * seq * cfg.train.epochs

    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    batch = cfg.train.batch_size
    hidden = text_cfg.hidden_size
    vocab = text_cfg.vocab_size
    layers = text_cfg.num_hidden_layers
    # a batch is as long as its longest example
    seq_len = cfg.train.max_length if lengths is None else lengths["longest"]
    # GPT-2 names its MLP width n_inner, and None there means 4 x hidden.
    mlp = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * hidden
    # Weights in training precision; trainable params keep fp32 master weights + grads + 2 optimizer states
    # (1 byte each for 8-bit AdamW, 4 for plain AdamW).
    state_bytes = 2 if cfg.train.optim == "adamw_8bit" else 8
    weights = base * BYTES[precision]
    optimizer = trainable * (4 + 4 + state_bytes)
    # With checkpointing only each layer's input is kept, plus one layer's working set at a time.
    per_layer = batch * seq_len * hidden * BYTES[precision]
    working = batch * seq_len * (4 * hidden + 2 * mlp) * BYTES[precision]
    kept = {True: layers * per_layer + working, False: layers * working}
    logits_full = batch * seq_len * vocab * 4 * 2  # fp32 logits and their gradient
    logits_chunked = min(cfg.train.loss_chunk_size, batch * seq_len) * vocab * 4 * 2
    plan: dict[str, Any] = {
        "student": cfg.models.student,
        "architecture": text_cfg.model_type,
        "base_params": base,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_pct": round(100 * trainable / total, 4),
        "examples": examples,
        "effective_batch": batch * cfg.train.grad_accum,
        "steps_per_epoch": steps_per_epoch(examples, cfg),
        "steps": steps,
        "mean_tokens_per_example": seq,
        "longest_tokens_per_example": seq_len,
        "tokens_source": "train.max_length (upper bound)" if lengths is None else lengths["source"],
        "estimated_tokens": int(tokens),
        "memory_bytes": {
            "weights": weights,
            "optimizer_and_grads": optimizer,
            "activations": 0,  # below, once train.gradient_checkpointing is resolved
            "logits_full_vocab": logits_full,
            "logits_chunked": logits_chunked,
            "total_chunked": weights + optimizer + logits_chunked,
            "total_full_logits": weights + optimizer + logits_full,
        },
    }
    o = cfg.train.on_policy
    if cfg.train.objective == "on_policy" and o.teacher.backend == "transformers":
        # the scoring teacher lives beside the student, in its precision, and reads one answer at a time: logits
        # and their log-softmax at the answer's positions only
        teacher = meta_model(cfg, "teacher")
        answer = min(o.max_new_tokens, cfg.train.max_length) + 1
        extra = {
            "teacher_weights": sum(p.numel() for p in teacher.parameters()) * BYTES[precision],
            "teacher_scoring_logits": answer * teacher.config.get_text_config().vocab_size * 4 * 2,
        }
        memory = plan["memory_bytes"]
        for key in ("total_chunked", "total_full_logits"):
            memory[key] += sum(extra.values())
        memory.update(extra)
    if cfg.train.objective == "on_policy" and o.sampler == "vllm":
        import torch

        # vLLM's engine beside training: on a GPU its share of the card (weights and KV cache), on CPU a copy of
        # the student's weights and its 1 GiB KV cache
        engine = base * BYTES[precision] + 2**30
        if torch.cuda.is_available():
            engine = int(o.vllm_memory * torch.cuda.get_device_properties(0).total_memory)
        memory = plan["memory_bytes"]
        for key in ("total_chunked", "total_full_logits"):
            memory[key] += engine
        memory["sampler_engine"] = engine
    memory = plan["memory_bytes"]
    recompute = checkpointing(cfg, memory["total_chunked"] + kept[False])
    plan["gradient_checkpointing"] = recompute
    memory["activations"] = kept[recompute]
    for key in ("total_chunked", "total_full_logits"):
        memory[key] += kept[recompute]
    g = cfg.generate
    if g.logprobs:
        # every generated example keeps it, held-out ones included; the answer length is the teacher's (or, from
        # data generated without it, the student's) from generate statistics, or before any data the sampling limit
        per_token = distribution_bytes_per_token(g.logprobs)
        response_tokens = None
        if stats is not None and stats.get("logprobs"):  # the teacher's own token count, where it was kept
            response_tokens = stats["logprobs"]["teacher_tokens"] / max(sum(counts.values()), 1)
        elif stats is not None and stats.get("response_tokens"):
            response_tokens = stats["response_tokens"]["mean"]
        length = response_tokens or g.sampling.max_tokens
        stored = sum(counts.values())
        plan["teacher_distribution"] = {
            "k": g.logprobs,
            "bytes_per_token": per_token,
            "tokens_per_example": length,
            "tokens_source": "generate statistics" if response_tokens else "generate.sampling.max_tokens (upper bound)",
            "bytes": int(stored * length * per_token),
        }
    return plan


def preview(cfg: PipelineConfig) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    """`distill plan` and `distill train --dry-run`: the plan as a titled table of rows."""
    plan = build_plan(cfg)
    rows = []
    for key, value in plan.items():
        if key == "memory_bytes":
            rows += [(f"memory.{name}", f"{size:,} B ({size / 2**20:,.1f} MiB)") for name, size in value.items()]
        elif key == "teacher_distribution":
            size = (
                f"top-{value['k']}, {value['bytes_per_token']} B/token x {value['tokens_per_example']:,.0f} "
                f"tokens/example ({value['tokens_source']}) = {value['bytes'] / 2**30:,.2f} GiB"
            )
            rows.append(("teacher distribution (generate.logprobs)", size))
        elif isinstance(value, int) and not isinstance(value, bool):
            rows.append((key, f"{value:,}"))
        else:
            rows.append((key, str(value)))
    return f"plan: {plan['student']} ({plan['architecture']})", plan, rows
