"""Batches, cadences and lengths stated in tokens (issue 22): the pure conversion into samples
(launcher/planning/tokens.py), the plans it gives, resume, and a real text run killed and
resumed. Stated tolerance: resuming on the same world size is bit-exact on CPU."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import files as checkpoint
from launcher.checkpoint.resume import check
from launcher.cluster.topology import Topology
from launcher.config.compose import compose_run
from launcher.config.schema import RunConfig, to_dict
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.ramp import starts
from launcher.planning.render import format_plan
from launcher.planning.split import batch_step, split_batch
from launcher.planning.tokens import in_samples, to_samples
from launcher.training.job import concrete
from tests.helpers import read_metrics, run_cli, train_here, write_corpus

EPOCH = 116_988  # sequences of 256 tokens in an epoch (any number: the plan is given it)


@functools.cache
def _gpt(*overrides: str) -> RunConfig:
    return compose_run(["+recipe=gpt_small", *overrides])


def _planned(cfg: RunConfig, world: int = 1):
    """The plan of `cfg` as a job on `world` processes makes it: the config made concrete (its
    tokens converted, for that world) once, then planned (launcher/training/job.py)."""
    launched = Topology(world, 0, 0, world, "cpu")
    return plan_batch(PlanInput(concrete(cfg, launched), world, EPOCH))


def _nearest(message: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", message.split("nearest valid: ")[1])]


# --------------------------------------------------------------------------- the conversion
def test_to_samples_is_exact_or_names_the_nearest_valid_values():
    assert to_samples("k", 262_144, 256) == 1024
    with pytest.raises(ConfigError) as err:
        to_samples("k", 262_000, 256)
    msg = str(err.value)
    assert msg.startswith("k=262000: 1,023.44, not a whole number sequences of 256 tokens")
    assert _nearest(msg) == [261_888, 262_144] and "\n" not in msg
    with pytest.raises(ConfigError) as err:  # whole, but not a count `valid` accepts
        to_samples("k", 256 * 1000, 256, lambda n: n % 3 == 0, "a multiple of 3")
    assert "1,000 sequences" in str(err.value) and "; a multiple of 3;" in str(err.value)
    assert _nearest(str(err.value)) == [256 * 999, 256 * 1002]
    with pytest.raises(ConfigError) as err:  # nothing below: only the value above
        to_samples("k", 100, 256)
    assert _nearest(str(err.value)) == [256]
    assert to_samples("w", 0, 256, lambda n: n >= 0) == 0  # a warmup of 0 tokens is one


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        (["global_batch_tokens=262144"], {"global_batch": 1024}),
        (["schedule.warmup_tokens=25600"], {"schedule.warmup_samples": 100}),
        (["schedule.warmup_tokens=0"], {"schedule.warmup_samples": 0}),
        (["trainer.tokens=2560000"], {"trainer.samples": 10_000}),
        (["ramp.start_batch_tokens=4096", "ramp.tokens=256000"], {"ramp.start_batch": 16}),
        (["ramp.start_batch=16", "ramp.tokens=256000"], {"ramp.samples": 1000}),
        (["checkpoint.every_tokens=512000"], {"checkpoint.every_samples": 2000}),
        ([], {"global_batch": 64, "trainer.samples": 0}),  # nothing in tokens: unchanged
    ],
)
def test_each_key_in_tokens_converts_into_its_twin_in_samples(overrides, want):
    raw = _gpt(*overrides)
    cfg = in_samples(raw)
    for key, value in want.items():
        group, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, group) if group else cfg, name) == value, key
    assert in_samples(cfg) == cfg  # converting a converted config changes nothing
    assert to_dict(cfg) | {"recipe": raw.recipe} == to_dict(in_samples(cfg))


def test_a_twin_set_to_another_value_is_refused_naming_both():
    with pytest.raises(ConfigError) as err:
        in_samples(_gpt("ramp.start_batch=16", "ramp.tokens=256000", "ramp.samples=999"))
    msg = str(err.value)
    assert msg.startswith("ramp.tokens=256000 and ramp.samples=999: both set")
    assert "1,000 sequences of 256" in msg
    for pair in (
        ("trainer.tokens=2560000", "trainer.samples=5"),
        ("schedule.warmup_tokens=2560", "schedule.warmup_samples=5"),
        ("checkpoint.every_tokens=2560", "checkpoint.every_samples=5"),
        ("ramp.start_batch_tokens=4096", "ramp.start_batch=8", "ramp.samples=100"),
    ):
        with pytest.raises(ConfigError, match=rf"^{re.escape(pair[0])} and "):
            in_samples(_gpt(*pair))
    agreeing = _gpt("trainer.tokens=2560000", "trainer.samples=10000")
    assert in_samples(agreeing).trainer.samples == 10_000


@pytest.mark.parametrize("order", [0, 1])
def test_a_global_batch_stated_beside_its_tokens_must_agree(order):
    """global_batch_tokens replaces the recipe's global_batch, but not one the command line
    states: 65,536 tokens are 256 sequences of 256, so global_batch=100 is refused in one line
    (the issue: it trained at 256 silently), and global_batch=256 agrees."""
    pair = ["global_batch_tokens=65536", "global_batch=100"][:: 1 - 2 * order]
    with pytest.raises(ConfigError) as err:
        compose_run(["+recipe=gpt_small", *pair])
    assert str(err.value) == (
        "global_batch_tokens=65536 and global_batch=100: both set, and 65,536 tokens are 256 "
        "sequences of 256 (data.seq_len); set one of them"
    )
    cfg = compose_run(["+recipe=gpt_small", "global_batch_tokens=65536", "global_batch=256"])
    assert in_samples(cfg).global_batch == 256


def test_tokens_need_sequence_data():
    cfg = compose_run(["global_batch_tokens=4096"])  # mnist1d: no tokens
    with pytest.raises(ConfigError) as err:
        in_samples(cfg)
    assert str(err.value).startswith("global_batch_tokens=4096: tokens need sequence data")
    assert "data=mnist1d has none: state it in samples (global_batch)" in str(err.value)


@pytest.mark.parametrize(
    ("world", "micro", "tokens"),
    [(1, "auto", 262_000), (3, "auto", 256_000), (8, 16, 256_000), (8, 16, 1000), (6, 4, 99_999)],
)
def test_the_nearest_global_batches_in_tokens_are_ones_the_plan_accepts(world, micro, tokens):
    cfg = _gpt(f"global_batch_tokens={tokens}", f"micro_batch={micro}")
    with pytest.raises(ConfigError) as err:
        _planned(cfg, world)
    msg = str(err.value)
    assert msg.startswith(f"global_batch_tokens={tokens}: ") and "\n" not in msg
    near = _nearest(msg)
    assert near and all(t % 256 == 0 for t in near)
    assert all(t < tokens for t in near[:-1]) and near[-1] > tokens
    step = batch_step(world, micro)[0]
    for t in near:
        split_batch(t // 256, world, micro, 1024)  # accepted: no error
        plan = _planned(_gpt(f"global_batch_tokens={t}", f"micro_batch={micro}"), world)
        assert plan.global_batch == t // 256 and plan.global_batch % step == 0
    for bad in (near[0] + 256, near[-1] - 256):  # between them: refused
        if near[0] < bad < near[-1]:
            with pytest.raises(ConfigError):
                split_batch(bad // 256, world, micro, 1024)


def test_the_nearest_ramp_starts_in_tokens_double_up_to_the_global_batch():
    cfg = _gpt("global_batch_tokens=262144", "ramp.start_batch_tokens=60000", "ramp.tokens=2560")
    with pytest.raises(ConfigError) as err:
        in_samples(cfg)
    near = _nearest(str(err.value))
    assert near == [32_768, 65_536]
    assert all(starts(t // 256, 1024) for t in near)


# --------------------------------------------------------------------------------- the plans
SAME = [  # the same run stated in tokens and in samples
    (
        "global_batch_tokens=262144",
        "schedule.warmup_tokens=1497600",
        "trainer.tokens=25600000",
        "ramp.start_batch_tokens=65536",
        "ramp.tokens=2560000",
        "checkpoint.every_tokens=5120000",
    ),
    (
        "global_batch=1024",
        "schedule.warmup_samples=5850",
        "trainer.samples=100000",
        "ramp.start_batch=256",
        "ramp.samples=10000",
        "checkpoint.every_samples=20000",
    ),
]


def test_a_run_in_tokens_plans_exactly_as_the_same_run_in_samples():
    tokens, samples = (_planned(_gpt(*o), 4) for o in SAME)
    assert tokens.in_tokens == (
        "global_batch_tokens",
        "schedule.warmup_tokens",
        "trainer.tokens",
        "ramp.tokens",
        "ramp.start_batch_tokens",
        "checkpoint.every_tokens",
    )
    assert samples.in_tokens == ()

    def numbers(p):
        d = dataclasses.asdict(p)
        return {k: v for k, v in d.items() if k not in ("reasons", "in_tokens", "ramp")}

    assert numbers(tokens) == numbers(samples)
    assert [numbers(s) for s in tokens.ramp] == [numbers(s) for s in samples.ramp]
    assert tokens.total_samples == 100_352 and tokens.warmup_samples == 5850  # 98 steps of 1024
    every = [in_samples(_gpt(*o)).checkpoint.every_samples for o in SAME]
    assert every == [20_000, 20_000]


def test_the_printed_plan_shows_tokens_and_sequences():
    plan = _planned(_gpt(*SAME[0]), 4)
    why = plan.reasons
    assert why["global_batch"] == (
        "262,144 tokens / 256 tokens per sequence = 1,024 sequences (global_batch_tokens)"
    )
    assert why["warmup_samples"].startswith(
        "1,497,600 tokens / 256 (schedule.warmup_tokens) = 5,850 samples"
    )
    assert "25,600,000 tokens / 256 = 100,000 (trainer.tokens)" in why["steps"]
    assert "ramp.tokens=2560000 (10,000 sequences of 256)" in why["ramp"]
    assert "every 20,000 samples = 5,120,000 tokens" in why["checkpoints"]
    table = format_plan(plan)
    assert re.search(r"global_batch +1,024 sequences = 262,144 tokens  262,144 tokens", table)
    assert re.search(r"warmup_samples +5,850 = 1,497,600 tokens  1,497,600 tokens", table)
    plain = format_plan(_planned(_gpt(*SAME[1]), 4))
    assert re.search(r"global_batch +1024  1024 \(global_batch\)", plain)


def test_the_warmup_in_tokens_holds_for_a_swapped_optimizer_and_may_be_zero():
    swapped = _planned(_gpt("global_batch=1024", "schedule.warmup_tokens=25600"))
    assert (swapped.optimizer, swapped.warmup_samples) == ("lamb", 100)
    none = _planned(_gpt("schedule.warmup_tokens=0"))
    assert none.warmup_samples == 0
    assert none.reasons["warmup_samples"] == "no warmup (schedule.warmup_tokens=0)"


def test_a_run_length_in_tokens_covers_its_sequences():
    plan = _planned(_gpt("trainer.tokens=256000"))  # 1,000 sequences of 64
    assert (plan.steps, plan.total_samples) == (16, 1024)
    assert "the last step runs 24 samples into the next epoch" in plan.reasons["steps"]
    with pytest.raises(ConfigError, match="^global_batch_tokens=524288 .*trainer.tokens"):
        _planned(_gpt("trainer.tokens=256000", "global_batch_tokens=524288"))


# ------------------------------------------------------------------------------------ resume
def _saved(cfg: RunConfig, step: int = 4) -> dict:
    cfg = in_samples(cfg)
    plan = plan_batch(PlanInput(cfg, 1, EPOCH))
    return {
        "config": to_dict(cfg),
        "plan": dataclasses.asdict(plan),
        "global_batch": plan.global_batch,
        "consumed_samples": plan.samples_at(step),
        "step": step,
    }


def test_resume_accepts_a_run_in_tokens_and_a_changed_batch_in_tokens_is_a_batch_change():
    run = ("global_batch_tokens=65536", "schedule.warmup_tokens=25600", "trainer.tokens=2560000")
    state = _saved(_gpt(*run))
    assert check(in_samples(_gpt(*run)), state, Path("ckpt")) == (0, 0)
    samples = ("global_batch=256", "schedule.warmup_samples=100", "trainer.samples=10000")
    assert check(_gpt(*samples), state, Path("ckpt")) == (0, 0)  # the same run in samples
    old = json.loads(json.dumps(_saved(_gpt())))  # a checkpoint from before the keys in tokens
    new_keys = {"schedule": ("warmup_tokens", "warmup_samples"), "ramp": ("tokens",)}
    for group, keys in new_keys.items():
        for key in keys:
            del old["config"][group][key]
    del old["config"]["global_batch_tokens"]
    assert check(_gpt(), old, Path("ckpt")) == (0, 0)
    changed = (*run[1:], "global_batch_tokens=131072")
    with pytest.raises(ConfigError) as err:
        check(in_samples(_gpt(*changed)), state, Path("ckpt"))
    assert str(err.value).startswith(
        "global_batch_tokens=131072 (512 sequences): ckpt was trained with global batch 256"
    )
    assert "resume with global_batch_tokens=65536, or say checkpoint.allow" in str(err.value)
    allowed = _gpt(*changed, "checkpoint.allow_global_batch_change=true")
    assert check(in_samples(allowed), state, Path("ckpt")) == (4, 1024)


# ------------------------------------------------------------------------- a real text run
TEXT = [
    "+recipe=gpt_small",
    "model.layers=2",
    "model.width=32",
    "model.heads=2",
    "data.seq_len=16",
    "global_batch_tokens=512",  # 32 sequences of 16 tokens
    "micro_batch=16",
    "trainer.tokens=5120",  # 320 sequences: 10 steps
    "schedule.warmup_tokens=1536",  # 96 sequences: 3 steps
    "checkpoint.every_tokens=1024",  # 64 sequences: every 2 steps
    "checkpoint.keep=3",
    "memory.probe=false",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
]


@pytest.mark.slow
def test_a_text_run_in_tokens_killed_and_resumed_ends_bit_identical(tmp_path):
    """The kill in a process of its own; the whole run, the refusal and the resumed run in this
    one (train_here)."""
    write_corpus(tmp_path / "c.txt", 3000)
    data = [f"data.path={tmp_path / 'c.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    whole = train_here([*TEXT, *data, "run_dir=whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cmd = [*TEXT, *data, "run_dir=run"]
    killed = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "5:step"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    state, _ = checkpoint.load(tmp_path / "run", pytest.fail)
    assert (state["step"], state["consumed_samples"], state["global_batch"]) == (4, 128, 32)
    refused = train_here([*cmd, "global_batch_tokens=1024"], tmp_path)
    assert refused.returncode == 2
    assert "launcher: error: global_batch_tokens=1024 (64 sequences): " in refused.stderr
    done = train_here(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launcher: resuming from" in done.stdout
    ref = torch.load(tmp_path / "whole" / "model_final.pt", weights_only=True)
    got = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)
    assert ref.keys() == got.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    def losses(run: str) -> list[tuple]:
        lines = read_metrics(tmp_path / run)
        return [(m["step"], m["samples"], m["loss"], m["lr"]) for m in lines if "loss" in m]

    assert losses("run") == losses("whole")
    assert [s for s, n, *_ in losses("whole")] == list(range(1, 11))
    assert [n for s, n, *_ in losses("whole")][-1] == 320
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["global_batch"], plan["warmup_samples"], plan["total_samples"]) == (32, 96, 320)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "global_batch: 32\nglobal_batch_tokens: 512\n" in saved  # recorded in both units
