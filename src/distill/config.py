"""Typed configuration: `PipelineConfig` is the run's own settings plus one section per stage, each the model the
stage registry names.

Precedence is defaults < YAML file < dotted `key.sub=value` overrides. Every problem is collected
and reported at once, each naming its YAML path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from distill.errors import ConfigError
from distill.stages import STAGES, resolve, sections
from distill.teachers import BACKENDS
from distill.variants import VARIANTS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelSpec(Strict):
    """Shape of one tiny random model built locally (no hub)."""

    hidden_size: int = Field(128, gt=0, description="Hidden size.")
    num_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (GQA).")
    head_dim: int = Field(32, ge=32, description="Per-head size; vLLM's CPU attention needs >= 32.")
    intermediate_size: int = Field(384, gt=0, description="MLP inner size.")
    max_position_embeddings: int = Field(4096, gt=0, description="Longest position the model supports.")
    sliding_window: int = Field(
        512, gt=0, description="Span of a Gemma student's local-attention layers (Gemma 3: 512; 5 of every 6 layers)."
    )


class TinyModelsConfig(Strict):
    """Tiny teacher/student built by `distill tiny-models`, with a tokenizer trained on task text."""

    seed: int = Field(0, description="Seed for weights and tokenizer corpus.")
    vocab_size: int = Field(4096, ge=512, description="Tokenizer vocabulary size, specials included.")
    corpus_size: int = Field(300, gt=0, description="Task instances rendered to train the tokenizers.")
    student_arch: Literal["gemma3", "gpt2", "qwen3"] = Field(
        "gemma3",
        description="Student architecture: gemma3 (SentencePiece tokenizer) or gpt2 (the compact variant, sharing "
        "the teacher's byte-level BPE task tokenizer), or qwen3 (the teacher's own architecture, to train a teacher).",
    )
    student_tokenizer: Literal["own", "teacher"] = Field(
        "own",
        description="A gemma3 student's tokenizer: its own SentencePiece one, or the teacher's (a same-tokenizer pair "
        "for distillation); gpt2 and qwen3 students always share the teacher's.",
    )
    teacher: TinyModelSpec = Field(default_factory=TinyModelSpec, description="Tiny Qwen3 teacher shape.")
    student: TinyModelSpec = Field(
        default_factory=lambda: TinyModelSpec(num_layers=4, num_kv_heads=1, intermediate_size=512),
        description="Tiny student shape (for gpt2: hidden_size = n_embd, num_heads = n_head; kv heads and head_dim unused).",
    )


class ModelsConfig(Strict):
    """Where the teacher and student come from."""

    teacher: str = Field(description="Teacher model: a local folder, or a hub id on machines with hub access.")
    student: str = Field(description="Student base model: a local folder, or a hub id.")
    student_arch: Path | None = Field(
        None,
        description="Architecture-only config.json of the student (no weights), used by `distill plan` "
        "when `student` is not a local folder.",
    )
    teacher_arch: Path | None = Field(None, description="Architecture-only config.json of the teacher.")
    tiny: TinyModelsConfig | None = Field(
        None,
        description="If set, `teacher`/`student` folders are built locally with these settings when missing.",
    )


class CrewTaskConfig(Strict):
    """The flagship pack: crew profile + last workouts + catalog -> next workouts."""

    kind: Literal["crew"] = Field("crew", description="Task pack: crew, jsonl (your data) or python (your class).")
    language: Literal["en", "ru"] = Field("en", description="Language of prompts and programs.")
    catalog: Path | None = Field(None, description="Exercise catalog JSON; default: the one shipped with the pack.")
    catalog_mode: Literal["available", "full", "allowed"] = Field(
        "available",
        description="'full' lists the whole catalog in the prompt, 'available' only usable equipment, 'allowed' "
        "only what the profile may do (equipment, level, contraindications) as id and group: prompts ~40% shorter.",
    )
    history_len: int = Field(5, ge=1, le=10, description="Logged workouts shown in each prompt.")
    request_ask: str | None = Field(
        None, description="Self-Instruct: what the teacher is asked, with {examples}; default: the pack's crew wording."
    )
    request_template: str | None = Field(
        None, description="Self-Instruct: how a request joins a prompt, with {request}; default: per language."
    )


class JsonlTaskConfig(Strict):
    """Your own task from JSONL files, configured here alone: prompt template, split, validators, gold answers."""

    kind: Literal["jsonl"] = Field(description="Task pack: crew, jsonl (your data) or python (your class).")
    name: str = Field("jsonl", description="The task's name in reports.")
    unit: str = Field("answer", description="What one answer is called in reports, e.g. 'record'.")
    files: list[Path] = Field(min_length=1, description="JSONL files of inputs, one JSON object per line.")
    prompt_template: str | None = Field(
        None, description="The prompt, with {field} placeholders filled from each row (or use prompt_field)."
    )
    prompt_field: str | None = Field(None, description="A column that holds the whole prompt.")
    id_field: str | None = Field(None, description="A column with a stable id per row; default: split and index.")
    split_field: str | None = Field(
        None, description="A column saying train, validation or test; otherwise split by a hash of group_field."
    )
    group_field: str | None = Field(
        None, description="Rows sharing this column's value stay in one split (held-out isolation)."
    )
    validation_share: float = Field(0.1, ge=0, lt=1, description="Share of groups hashed into validation.")
    test_share: float = Field(0.1, ge=0, lt=1, description="Share of groups hashed into test.")
    reference_field: str | None = Field(
        None, description="A column with the gold answer: the `reference` teacher, exact/per-field agreement in eval."
    )
    json_schema: Path | None = Field(None, description="JSON Schema file every answer must satisfy (as JSON).")
    regex: str | None = Field(None, description="A regular expression every answer must fully match.")
    choices: list[str] | None = Field(None, description="The allowed answers, one of which must be given exactly.")


class PythonTaskConfig(Strict):
    """Your own implementation of the task interface, for checks no schema can express."""

    kind: Literal["python"] = Field(description="Task pack: crew, jsonl (your data) or python (your class).")
    factory: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:factory importable from the current folder or PYTHONPATH; called as factory(options, seed).",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the factory as its first argument.")


TaskConfig = Annotated[CrewTaskConfig | JsonlTaskConfig | PythonTaskConfig, Field(discriminator="kind")]
TASK_CONFIGS = {"crew": CrewTaskConfig, "jsonl": JsonlTaskConfig, "python": PythonTaskConfig}


class SamplingConfig(Strict):
    """Teacher sampling; defaults are Qwen3's recommended non-thinking settings."""

    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.8, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(20, ge=-1, description="Top-k (-1 = off).")
    max_tokens: int = Field(1024, gt=0, description="Longest response in tokens.")
    enable_thinking: bool = Field(False, description="Qwen3 thinking mode; off for data generation.")


