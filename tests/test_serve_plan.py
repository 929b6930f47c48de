"""The instance-count formula and each of its terms, on known numbers."""

import json

import pytest
from conftest import REPO, invoke_cli

from distill.config import load_config
from distill.errors import DistillError
from distill.serving.memory import (
    GPU_PROFILES,
    Geometry,
    compute_buffer_bytes,
    geometry_of,
    kv_cache_bytes,
    plan_serving,
    server_bytes,
)

MIB = 2**20
GEMMA_270M = Geometry(
    layers=18, kv_heads=1, head_dim=256, vocab=262_144, hidden=640, sliding_window=512, sliding_layers=15
)


def test_published_overrides_give_twelve_instances() -> None:
    cfg = load_config(REPO / "configs/paper.yaml", ["serve.v_small_mb=300", "serve.v_batch_mb=200"])
    plan = plan_serving(cfg)
    assert plan["v_gpu_bytes"] == 6 * 2**30
    assert plan["v_small_bytes"] == 300 * MIB and plan["v_batch_bytes"] == 200 * MIB
    assert plan["instances"] == 12  # floor(6144 / 500)


def test_real_gemma_geometry_from_the_shipped_config() -> None:
    from distill.plan import load_arch

    cfg = load_config(REPO / "configs/paper.yaml")
    assert geometry_of(load_arch(cfg, "student")) == GEMMA_270M


def test_kv_cache_counts_sliding_layers_by_their_window() -> None:
    # 3 global layers keep all 4096 cells; 15 sliding layers keep 512 + one 512-token ubatch.
    per_cell_layer = 2 * 1 * 256 * 2
    expected = per_cell_layer * (3 * 4096 + 15 * 1024)
    assert kv_cache_bytes(GEMMA_270M, context=4096, parallel=1, ubatch=512) == expected == 28_311_552
    assert kv_cache_bytes(GEMMA_270M, context=4096, parallel=4, ubatch=512) == 4 * expected
    # a context shorter than the window: every layer keeps the whole context
    assert kv_cache_bytes(GEMMA_270M, context=256, parallel=1, ubatch=512) == per_cell_layer * 18 * 256


def test_compute_buffer_is_dominated_by_the_vocabulary() -> None:
    size = compute_buffer_bytes(GEMMA_270M, parallel=1, ubatch=512)
    logits = 512 * 262_144 * 4
    assert logits < size < 1.1 * logits
    assert compute_buffer_bytes(GEMMA_270M, parallel=1, ubatch=128) < size / 3


def test_estimated_plan_for_the_real_student_on_rtx2060() -> None:
    cfg = load_config(REPO / "configs/paper.yaml")
    plan = plan_serving(cfg)
    slot = plan["v_small_bytes"] + plan["v_batch_bytes"]
    assert plan["instances"] == 6 * 2**30 // slot
    assert plan["v_batch_bytes"] == plan["kv_cache_bytes"] + plan["compute_buffer_bytes"]
    assert "estimate" in plan["v_small_source"] and plan["v_small_bytes"] > 285_018_624
    assert plan["vllm_supported"].startswith("no: compute capability 7.5")
    assert plan["fp16_note"].startswith("yes: no bf16 on this card")
    assert plan_serving(load_config(REPO / "configs/paper.yaml", ["serve.gpu_profile=l4-24gb"]))["fp16_note"] == (
        "no: compute capability 8.9 has bf16"
    )


def test_one_server_slots_share_the_budget_the_processes_split() -> None:
    # Gemma 3 270M Q8_0 (285,018,624 B of tensors; a 291,700,000 B file) on the RTX 2060's 6 GiB
    cfg = load_config(REPO / "configs/paper.yaml")
    plan = plan_serving(cfg, model_bytes=291_700_000)
    weights = 291_700_000 + 300 * MIB  # file + runtime overhead (CUDA context)
    graph = 512 * 262_144 * 4 + 512 * 640 * 4 * 8  # one physical batch of logits and hidden states
    per_slot = 28_311_552 + 262_144 * 4  # one sequence's KV cache + its output row
    assert plan["server_fixed_bytes"] == weights + graph and plan["server_per_slot_bytes"] == per_slot
    assert plan["slots"] == (6 * 2**30 - weights - graph) // per_slot == 180
    assert plan["instances"] == 6 * 2**30 // (weights + 28_311_552 + 262_144 * 4 + graph) == 5
    assert server_bytes(plan, 180) <= 6 * 2**30 < server_bytes(plan, 181)
    # llama.cpp takes at most 256 sequences in one context, however much memory is left
    assert plan_serving(load_config(REPO / "configs/paper.yaml", ["serve.gpu_profile=h100-80gb"]))["slots"] == 256
    # a given V_batch cannot be split into graph and per-sequence parts: each slot pays all of it
    cfg = load_config(REPO / "configs/paper.yaml", ["serve.v_small_mb=300", "serve.v_batch_mb=200"])
    assert plan_serving(cfg)["slots"] == (6144 - 300) // 200


def test_every_profile_plans_and_unknown_is_an_error() -> None:
    for name in GPU_PROFILES:
        cfg = load_config(
            REPO / "configs/paper.yaml", [f"serve.gpu_profile={name}", "serve.v_small_mb=300", "serve.v_batch_mb=200"]
        )
        assert plan_serving(cfg)["instances"] == GPU_PROFILES[name][0] // (500 * MIB)
    cfg = load_config(REPO / "configs/paper.yaml", ["serve.gpu_profile=gtx-potato"])
    with pytest.raises(DistillError, match="serve.gpu_profile: unknown GPU 'gtx-potato'"):
        plan_serving(cfg)


def test_dry_run_json_keys() -> None:
    result = invoke_cli(
        "serve", "configs/paper.yaml", "serve.v_small_mb=300", "serve.v_batch_mb=200", "--dry-run", "--json"
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {k: plan[k] for k in ("v_gpu_bytes", "v_small_bytes", "v_batch_bytes", "instances")} == {
        "v_gpu_bytes": 6 * 2**30,
        "v_small_bytes": 300 * MIB,
        "v_batch_bytes": 200 * MIB,
        "instances": 12,
    }
    table = invoke_cli(
        "serve",
        "configs/paper.yaml",
        "serve.v_small_mb=300",
        "serve.v_batch_mb=200",
        "--dry-run",
        env={"COLUMNS": "200"},
    )
    assert "n = floor(V_GPU / (V_small + V_batch))" in table.stdout and "12" in table.stdout
