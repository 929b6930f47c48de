"""Stage 2: label-masked SFT of the student (LoRA by default, full fine-tuning for the compact variant).

The HF Trainer runs the loop (8-bit AdamW from bitsandbytes, warm-up + linear decay, accumulation,
checkpoints, DDP/FSDP under `accelerate launch` or `torchrun`); the model's forward is replaced by the
chunked response-only loss, and batches are grouped by length to cut padding.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_dir, open_stage, require_inputs, stage_dir
from distill.config import PipelineConfig, TrainConfig
from distill.errors import DistillError
from distill.models import ensure_models

log = logging.getLogger(__name__)


def choose_backend(cfg: PipelineConfig) -> str:
    import importlib.util

    import torch

    wanted = cfg.train.backend
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if wanted == "unsloth" and not (has_unsloth and torch.cuda.is_available()):
        raise DistillError(
            "train.backend=unsloth needs a CUDA GPU and `pip install unsloth` (the `gpu` extra); "
            "use train.backend=transformers on this machine"
        )
    if wanted == "unsloth" and cfg.train.method != "lora":
        raise DistillError(
            "train.backend=unsloth: only train.method=lora is wired to Unsloth; use train.backend=transformers"
        )
    if wanted == "unsloth" and cfg.train.objective == "on_policy":
        raise DistillError(
            "train.backend=unsloth: train.objective=on_policy samples through transformers' generate, which is not "
            "wired to Unsloth; use train.backend=transformers"
        )
    if cfg.train.packing and cfg.train.objective == "on_policy":
        raise DistillError(
            "train.packing: the student's own answers (train.objective=on_policy) are drawn and trained row by row; "
            "set train.packing=false"
        )
    if wanted == "unsloth" and cfg.train.packing:
        raise DistillError(
            "train.backend=unsloth: train.packing is not wired to Unsloth's attention; use train.backend=transformers "
            "or train.packing=false"
        )
    if wanted == "auto":
        fits = cfg.train.method == "lora" and cfg.train.objective != "on_policy" and not cfg.train.packing
        return "unsloth" if has_unsloth and torch.cuda.is_available() and fits else "transformers"
    return wanted


def use_bf16(cfg: PipelineConfig) -> bool:
    import torch

    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


def load_dataset_split(cfg: PipelineConfig) -> Any:
    from datasets import DatasetDict, load_from_disk

    folder = stage_dir(cfg, "generate") / "dataset"
    try:
        data = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise DistillError(
            f"{folder}: not a dataset ({exc}); run `distill generate {cfg.command_args} --overwrite`"
        ) from None
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise DistillError(f"{folder}: no train split; run `distill generate {cfg.command_args} --overwrite`")
    missing = {"id", "prompt", "response"} - set(data["train"].column_names)
    if missing:
        raise DistillError(
            f"{folder}: train split has no {', '.join(sorted(missing))} column; "
            f"run `distill generate {cfg.command_args} --overwrite`"
        )
    if len(data["train"]) == 0:
        raise DistillError(f"{folder}: the train split is empty; run `distill generate {cfg.command_args} --overwrite`")
    return data["train"]


def check_distribution(cfg: PipelineConfig, rows: Any) -> bool:
    """Whether the dataset holds the teacher's distribution; train.objective=kd needs it (on_policy trains the
    stored answers on their text alone without it)."""
    from distill.kd import COLUMNS

    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing and cfg.train.objective == "on_policy":
        log.info("no stored teacher distribution: the offline micro-batches train on the teacher's text alone")
        return False
    if missing:
        raise DistillError(
            f"train.objective=kd: the dataset has no teacher distribution ({', '.join(missing)}); generate it with "
            f"generate.logprobs=20 (`distill generate {cfg.command_args} generate.logprobs=20 --overwrite`), or set "
            "train.objective=sft"
        )
    return True


def tokenize(cfg: PipelineConfig, tokenizer: Any, rows: Any) -> tuple[Any, int, list[str]]:
    """The examples as token ids and labels, how many lost the end of their answer to train.max_length, and the
    ids of those left out because their prompt alone fills it."""
    from datasets import Dataset, concatenate_datasets

    from distill.kd import COLUMNS
    from distill.sft_data import PromptTooLong, check_chat_template, encode_example

    check_chat_template(tokenizer, cfg.models.student)
    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
    truncated, kept, skipped, too_long = 0, [], [], None
    for index, row in enumerate(rows):
        try:
            enc = encode_example(tokenizer, row["prompt"], row["response"], cfg.train.max_length, row["id"])
        except PromptTooLong as exc:
            too_long = too_long or exc
            skipped.append(row["id"])
            continue
        kept.append(index)
        columns["input_ids"].append(enc.input_ids)
        columns["labels"].append(enc.labels)
        columns["length"].append(len(enc.input_ids))
        truncated += enc.truncated
    if too_long is not None and not kept:
        raise DistillError(f"train: every example's prompt fills train.max_length; the first: {too_long}")
    dataset = Dataset.from_dict(columns)
    # what the collator needs beside the ids (it aligns the distribution batch by batch; a rollout renders the
    # prompt for the teacher and reads the input's grammar) stays in Arrow until then
    extra = {
        "sft": [],
        "kd": ["response", *COLUMNS],
        "on_policy": [
            "id",
            "prompt",
            *(["payload"] if "payload" in rows.column_names else []),
            *(["response", *COLUMNS] if set(COLUMNS) <= set(rows.column_names) else []),
        ],
    }[cfg.train.objective]
    if extra:
        carried = rows.select_columns(extra)
        if skipped:
            carried = carried.select(kept)
        dataset = concatenate_datasets([dataset, carried], axis=1)
    return dataset, truncated, skipped


def kd_coverage(dataset: Any, aligner: Any) -> dict[str, Any]:
    """Student response tokens that get a teacher distribution, by route (see distill.kd)."""
    from collections import Counter

    from distill.kd import ROUTES, example_targets
    from distill.sft_data import IGNORE

    counts: Counter = Counter()
    for row in dataset:
        counts += aligner.targets(*example_targets(row, IGNORE))[3]
    tokens = sum(counts.values())
    covered = tokens - counts["none"]
    return {"tokens": tokens, **{r: counts[r] for r in ROUTES}, "share": round(covered / max(tokens, 1), 4)}


def attach_objective(
    cfg: PipelineConfig, model: Any, tokenizer: Any, dataset: Any, stored: bool, process: int, device: Any
) -> tuple[Any, dict[str, Any] | None, Any]:
    """Give the model its loss (train.objective) and return the collator that feeds it, the share of stored
    response tokens that get a teacher distribution (kd, and on_policy with a stored distribution), and the
    rollouts (on_policy only)."""
    from distill.kd import ROUTES, KdCollator, load_aligner
    from distill.loss import KdSettings, attach_response_loss
    from distill.sft_data import Collator

    t = cfg.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if t.objective == "sft":
        attach_response_loss(causal_lm_of(model), t.loss_chunk_size)
        return Collator(pad_id, t.packing), None, None
    aligner = load_aligner(cfg.models.teacher, tokenizer, uld=t.kd.unmapped == "uld", align=t.kd.align)
    settings = KdSettings(t.kd.divergence, t.kd.beta, t.kd.temperature, t.kd.alpha)
    coverage = kd_coverage(dataset, aligner) if stored else None
    if coverage is not None:
        log.info(
            "distilling %s from the teacher's top-%d: %.1f%% of %d response tokens covered (%s)",
            t.kd.divergence,
            len(dataset[0]["teacher_top_ids"][0]),
            100 * coverage["share"],
            coverage["tokens"],
            ", ".join(f"{r} {coverage[r]}" for r in ROUTES),
        )
    if t.objective == "on_policy":
        from distill.on_policy import RolloutCollator, Rollouts

        o = t.on_policy
        # the student's own answers are trained on the divergence alone: their cross-entropy would sharpen it
        own = KdSettings(o.divergence, o.beta, t.kd.temperature, 0.0)
        attach_response_loss(causal_lm_of(model), t.loss_chunk_size, settings, own)
        samples = stage_dir(cfg, "train") / "samples.jsonl"
        rollouts = Rollouts(cfg, tokenizer, aligner, stored, process, device, causal_lm_of(model).dtype, samples)
        inner = KdCollator(pad_id, aligner) if stored else Collator(pad_id)
        return RolloutCollator(inner), coverage, rollouts
    attach_response_loss(causal_lm_of(model), t.loss_chunk_size, settings)
    return KdCollator(pad_id, aligner, t.packing), coverage, None


def load_student(cfg: PipelineConfig, backend: str, bf16: bool, recompute: bool) -> tuple[Any, Any]:
    """The student with adapters (or fully trainable) and its tokenizer; `recompute`: gradient checkpointing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = cfg.train
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            # explicit dtype: left to itself Unsloth picks fp16 on pre-Ampere GPUs, which overflows Gemma 3
            model_name=cfg.models.student,
            max_seq_length=t.max_length,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            load_in_4bit=False,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=t.lora.r,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules=t.lora.target_modules,
            bias="none",
            random_state=cfg.train_seed,
            use_gradient_checkpointing="unsloth" if recompute else False,
        )
        return model, tokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    # Gemma 3 overflows in fp16; bf16 where the hardware has it, else fp32.
    model = AutoModelForCausalLM.from_pretrained(
        cfg.models.student, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=attention_kernel(cfg)
    )
    if t.method == "full":
        return model, tokenizer
    from peft import get_peft_model

    return get_peft_model(model, lora_config(t)), tokenizer