class VllmConfig(Strict):
    """Knobs of the offline vLLM engine."""

    dtype: str = Field("auto", description="Weights dtype (float32 on CPU; bfloat16 on Ampere+ GPUs).")
    max_model_len: int = Field(8192, gt=0, description="Context length of the engine.")
    max_num_seqs: int = Field(256, gt=0, description="Sequences batched at once.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share (CUDA only).")
    cpu_kvcache_gb: int = Field(4, gt=0, description="KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica.")
    data_parallel_size: int = Field(1, ge=1, description="Model replicas.")
    enforce_eager: bool = Field(False, description="Skip graph capture: faster start, slower decode.")


class OpenAIConfig(Strict):
    """An OpenAI-compatible endpoint used as the teacher."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Endpoint base URL.")
    model: str | None = Field(None, description="Served model name; default: models.teacher.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(120, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Retries with exponential backoff per request.")
    grammar_field: Literal["structured_outputs", "grammar"] = Field(
        "structured_outputs",
        description="Where a GBNF grammar goes in the request: vLLM's structured_outputs or llama-server's grammar "
        "(a grammar made from a JSON Schema always goes as response_format).",
    )


class RayConfig(Strict):
    """Teacher replicas on a Ray cluster (generate.engine: ray)."""

    address: str | None = Field(
        None,
        description="host:port of a running cluster (`ray start --head`); default: a local Ray inside the command.",
    )
    actors: int = Field(2, ge=1, description="Teacher replicas; each batch is split between them.")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs each replica reserves (its torch threads).")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs each replica reserves (1 for a vLLM teacher on GPUs).")
    max_restarts: int = Field(
        3, ge=0, description="Times a replica that dies is restarted and its share of the batch sent again."
    )


class SelfInstructConfig(Strict):
    """Optional Self-Instruct bootstrapping of free-form requests (needs a language-model teacher and a pack with templates)."""

    enabled: bool = Field(False, description="Let the teacher bootstrap free-form requests that prompts then carry.")
    seed_tasks: Path | None = Field(None, description="Seed requests JSONL; default: the task pack's own.")
    num_requests: int = Field(100, ge=1, description="New requests to add to the seed pool.")
    in_context: int = Field(8, ge=1, description="Requests shown to the teacher per new one (k).")
    rouge_l_max: float = Field(
        0.7, gt=0, le=1, description="Keep a request only if its ROUGE-L to every other is below this."
    )


def _count_or_all(minimum: int) -> Any:
    """A whole number >= minimum, or `all`; one error message for both, naming both."""

    def parse(value: Any) -> int | str:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            return value
        raise ValueError(f"expected a whole number >= {minimum}, or all (every usable input that passes)")

    return Annotated[
        int | str, PlainValidator(parse), WithJsonSchema({"anyOf": [{"type": "integer"}, {"const": "all"}]})
    ]


ExampleCount = _count_or_all(1)
HeldOutCount = _count_or_all(0)


SPLIT_KEYS = {  # the setting that sizes each split
    "train": "generate.num_examples",
    "validation": "generate.validation_examples",
    "test": "generate.test_examples",
}


class GenerateConfig(Strict):
    """Stage 1: the teacher writes the training data."""

    engine: Literal["local", "ray"] = Field(
        "local", description="Where the teacher runs: in this process, or as replicas on a Ray cluster (generate.ray)."
    )
    backend: Literal[tuple(BACKENDS)] = Field(  # type: ignore[valid-type]
        "vllm",
        description="Teacher backend: " + "; ".join(f"`{b.name}`: {b.summary}" for b in BACKENDS.values()) + ".",
    )
    num_examples: ExampleCount = Field(
        1000, description="Accepted training examples to produce; `all`: every usable input whose answer passes."
    )
    validation_examples: HeldOutCount = Field(
        50, description="Held-out validation examples (groups never trained on); `all` as for num_examples."
    )
    test_examples: HeldOutCount = Field(
        50, description="Held-out test examples (groups never trained on); `all` as for num_examples."
    )
    batch_size: int = Field(64, ge=1, description="Prompts per teacher call; output is flushed per batch.")
    max_attempts_factor: float = Field(3.0, ge=1, description="Give up after this many prompts per requested example.")
    dedup: Literal["auto", "answer", "input", "both", "none"] = Field(
        "auto",
        description="What near-duplicate filtering compares: answers, inputs, both (an example repeated: its input "
        "and its answer like one accepted example's), or none; auto = the task's default (crew: answers; jsonl: "
        "both). Reference answers are never compared on their own.",
    )
    dedup_jaccard: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Near-duplicate: word-trigram Jaccard similarity (MinHash) to an accepted example's reaches this.",
    )
    grammar: bool = Field(
        False, description="Decode the teacher under the task's output grammar, so fewer answers are rejected for form."
    )
    logprobs: int = Field(
        0,
        ge=0,
        le=100,
        description="Keep the teacher's k most likely next tokens and their log-probabilities at every generated "
        "token (what train.objective=kd distils); 0 = text only. OpenAI-compatible servers allow at most 20.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Teacher sampling.")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="vLLM engine settings.")
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig, description="OpenAI-compatible endpoint.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster and teacher replicas.")
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig, description="Self-Instruct requests.")


class LoraConfig(Strict):
    """LoRA adapter shape."""

    r: int = Field(128, ge=1, description="Rank.")
    alpha: int = Field(128, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters.",
    )


class KdConfig(Strict):
    """How train.objective=kd distils the teacher's top-k distribution (captured with generate.logprobs)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="KL(teacher||student) (mass-covering), KL(student||teacher) (mode-seeking), or the generalised "
        "Jensen-Shannon divergence with `beta`.",
    )
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher: M = beta*P + (1-beta)*Q.")
    temperature: float = Field(1.0, gt=0, description="Softens teacher and student alike; the loss is scaled by T^2.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the ordinary response cross-entropy; 1 - alpha goes to the divergence."
    )
    align: bool = Field(
        True,
        description="Teacher and student tokenizers differ: align their tokens by the text they spell. Off, a "
        "different-tokenizer pair is an error.",
    )
    unmapped: Literal["uld", "skip"] = Field(
        "uld",
        description="A position where the teacher's token is not the student's (other segmentation): the "
        "vocabulary-free sorted-probability distance (ULD), or cross-entropy only.",
    )


