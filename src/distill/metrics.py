"""What each stage records in its manifest's `metrics`, typed (the stage registry names each stage's model): the stage's writes are checked against it when the
manifest is written (an undeclared key is an error), and the report reads these fields by attribute, so renaming
a metric on one side without the other fails a fast test (tests/test_metrics.py) instead of a slow run.

Every field is optional: a stage records what applies to its run (no token statistics without the student's
tokenizer, no teacher size for an API teacher), and the manifest keeps only what the stage set.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lengths(Metrics):
    mean: float
    p50: int
    p95: int
    max: int


class TeacherDistribution(Metrics):
    k: int
    teacher_tokens: int
    bytes: int
    bytes_per_token: float


class SplitInputs(Metrics):
    available: int | None
    usable: int | None  # not sharing a group with a held-out input


class GenerateMetrics(Metrics):
    backend: str | None = None
    engine: str | None = None
    grammar: bool | None = None
    shards: int | None = None
    counts: dict[str, int] | None = None  # accepted per split, plus rejected and attempts
    acceptance_rate: float | None = None
    reject_reasons: dict[str, int] | None = None
    think_blocks_stripped: int | None = None
    teacher_output_tokens: int | None = None
    teacher_seconds: float | None = None
    output_tokens_per_s: float | None = None
    examples_per_s: float | None = None
    student_tokenizer: str | None = None
    prompt_tokens: Lengths | None = None
    response_tokens: Lengths | None = None
    example_tokens: Lengths | None = None  # prompt and response of each example together
    logprobs: TeacherDistribution | None = None
    cluster: list[dict[str, Any]] | None = None  # each Ray shard's engine and replica throughput
    requested: dict[str, int | str] | None = None  # per split: a number, or "all" (every usable input that passes)
    dedup: str | None = None  # what the near-duplicate filter compared
    inputs: dict[str, SplitInputs] | None = None  # a task with a fixed set of inputs: how many each split has
    class_balance: dict[str, dict[str, int]] | None = None  # a labels task: each split's answers per label


class Coverage(Metrics):
    tokens: int
    none: int
    direct: int
    mapped: int
    uld: int
    span: int | None = None  # on-policy only: a student token spelling a run of the teacher's, judged as a whole
    share: float


class KdSummary(Metrics):
    divergence: str
    beta: float
    temperature: float
    alpha: float
    align: bool
    unmapped: str
    coverage: Coverage


class OnPolicySummary(Metrics):
    lmbda: float
    start_step: int = 0  # steps on the stored answers alone first
    divergence: str
    beta: float
    temperature: float
    max_new_tokens: int
    grammar: bool
    teacher: str  # where the scoring teacher ran: transformers (in process) or openai (a vLLM server)
    offline: str  # how the other micro-batches trained: offline (stored distribution) or text
    on_policy_batches: int
    offline_batches: int
    share: float
    rows: int
    sampled_tokens: int
    scored_tokens: int
    teacher_nll_per_token: float | None = None  # the teacher's negative log-likelihood of the student's answers
    sampling_s: float
    scoring_s: float
    training_s: float
    wall_s: float
    coverage: Coverage  # of the student's sampled tokens by the teacher's scores


class TrainMetrics(Metrics):
    objective: str | None = None
    kd: KdSummary | None = None
    on_policy: OnPolicySummary | None = None
    backend: str | None = None
    precision: str | None = None
    optimizer: str | None = None
    attention: str | None = None  # the attention kernel transformers ran
    packing: bool | None = None
    gradient_checkpointing: bool | None = None  # as train.gradient_checkpointing=auto resolved it
    processes: int | None = None
    examples: int | None = None
    truncated: int | None = None  # examples whose answer lost its end to train.max_length
    skipped_too_long: int | None = None  # examples left out: the prompt alone fills train.max_length
    steps: int | None = None
    planned_steps: int | None = None
    plan_steps: int | None = None
    trainable_params: int | None = None
    plan_trainable_params: int | None = None
    all_params: int | None = None
    plan_all_params: int | None = None
    final_loss: float | None = None
    train_tokens: int | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    resumed_from: str | None = None


class MergeMetrics(Metrics):
    method: str | None = None
    dtype: str | None = None
    check_prompts: int | None = None
    fold_max_abs_logit_diff: float | None = None
    saved_dtype_max_abs_logit_diff: float | None = None
    params: int | None = None
    safetensors_bytes: int | None = None


class PruneMetrics(Metrics):
    amount: float | None = None
    pruned_layers: int | None = None
    pruned_weights: int | None = None
    zeroed_weights: int | None = None
    layer_sparsity: dict[str, float] | None = None
    overall_sparsity: float | None = None
    model_sparsity: float | None = None
    params: int | None = None
    safetensors_bytes: int | None = None


class Verification(Metrics):
    prompts: int
    top1_agreement: float
    max_abs_logit_diff: float
    tokenization_match: float | None = None  # GGUF only: llama.cpp's tokens against HF's
    quantized_linears: int | None = None  # int8 only


class ExportMetrics(Metrics):
    source: str | None = None
    architecture: str | None = None
    format: str | None = None
    tensor_bytes: int | None = None
    file_bytes: int | None = None
    safetensors_bytes: int | None = None
    gguf_vs_safetensors: float | None = None
    student_params: int | None = None
    verification: Verification | None = None
    int8_bytes: int | None = None
    int8_verification: Verification | None = None
    teacher_params: int | None = None
    teacher_bf16_bytes: int | None = None
    compression_vs_teacher_bf16: float | None = None


class ServeMetrics(Metrics):
    instances_planned: int | None = None
    slots_planned: int | None = None
    processes_started: int | None = None
    slots_started: int | None = None
    best_fleet: str | None = None
    meets_slo: bool | None = None
    slo_ms: float | None = None
    capacity: int | None = None
    goodput_per_s: float | None = None
    requests_per_s: float | None = None
    e2e_p50_ms: float | None = None
    e2e_p95_ms: float | None = None
    valid_share: float | None = None
    grammar: bool | None = None
    goodput_per_s_free: float | None = None
    budget_held: dict[str, bool] | None = None


class ClassScores(Metrics):
    precision: float
    recall: float
    f1: float
    support: int  # gold labels of this class
    predicted: int  # answers giving it


class LabelScores(Metrics):
    """Classification against gold labels (see distill.scoring.label_scores)."""

    answers: int
    accuracy: float
    macro_f1: float
    classes: dict[str, ClassScores]
    confusion: dict[str, dict[str, int]]  # gold label -> answer -> count


class FieldScores(Metrics):
    accuracy: float
    precision: float
    recall: float
    f1: float
    support: int  # gold records with a value in this field


class RecordScores(Metrics):
    """Extraction against gold records (see distill.scoring.record_scores)."""

    answers: int
    exact_match: float
    field_accuracy: float
    field_f1: float
    fields: dict[str, FieldScores]


class GoldScores(Metrics):
    labels: LabelScores | None = None
    records: RecordScores | None = None
    exact_match: float | None = None  # answers of another shape: the whole answer equals the gold one


class Scores(Metrics):
    """One decoding's rates over the held-out answers (see distill.scoring.summarize)."""

    answers: int
    validity: float
    mean_quality: float
    violation_rates: dict[str, float]
    agreement: dict[str, float]
    perplexity: float | None = None
    latency_s_mean: float | None = None
    latency_s_p50: float | None = None
    tokens_per_s: float | None = None
    gold: GoldScores | None = None  # the task's answers scored as what they are, against gold answers


class EvalMetrics(Scores):
    constrained: Scores | None = None  # the same answers decoded under the task's grammar
    grammar: str | None = None  # which decodings it holds, in words
    size_bytes: int | None = None
    teacher_acceptance_rate: float | None = None


def stage_model(stage: str) -> type[Metrics]:
    """The metrics model of a stage, or of `eval/<model>`, as the stage registry names it."""
    from distill.stages import STAGES, resolve

    return resolve(STAGES[stage.split("/")[0]].metrics)


def checked(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """A stage's metrics as its manifest keeps them, after checking every key and type against its model."""
    return stage_model(stage).model_validate(metrics).model_dump(mode="json", exclude_unset=True)
