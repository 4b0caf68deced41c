"""The scale-out model (bench/scaling_model.py) and docs/scaling.md, which quotes it."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.scaling_model import (Collective, Fabric, Inputs, ModelNumbers, chunk_size, model_numbers, step_model,
                                 tables)
from model.clip import CLIP
from model.flops import count_flops
from recipes.config import load_config
from tests.conftest import ROOT

INPUTS = Inputs()
PER_PASS = dataclasses.replace(INPUTS, grad_cache_gather="pass")  # ZeRO-3's own per-module gathers in every pass
FABRIC_A, FABRIC_B = INPUTS.fabrics


@pytest.fixture(scope="module")
def numbers() -> ModelNumbers:
    return model_numbers(INPUTS)


def test_doc_tables_are_the_scripts_output(numbers):
    """Every table row the script prints appears verbatim in the doc: editing one without the other fails."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    text, _ = tables(INPUTS, numbers)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) > 20
    missing = [row for row in rows if row not in doc]
    assert not missing, f"docs/scaling.md is out of date with bench/scaling_model.py; first stale row:\n{missing[0]}"


def test_model_numbers_come_from_the_recipes_model(numbers):
    cfg = load_config(INPUTS.recipe)
    with torch.device("meta"):
        model = CLIP(cfg.model)
    assert numbers.params == sum(p.numel() for p in model.parameters())
    assert numbers.params_gathered == sum(p.numel() for p in model.parameters() if p.numel() > 100_000)
    assert numbers.forward_flops == count_flops(cfg.model, pyramid=True).forward
    assert cfg.model.vision.attention == "hier" and numbers.prior_flops > 0 and numbers.prior_params > 0
    assert numbers.vanilla_forward_flops == numbers.forward_flops - numbers.prior_flops
    assert numbers.levels == 6


def test_ring_collective_cost():
    c = Collective(size_bytes=8e9, ranks=4, calls=10, bus_gbs=100.0, step_latency_s=2e-6)
    assert c.bandwidth_seconds(efficiency=0.5) == pytest.approx(3 / 4 * 8e9 / (0.5 * 100e9))
    assert c.latency_seconds() == pytest.approx(10 * 3 * 2e-6)


def test_chunk_is_the_largest_power_of_two_within_the_budget(numbers):
    chunk = chunk_size(INPUTS, numbers)
    budget = INPUTS.activation_budget * INPUTS.hbm_gb * 1e9
    assert chunk * numbers.activation_bytes <= budget < 2 * chunk * numbers.activation_bytes
    assert chunk == 2 ** round(math.log2(chunk))


def test_passes_compute_and_cache(numbers):
    rows = {w: step_model(INPUTS, numbers, w, FABRIC_A) for w in INPUTS.worlds}
    for r in rows.values():
        assert r["chunks"] == math.ceil(r["per_gpu_batch"] / r["chunk"])
        # bench/zero_memory.py measured one gather pass without the cache and, with it, one call per step (the
        # model fits stage3_max_live_parameters, so `auto` gathers once) or 3 passes per chunk with `gather: pass`.
        assert (r["passes"], r["calls_per_pass"]) == ((1, 1) if r["cached"] else (1, 4))
        per_pass = step_model(PER_PASS, numbers, r["world"], FABRIC_A)
        assert per_pass["passes"] == (3 * r["chunks"] if r["cached"] else 1)
        assert per_pass["compute_s"] == r["compute_s"]
    # A model over the live-parameter budget cannot stay gathered: auto falls back to the per-pass pattern.
    small_budget = dataclasses.replace(INPUTS, max_live_parameters=numbers.params_gathered - 1)
    assert step_model(small_budget, numbers, 64, FABRIC_A)["passes"] == 3 * rows[64]["chunks"]
    assert rows[64]["chunks"] > 1 and rows[1024]["chunks"] == 1
    # Compute halves with the GPUs when the forwards per sample stay the same (no cache at 512 and 1,024) ...
    assert rows[512]["compute_s"] == pytest.approx(2 * rows[1024]["compute_s"])
    # ... and the cache's replayed forward is a third more per sample where it is on.
    per_sample = {w: r["compute_s"] / r["per_gpu_batch"] for w, r in rows.items()}
    assert per_sample[64] == pytest.approx(4 / 3 * per_sample[1024])


def test_thinner_fabric_only_slows_communication(numbers):
    a, b = step_model(INPUTS, numbers, 256, FABRIC_A), step_model(INPUTS, numbers, 256, FABRIC_B)
    assert a["compute_s"] == b["compute_s"]
    assert b["z3_bw_s"] == pytest.approx(a["z3_bw_s"] * FABRIC_A.nic_gbs_per_node / FABRIC_B.nic_gbs_per_node)
    assert a["z3_lat_s"] == b["z3_lat_s"]


def test_hpz_changes_nothing_inside_one_node(numbers):
    """With every rank in one node the secondary shard is the whole group: hpZ must cost what ZeRO-3 costs."""
    one_node = dataclasses.replace(PER_PASS, worlds=(8,), global_batch=8 * 512)
    r = step_model(one_node, numbers, 8, Fabric("any", 50.0))
    assert r["nodes"] == 1 and r["passes"] > 1
    assert r["hpz_bw_s"] == pytest.approx(r["z3_bw_s"])
    assert r["hpz_lat_s"] == pytest.approx(r["z3_lat_s"])


def test_the_docs_conclusions_follow_from_the_model(numbers):
    """Gathered once per step, ZeRO-3 with the cache communicates no more than ZeRO-2; with per-pass gathers it
    crosses over first. Without the cache the two pay the same 8 calls per step."""
    _, summary = tables(INPUTS, numbers)
    _, per_pass = tables(PER_PASS, numbers)
    for fabric_key, fabric in zip(("ib8", "ib1"), INPUTS.fabrics):
        assert per_pass[f"{fabric_key}_z3_comm_bound_from"] < per_pass[f"{fabric_key}_z2_comm_bound_from"]
        for world in INPUTS.worlds:
            r = step_model(INPUTS, numbers, world, fabric)
            slow = step_model(PER_PASS, numbers, world, fabric)
            if r["cached"]:
                assert r["z3_comm_over_compute"] <= r["z2_comm_over_compute"]
                assert slow["z3_comm_over_compute"] > 10 * slow["z2_comm_over_compute"]
            else:
                assert r["z3_lat_s"] == pytest.approx(r["z2_lat_s"])  # 4 gather + 4 reduce-scatter calls each
                assert slow == r