class OnPolicyTeacherConfig(Strict):
    """Where the teacher that judges the student's own answers runs (train.objective=on_policy)."""

    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        description="transformers: models.teacher in the training process; openai: a vLLM server's /v1/completions "
        "with prompt_logprobs (one GPU holds the teacher for many students).",
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="The vLLM server (backend openai).")
    model: str | None = Field(None, description="Served model name; default: models.teacher.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    timeout_s: float = Field(120, gt=0, description="Per-request timeout in seconds.")


class OnPolicyConfig(Strict):
    """train.objective=on_policy: a share of micro-batches are the student's own answers, scored by the teacher."""

    lmbda: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of micro-batches whose answers the current student samples (the rest: the stored "
        "teacher answers, distilled as train.objective=kd does).",
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "reverse_kl",
        description="Divergence on the student's own answers: reverse KL is mode-seeking, it pushes the student off "
        "tokens the teacher finds unlikely on the very paths the student takes.",
    )
    start_step: int = Field(
        0,
        ge=0,
        description="Optimizer steps trained on the stored answers alone before the student's own are drawn: a "
        "student that still writes noise gives the teacher nothing worth judging (GKD starts from a fine-tuned "
        "student).",
    )
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher (divergence jsd).")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature (no top-k/top-p).")
    max_new_tokens: int = Field(512, ge=1, description="Longest sampled answer (also bounded by train.max_length).")
    sampler: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What draws the student's answers: transformers' generate on the model being trained, or a "
        "vLLM engine in the training process that gets the trained weights before each draw (faster decoding; "
        "its memory comes on top of training's).",
    )
    vllm_memory: float = Field(
        0.2,
        gt=0,
        le=0.9,
        description="sampler=vllm on a GPU: the engine's share of its memory (weights and KV cache), on top of "
        "training's (on CPU the engine keeps a 1 GiB KV cache).",
    )
    grammar: bool = Field(
        True,
        description="Sample under each input's grammar and score the teacher under it too (its distribution "
        "after the grammar's mask, as generate.grammar stores it); false: both free.",
    )
    teacher: OnPolicyTeacherConfig = Field(default_factory=OnPolicyTeacherConfig, description="The scoring teacher.")