def lora_config(t: TrainConfig) -> Any:
    """train.lora as peft's config (the benchmarks hand the same one to TRL)."""
    from peft import LoraConfig

    return LoraConfig(
        r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout,
        target_modules=t.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attention_kernel(cfg: PipelineConfig) -> str | None:
    """train.attention, where auto is resolved; None leaves transformers' default."""
    import torch

    if cfg.train.attention != "auto":
        return cfg.train.attention
    # sdpa and eager take a packed row's boundaries as a dense mask and compute attention across the whole row
    return "flex_attention" if cfg.train.packing and torch.cuda.is_available() else None


def check_packing(model: Any, device: Any) -> None:
    """Fail before training if the student's attention lets packed examples see each other: two short examples
    run packed must give the second the hidden states it has alone. Architectures that build their own causal
    mask, ignoring where position ids restart, fail here instead of training on a corrupted context."""
    import torch

    lm = causal_lm_of(model)
    decoder = getattr(lm, lm.base_model_prefix)
    vocab = lm.config.get_text_config().vocab_size
    first, second = [(7 + 13 * i) % vocab for i in range(5)], [(11 + 17 * i) % vocab for i in range(7)]
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([second], device=device), use_cache=False).last_hidden_state[0]
            packed = decoder(
                input_ids=torch.tensor([first + second], device=device),
                position_ids=torch.tensor([[*range(5), *range(7)]], device=device),
                use_cache=False,
            ).last_hidden_state[0, 5:]
    finally:
        model.train(was_training)
    gap = float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6))
    # bf16 kernels differ by rounding; an example that sees another's tokens differs by the size of the states
    if gap > (0.05 if alone.dtype == torch.bfloat16 else 1e-3):
        raise DistillError(
            f"train.packing: {lm.config.model_type} with {lm.config._attn_implementation} attention lets packed "
            f"examples see each other (hidden states differ by {gap:.2g} of their size); set train.packing=false"
        )


