"""The memory probe and the plan_only estimate under backend=fsdp: the sharding credit
(launcher/memory/sharding.py) by hand, and against the per-rank peak of real training steps on
2 gloo ranks (bench/fsdp_memory.py).

Stated tolerance (bench/README.md, issue 22 memory): the OOM-safe step and
reshard_after_forward=false, which gather every parameter, are predicted within 2% of the
measured per-rank peak (the loop holds the step's micro-batches, the probe one: a little
under); FSDP2's own path (oom_recovery=false), which the credit bounds by the root and 3 blocks
gathered at a time, from 2% under to 6% over. Without the credit both are far outside.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys

import pytest

from launcher.config.capabilities import Sharding, capabilities
from launcher.data import data_spec
from launcher.memory.probe import _cache_key, backend_overhead, estimated_cap
from launcher.memory.profile import GB
from launcher.memory.sharding import ModelBytes, model_bytes, sharding_credit
from launcher.planning.plan import PlanInput, plan_batch
from tests.helpers import ROOT, composed, run_process

FP32 = Sharding(None, None, reshard_after_forward=True, oom_safe_whole=True)
# 4,000 bytes of parameters (a root of 1,000 and five blocks of 600), twice that of state
MODEL = ModelBytes(4000, 2000, 8000, 1000, (600,) * 5, 4)


def test_the_oom_safe_step_credits_optimizer_state_less_a_parameter_shard() -> None:
    """Parameters and gradients whole during the step: the rank holds O/2 less optimizer
    state, and its parameter shard (P/2) beside the gathered parameters."""
    credit = sharding_credit(MODEL, 2, FP32, oom_safe=True)
    assert credit.bytes == (8000 - 4000) - 2000
    assert "sharded over 2 ranks" in credit.text and "all gathered for the OOM-safe" in credit.text
    assert "less per rank" in credit.text
    four = sharding_credit(dataclasses.replace(MODEL, shard=1000), 4, FP32, oom_safe=True)
    assert four.bytes == (8000 - 2000) - 1000
    one = sharding_credit(dataclasses.replace(MODEL, shard=4000), 1, FP32, oom_safe=True)
    assert one.bytes == -4000 and "more per rank" in one.text  # shard + gathered copy


def test_fsdp2s_own_path_gathers_the_root_and_three_blocks() -> None:
    credit = sharding_credit(MODEL, 2, FP32, oom_safe=False)
    assert credit.bytes == 4000 + (4000 - 2000 - (1000 + 3 * 600))
    assert "the root and 3 largest blocks" in credit.text
    whole = dataclasses.replace(FP32, reshard_after_forward=False)  # gathered forward to backward
    assert sharding_credit(MODEL, 2, whole, oom_safe=False).bytes == 2000


def test_bf16_gathers_half_and_reduces_in_the_reduce_dtype() -> None:
    bf16 = dataclasses.replace(FP32, gather_itemsize=2, grad_itemsize=4)
    # parameters gathered in bf16 (2,000), gradients held in float32 (as the probe's), less the
    # reduce-scatter input of the largest unit (float32) over its freed bf16 parameters (500)
    assert sharding_credit(MODEL, 2, bf16, oom_safe=True).bytes == 4000 + 0 + 0 - 500
    param = dataclasses.replace(bf16, grad_itemsize=2)  # reduce_dtype=param: bf16 gradients
    assert sharding_credit(MODEL, 2, param, oom_safe=True).bytes == 4000 + 0 + 2000


def test_the_backend_declares_how_it_shards() -> None:
    assert capabilities(composed([]).backend).sharding is None
    assert capabilities(composed(["backend=deepspeed"]).backend).sharding is None
    fsdp = capabilities(composed(["backend=fsdp"]).backend).sharding
    assert fsdp == FP32
    bf16 = composed(["backend=fsdp", "backend.mixed_precision=bf16"]).backend
    assert capabilities(bf16).sharding == Sharding(2, 4, True, True)
    param = composed(["backend=fsdp", "backend.mixed_precision=bf16", "backend.reduce_dtype=param"])
    assert capabilities(param.backend).sharding.grad_itemsize == 2


TINY_GPT = ["+recipe=gpt_small", "model.layers=2", "model.width=32", "model.heads=2"]
TINY_GPT += ["data.seq_len=16", "global_batch=32", "backend=fsdp"]


def test_model_bytes_counts_units_shards_and_state_on_the_meta_device() -> None:
    import torch

    from launcher.models import build_model

    cfg = composed(TINY_GPT)
    spec = data_spec(cfg.data)
    plan = plan_batch(PlanInput(cfg, 2, 100_000))
    counts = model_bytes(cfg.model, "float32", spec, plan, cfg.optim)
    model = build_model(cfg.model, spec)
    params = list(model.parameters())
    assert counts.params == sum(p.numel() * 4 for p in params) == 136_704
    assert counts.blocks == tuple(sum(p.numel() * 4 for p in b.parameters()) for b in model.blocks)
    assert counts.root == counts.params - sum(counts.blocks)
    largest = sum(len(torch.chunk(p.detach(), 2)[0].flatten()) * 4 for p in params)
    assert counts.shard == largest  # FSDP2 pads dim 0 to a multiple of the world size
    assert plan.optimizer == "adamw" and counts.state == 2 * counts.params + 4 * len(params)


def test_the_plan_says_what_sharding_saves_and_adds_no_ddp_buckets(tmp_path) -> None:
    cache = f"memory.cache_dir={tmp_path}"
    rows = {}
    for mode in ("true", "false"):
        cfg = composed([*TINY_GPT, cache, f"trainer.oom_recovery={mode}"])
        spec, plan = data_spec(cfg.data), plan_batch(PlanInput(cfg, 2, 100_000))
        extra, why = backend_overhead(cfg, spec, plan)
        _, report = estimated_cap(cfg, spec, plan, 16 * GB)
        assert extra < 0 and report["overhead_bytes"] == extra and why in report["reason"]
        rows[mode] = report["reason"]
        assert _cache_key(cfg, spec, plan, "cpu")["held_gradients"] is True
    assert (
        "sharded over 2 ranks" in rows["true"] and "all gathered for the OOM-safe" in rows["true"]
    )
    assert "the root and 3 largest blocks gathered at a time" in rows["false"]
    ddp = composed([*TINY_GPT[:-1], cache])  # the same under backend=accelerate: DDP's buckets
    spec, plan = data_spec(ddp.data), plan_batch(PlanInput(ddp, 2, 100_000))
    assert backend_overhead(ddp, spec, plan)[0] == 136_704
    assert "held_gradients" not in _cache_key(ddp, spec, plan, "cpu")


BENCH_GPT = ["+recipe=gpt_small", "model.layers=8", "model.width=64", "model.heads=2"]
BENCH_GPT += ["data.seq_len=32", "global_batch=16"]  # micro-batch 4 x accumulation 2 per rank


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "under", "over"),
    [("true", 0.02, 0.02), ("false", 0.02, 0.06)],
    ids=["oom-safe", "in-backward-reduction"],
)
def test_probe_and_estimate_match_the_peak_of_two_real_ranks(mode, under, over, tmp_path):
    """bench/fsdp_memory.py on 2 gloo ranks: real FsdpBackend steps through the loop, their
    per-rank peak counted by torch's MemTracker; the measured probe and the fake-tensor estimate
    predict it within the stated tolerance, and would not without the sharding credit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), str(ROOT / "bench" / "fsdp_memory.py"), "--micro", "4"]
    cmd += ["--json", str(out), "--", *BENCH_GPT, f"trainer.oom_recovery={mode}"]
    res = run_process(cmd, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["micro_batch"], result["accumulation"]) == (4, 2)
    assert "sharded over 2 ranks" in result["memory_row"]
    measured = max(r["measured"] for r in result["ranks"])
    rank = result["ranks"][0]
    for key in ("probe", "estimate"):
        error = (rank[key] - measured) / measured
        assert -under <= error <= over, (key, rank[key], measured, error)
        without = (rank[f"{key}_no_credit"] - measured) / measured
        assert without > 2 * over, (key, without)  # the credit is what brings it in