class TrainConfig(Strict):
    """Stage 2: label-masked LoRA SFT of the student."""

    backend: Literal["auto", "transformers", "unsloth"] = Field(
        "auto", description="auto = Unsloth on CUDA when installed, else transformers + peft."
    )
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning.")
    objective: Literal["sft", "kd", "on_policy"] = Field(
        "sft",
        description="sft: cross-entropy on the teacher's text; kd: also the teacher's distribution (train.kd), "
        "captured by generate.logprobs; on_policy: also the teacher's judgement of the student's own answers "
        "(train.on_policy).",
    )
    kd: KdConfig = Field(default_factory=KdConfig, description="Distillation of the teacher's distribution.")
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="Distillation on the student's own answers."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    optim: Literal["adamw_8bit", "adamw_torch"] = Field("adamw_8bit", description="Optimizer.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(2, ge=1, description="Gradient accumulation steps.")
    seed: int | None = Field(
        None,
        ge=0,
        description="Training's own seed (data order, adapter init, on-policy draws); default: the run's seed. "
        "Vary it to measure training's spread over seeds on the same data, without generating it again.",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(4096, ge=16, description="Longest tokenized example; longer ones are truncated.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 where the hardware supports it, else fp32 (fp16 overflows Gemma 3)."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory. auto = on CPU always; on CUDA "
        "only when `distill plan` estimates that keeping them would fill more than half the card.",
    )
    loss_chunk_size: int = Field(1024, ge=1, description="Response positions per cross-entropy chunk.")
    group_by_length: bool = Field(True, description="Batch similar lengths together to cut padding.")
    packing: bool = Field(
        False,
        description="Padding-free batches: a micro-batch's examples in one row, each attending only to itself "
        "(position ids restart per example). Same loss and gradients; no padding computed.",
    )
    attention: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto",
        description="The student's attention kernel in training. auto = flex_attention for packed batches on CUDA "
        "(it skips the blocks between examples), else transformers' default.",
    )
    save_steps: int = Field(200, ge=1, description="Checkpoint every N optimizer steps.")
    logging_steps: int = Field(10, ge=1, description="Log every N optimizer steps.")


class MergeConfig(Strict):
    """Stage 3: fold the adapter into the base model."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Saved dtype.")
    check_prompts: int = Field(4, ge=1, description="Validation prompts for the logits-equality check.")
    tolerance: float = Field(1e-3, gt=0, description="Max abs logits diff allowed (in float32 comparison).")


class PruneConfig(Strict):
    """Compact variant: L1-unstructured pruning of the trained student, made permanent."""

    enabled: bool = Field(False, description="Prune after merge (the compact CPU variant); off for the LoRA pipeline.")
    amount: float = Field(
        0.4, gt=0, lt=1, description="Fraction of each Linear/Conv1D weight zeroed, smallest |w| first."
    )


class ExportConfig(Strict):
    """Stage 4: GGUF (or torch int8) export, verified against the merged model."""

    format: Literal["q8_0", "f16", "f32"] = Field("q8_0", description="GGUF tensor format for matrices.")
    torch_int8: bool = Field(
        False, description="Also write a dynamic int8 copy (torchao, Linear layers) for CPU inference."
    )
    check_prompts: int = Field(4, ge=1, description="Validation prompts for the agreement check.")
    min_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="Required next-token top-1 agreement (GGUF and torch int8)."
    )
    max_abs_logit_diff: float = Field(
        1.0,
        gt=0,
        description="Allowed max abs next-token logit difference vs the float model (Q8_0 and int8 rounding show here).",
    )


class ServeConfig(Strict):
    """Stage 5: the paper's n = floor(V_GPU / (V_small + V_batch)) processes against one server with N slots."""

    backend: Literal["llama_cpp", "vllm"] = Field(
        "llama_cpp", description="Server per instance; vLLM needs bf16 (compute capability >= 8.0) for Gemma 3."
    )
    gpu_profile: str = Field(
        "rtx2060-6gb",
        description="GPU whose memory is the budget V_GPU: rtx2060-6gb, rtx3060-12gb, t4-16gb, l4-24gb, a10-24gb, "
        "a100-40gb, a100-80gb, h100-80gb.",
    )
    v_gpu_mb: float | None = Field(None, gt=0, description="Explicit V_GPU in MiB (overrides gpu_profile).")
    v_small_mb: float | None = Field(None, gt=0, description="Override one instance's resident footprint (MiB).")
    v_batch_mb: float | None = Field(None, gt=0, description="Override one instance's batch memory (MiB).")
    runtime_overhead_mb: float = Field(
        300,
        ge=0,
        description="Per-process fixed cost added to the model size when V_small is estimated (CUDA context).",
    )
    context: int = Field(4096, ge=64, description="Context length per sequence.")
    parallel: int = Field(1, ge=1, description="Sequences each instance serves at once.")
    ubatch: int = Field(512, ge=1, description="llama.cpp physical batch; sizes the compute buffer.")
    threads_per_instance: int = Field(1, ge=1, description="CPU threads per llama.cpp instance.")
    max_instances: int | None = Field(None, ge=1, description="Cap on processes of the paper's fleet started here.")
    max_slots: int | None = Field(None, ge=1, description="Cap on slots of the one-server fleet started here.")
    llama_server: str | None = Field(
        None, description="llama-server binary; default: the one `make setup` builds, else llama-server on PATH."
    )
    slo_ms: float = Field(
        1000, gt=0, description="Latency target: a request counts toward goodput when it ends within this many ms."
    )
    concurrency: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        min_length=1,
        description="Concurrent users swept over each fleet; capacity is the most of them served within the SLO.",
    )
    base_port: int | None = Field(
        None, ge=1024, le=65535, description="First port of the instances; default: free ports chosen by the OS."
    )
    requests: int = Field(32, ge=1, description="Held-out prompts sent per concurrency level (at least one per user).")
    grammar: bool = Field(
        True, description="Send each request with its input's output grammar, and the same load free beside it."
    )
    max_tokens: int = Field(512, ge=1, description="Longest generated answer in tokens.")
    ready_timeout_s: float = Field(120, gt=0, description="Seconds to wait for an instance to be ready.")
    request_timeout_s: float = Field(600, gt=0, description="Seconds to wait for one answer.")