def causal_lm_of(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (its trainer_state.json is written last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def make_callbacks(model: Any, log_path: Path, planned_steps: int) -> list[Any]:
    import torch
    from transformers import TrainerCallback

    from distill.loss import NonFiniteLoss

    class StepLog(TrainerCallback):
        """Checks the Trainer's step count against the plan, stops on non-finite gradients, writes log.jsonl."""

        def __init__(self) -> None:
            self.last = (time.perf_counter(), 0)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.max_steps != planned_steps:
                raise DistillError(
                    f"train: the Trainer plans {state.max_steps} steps but `distill plan` computes {planned_steps}; "
                    "the step formula in distill/plan.py and the Trainer disagree"
                )
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            grads = [p.grad.detach().norm() for p in model.parameters() if p.requires_grad and p.grad is not None]
            if grads and not bool(torch.isfinite(torch.stack(grads)).all()):
                raise NonFiniteLoss("non-finite gradients")

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            # the Trainer's token count is summed over all data-parallel processes and survives a resume
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            entry = {
                "step": state.global_step,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": round((seen - self.last[1]) / max(now - self.last[0], 1e-9), 1),
            }
            self.last = (now, seen)
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    return [StepLog()]


def plot_loss(log_path: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def training_args(cfg: PipelineConfig, backend: str, bf16: bool, recompute: bool, output_dir: Path) -> Any:
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=bf16,
        gradient_checkpointing=recompute and backend != "unsloth",  # Unsloth brings its own
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        logging_steps=t.logging_steps,
        seed=cfg.train_seed,
        data_seed=cfg.train_seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    folder = stage_dir(cfg, "train")
    checkpoints = folder / "checkpoints"
    log_path = folder / "log.jsonl"
    require_inputs(cfg, "train")  # before the imports below: a missing input is told at once
    from transformers import Trainer, set_seed

    from distill.plan import build_plan, train_steps

    t = cfg.train
    backend = choose_backend(cfg)
    bf16 = use_bf16(cfg)
    plan = build_plan(cfg)
    # The Trainer's arguments set up data parallelism (under torchrun / accelerate launch every process
    # runs this function); only the main process may clear or claim the folder and build models.
    args = training_args(cfg, backend, bf16, plan["gradient_checkpointing"], checkpoints)
    main = args.process_index == 0
    with args.main_process_first(local=False, desc="preparing the train folder"):
        record = open_stage(cfg, "train", overwrite and main)
        if record is not None:
            ensure_models(cfg)
    if record is None:
        return folder
    set_seed(cfg.train_seed)
    rows = load_dataset_split(cfg)
    stored = check_distribution(cfg, rows) if t.objective != "sft" else False
    model, tokenizer = load_student(cfg, backend, bf16, plan["gradient_checkpointing"])
    dataset, truncated, skipped = tokenize(cfg, tokenizer, rows)
    if truncated:
        log.warning(
            "%d of %d examples are longer than train.max_length=%d; their answers were cut at the end",
            truncated,
            len(dataset),
            t.max_length,
        )
    if skipped:
        log.warning(
            "%d of %d examples left out: their prompt alone fills train.max_length=%d (%s%s); raise it to train them",
            len(skipped),
            len(rows),
            t.max_length,
            ", ".join(skipped[:3]),
            ", ..." if len(skipped) > 3 else "",
        )
    if t.packing:
        check_packing(model, args.device)
    check_plan(plan, model)
    steps = train_steps(len(dataset), cfg, world_size=args.world_size)
    if len(rows) != plan["examples"]:
        log.warning("train split has %d examples, the plan counted %d", len(rows), plan["examples"])
    if t.objective == "on_policy" and t.on_policy.start_step >= steps:
        log.warning(
            "train.on_policy.start_step=%d is not below this run's %d steps: the student's own answers are never drawn",
            t.on_policy.start_step,
            steps,
        )
    log.info(
        "%s backend, %s, %d process(es), %d examples, %d steps, %s trainable parameters",
        backend,
        "bf16" if bf16 else "fp32",
        args.world_size,
        len(dataset),
        steps,
        f"{plan['trainable_params']:,}",
    )

    collator, coverage, rollouts = attach_objective(
        cfg, model, tokenizer, dataset, stored, args.process_index, args.device
    )
    callbacks = make_callbacks(model, log_path, steps)
    if t.optim == "adamw_8bit":
        _forget_earlier_optimizer_overrides()
    trainer_type = Trainer
    if rollouts is not None:
        from distill.on_policy import trainer_class

        trainer_type = trainer_class()
        callbacks.append(rollouts.callback())
    trainer = trainer_type(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
    if rollouts is not None:
        trainer.rollouts = rollouts
    resume = last_checkpoint(checkpoints)
    if rollouts is not None and resume is not None:
        rollouts.restore(resume)
    samples = rollouts.samples if rollouts is not None else None  # the main process's on-policy answers
    if main:
        if resume is None:
            log_path.unlink(missing_ok=True)
            if samples is not None:
                samples.write_text("")
        else:
            log.info("resuming from %s", resume)
            _trim_log(log_path, int(resume.name.split("-")[1]))
            if samples is not None:
                _trim_log(samples, int(resume.name.split("-")[1]))
    # read now: the checkpoint we resume from is rotated away (save_total_limit) during training
    tokens_before = resume_tokens(resume) if resume else 0
    try:
        wall = _train(trainer, resume, checkpoints)
    finally:
        if rollouts is not None:
            rollouts.close()
    on_policy = rollouts.summary() if rollouts is not None else None
    if not main:
        return folder

    out_name = "adapter" if t.method == "lora" else "model"
    _save(trainer.model, tokenizer, folder / out_name)
    plot_loss(log_path, folder / "loss.png")
    entries = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    setup = {
        "backend": backend,
        "bf16": bf16,
        "examples": len(dataset),
        "truncated": truncated,
        "skipped": len(skipped),
        "steps": steps,
    }
    record.metrics = train_metrics(cfg, trainer, setup, plan, coverage, entries, wall, tokens_before, resume)
    if on_policy is not None:
        record.metrics["on_policy"] = on_policy
    record.files = {out_name: out_name, "log": "log.jsonl", "loss_plot": "loss.png", "checkpoints": "checkpoints"}
    if samples is not None:
        record.files["samples"] = samples.name
    return record.finish()


def train_metrics(
    cfg: PipelineConfig,
    trainer: Any,
    setup: dict[str, Any],
    plan: dict[str, Any],
    coverage: dict[str, Any] | None,
    entries: list[dict[str, Any]],
    wall: float,
    tokens_before: int,
    resume: Path | None,
) -> dict[str, Any]:
    """What the manifest records of a finished training: the set-up, the plan it matched, speed and memory."""
    t, state, world = cfg.train, trainer.state, trainer.args.world_size
    return {
        "objective": t.objective,
        **({"kd": {**t.kd.model_dump(), "coverage": coverage}} if coverage else {}),
        "backend": setup["backend"],
        "precision": "bf16" if setup["bf16"] else "fp32",
        "optimizer": optimizer_name(trainer.optimizer),
        "attention": causal_lm_of(trainer.model).config._attn_implementation,
        "packing": t.packing,
        "gradient_checkpointing": plan["gradient_checkpointing"],
        "processes": world,
        "examples": setup["examples"],
        "truncated": setup["truncated"],
        "skipped_too_long": setup["skipped"],
        "steps": state.global_step,
        "planned_steps": setup["steps"],
        "plan_steps": plan["steps"],
        "trainable_params": plan["trainable_params"],
        "plan_trainable_params": plan["trainable_params"],
        "all_params": sum(p.numel() for p in trainer.model.parameters()),
        "plan_all_params": plan["all_params"],
        "final_loss": entries[-1]["loss"] if entries else None,
        "train_tokens": state.num_input_tokens_seen,
        "tokens_per_s": round((state.num_input_tokens_seen - tokens_before) / wall, 1),
        "samples_per_s": round(trainer.data_collator.samples_seen * world / wall, 3),
        "wall_s": round(wall, 2),
        **peak_memory(),
        "resumed_from": resume.name if resume else None,
    }


def check_plan(plan: dict[str, Any], model: Any) -> None:
    """`distill plan` and the trainer must agree: same parameter count, same step formula."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != plan["trainable_params"]:
        raise DistillError(
            f"train: {trainable:,} trainable parameters but `distill plan` computed {plan['trainable_params']:,}"
        )


def _train(trainer: Any, resume: Path | None, checkpoints: Path) -> float:
    """Seconds of training; a non-finite loss stops it with the step and the last good checkpoint."""
    from distill.loss import NonFiniteLoss

    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteLoss as exc:
        good = last_checkpoint(checkpoints)
        raise DistillError(
            f"train: {exc} at step {trainer.state.global_step + 1}; the last good checkpoint is "
            f"{good or 'none (nothing saved yet)'}. fp16 overflows Gemma 3: use train.precision=bf16 or fp32, "
            "or lower train.lr"
        ) from None
    return time.perf_counter() - started


def peak_memory() -> dict[str, float]:
    import torch

    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def resume_tokens(checkpoint: Path) -> int:
    """Tokens the run had seen when this checkpoint was written (the Trainer keeps counting from there)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def _forget_earlier_optimizer_overrides() -> None:
    """bitsandbytes keeps the Trainer's "embeddings in 32-bit" overrides in a process-wide singleton keyed by
    parameter position: a second training in the same process (a notebook, a sweep) would otherwise keep this
    model's tensors at those positions in 32-bit state."""
    from bitsandbytes.optim import GlobalOptimManager

    GlobalOptimManager.get_instance().initialize()


def optimizer_name(optimizer: Any) -> str:
    """The class doing the updates, under accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return f"{type(inner).__module__}.{type(inner).__name__}"


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log (or sample) lines past the checkpoint we resume from; those steps are redone."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))


def _save(model: Any, tokenizer: Any, target: Path) -> None:
    """Write into a temp folder and rename, so a crash never leaves a half-saved model behind."""
    model.config.use_cache = True  # the Trainer switched the KV cache off for training; this model is for inference
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