class EvalConfig(Strict):
    """Held-out quality of any stage's model."""

    models: list[Literal[tuple(VARIANTS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["teacher", "base", "merged", "gguf"],
        description="Models `distill run` evaluates, in order (`distill eval --model` picks one).",
    )
    num_prompts: int = Field(50, ge=1, description="Held-out test prompts scored per model.")
    max_new_tokens: int = Field(512, ge=1, description="Longest generated answer in tokens.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    grammar: bool = Field(
        True,
        description="Also decode every model under the task's output grammar, beside free decoding (packs with one).",
    )


class CardConfig(Strict):
    """The model card written beside the exported student (README.md); no stage's output depends on it."""

    license: str = Field(
        "other",
        description="Licence id in the card's metadata: the student's base model's (gemma for Gemma 3, apache-2.0 "
        "for Qwen3); other when unknown.",
    )
    base_model: str | None = Field(
        None,
        description="Hub id of the student's starting checkpoint for the card's base_model; default: models.student "
        "when that is a Hub id (owner/name) rather than a local folder.",
    )


class RunConfig(Strict):
    """What a run has besides its stages' sections: names, models, the task."""

    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run folder name under run_dir.")
    run_dir: Path = Field(Path("runs"), description="Parent folder of all runs.")
    seed: int = Field(0, description="Global seed.")
    models: ModelsConfig = Field(description="Teacher and student.")
    task: TaskConfig = Field(default_factory=CrewTaskConfig, description="The task pack and its settings.")

    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _crew_by_default(cls, data: Any) -> Any:
        # configs written before task packs existed have no task.kind: they meant the crew task
        if isinstance(data, dict) and isinstance(data.get("task"), dict) and "kind" not in data["task"]:
            data = {**data, "task": {**data["task"], "kind": "crew"}}
        return data

    _overrides: list[str] = PrivateAttr(default_factory=list)

    @property
    def run_path(self) -> Path:
        return self.run_dir / self.run_name

    @property
    def command_args(self) -> str:
        """How to repeat this config on the command line, for error messages."""
        parts = [str(self._source) if self._source else "CONFIG", *self._overrides]
        return " ".join(parts)

    @property
    def train_seed(self) -> int:
        """What seeds training: train.seed where set, else the run's seed."""
        return self.seed if self.train.seed is None else self.train.seed

    def stage_fingerprint(self, stage: str) -> str:
        """Hash of the settings a stage's output depends on; a change means the output is stale."""
        data = self.model_dump(mode="json")
        subset = {k: data[k] for k in ("seed", "models", "task", *sections(stage))}
        subset.get("eval", {}).pop("models", None)  # which models to evaluate does not change any result
        # nor where the teacher runs (a run started here may continue on Ray), nor how many attempts it may take
        # (raising the budget after a shortfall continues the same run)
        for key in ("engine", "ray", "max_attempts_factor"):
            subset.get("generate", {}).pop(key, None)
        # nor how training lays out its batches or which attention kernel runs: the same learning either way
        for key in ("packing", "attention"):
            subset.get("train", {}).pop(key, None)
        return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


def _sections() -> dict[str, Any]:
    """One section per stage, as the stage registry names its model, in pipeline order; then the card."""
    fields: dict[str, Any] = {}
    for stage in STAGES.values():
        model = resolve(stage.config)
        fields[stage.name] = (model, Field(default_factory=model, description=stage.summary))
    fields["card"] = (CardConfig, Field(default_factory=CardConfig, description="The card beside the student."))
    return fields


PipelineConfig = create_model(
    "PipelineConfig",
    __base__=RunConfig,
    __doc__="A whole run: names, models, the task, one section per stage, the model card.",
    __module__=__name__,
    **_sections(),
)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _untag(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str | None]:
    """pydantic puts the task kind into the path (`task.jsonl.files`); users wrote `task.files`."""
    if len(loc) > 1 and loc[0] == "task" and loc[1] in TASK_CONFIGS:
        return ("task", *loc[2:]), str(loc[1])
    return loc, None


def _model_at(loc: tuple[Any, ...], kind: str | None = None) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (to suggest valid keys)."""
    if loc[:1] == ("task",):
        model: type[BaseModel] = TASK_CONFIGS[kind or "crew"]
        loc = loc[1:]
    else:
        model = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _error_loc(err: dict[str, Any]) -> tuple[tuple[Any, ...], str | None]:
    loc, kind = _untag(tuple(err["loc"]))
    if err["type"] == "union_tag_invalid":  # the bad value is the task kind itself
        loc = (*loc, "kind")
    return loc, kind


def _format_error(err: dict[str, Any]) -> str:
    loc, kind = _error_loc(err)
    key = ".".join(str(p) for p in loc)
    value = err.get("input")
    if err["type"] == "union_tag_invalid":
        return f"{key}: got {json.dumps(err['ctx']['tag'])}; use one of {', '.join(TASK_CONFIGS)}"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1], kind)
        options = sorted(owner.model_fields) if owner else []
        return f"{key}: unknown key{_closest(str(loc[-1]), options)}; valid keys here: {', '.join(options)}"
    if err["type"] == "missing":
        owner = _model_at(loc[:-1], kind)
        field = owner.model_fields.get(str(loc[-1])) if owner else None
        hint = f" ({field.description})" if field and field.description else ""
        return f"{key}: required key is missing{hint}"
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    msg = err["msg"].removeprefix("Value error, ")  # a validator's own message, as written
    return f"{key}: got {shown}; {msg[0].lower()}{msg[1:]}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read YAML, apply `key.sub=value` overrides, validate. Raises ConfigError with every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found; pass a YAML file such as configs/tiny.yaml"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a UTF-8 text file"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    problems = []
    overridden: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"override '{item}': expected key.sub=value, e.g. train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
        overridden.add(key)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in _error_loc(err)[0])
            origin = "override" if any(key == o or key.startswith(o + ".") for o in overridden) else str(path)
            problems.append(f"{origin}: {_format_error(err)}")
    if problems:
        raise ConfigError(problems)
    cfg._source = path
    cfg._overrides = list(overrides)
    return cfg
