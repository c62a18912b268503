"""Backends declare what they support (launcher/config/capabilities.py); the planner and the
run read that, and no backend name is compared outside launcher/backends/."""

from __future__ import annotations

import re
from pathlib import Path

from launcher.config.capabilities import capabilities
from launcher.config.compose import compose_run

ROOT = Path(__file__).resolve().parent.parent / "launcher"


def _caps(*overrides: str):
    return capabilities(compose_run(list(overrides)).backend)


def test_accelerate_supports_everything_the_loop_offers() -> None:
    caps = _caps()
    assert (caps.oom_recovery, caps.checkpoints, caps.gradients, caps.ramp_up) == (None,) * 4
    assert not caps.zero_buckets and not caps.config_file


def test_deepspeed_says_why_it_does_not() -> None:
    zero2 = _caps("backend=deepspeed", "backend.zero_stage=2")
    assert zero2.oom_recovery.startswith("ZeRO stage 2 reduces gradients inside backward")
    assert zero2.zero_buckets and zero2.config_file and zero2.checkpoints is None
    assert "reduces the gradients inside step()" in zero2.gradients
    assert zero2.ramp_up.startswith("a batch ramp-up runs with backend=accelerate only")
    zero0 = _caps("backend=deepspeed", "backend.zero_stage=0")
    assert zero0.oom_recovery is None and not zero0.zero_buckets
    bf16 = _caps(
        "backend=deepspeed",
        "backend.zero_stage=0",
        "backend.mixed_precision=bf16",
        "backend.autocast=false",
    )
    assert bf16.checkpoints.startswith("resuming backend=deepspeed needs ZeRO 0 with float32")


def test_no_backend_name_is_compared_outside_the_backends_package() -> None:
    compared = re.compile(r"""(name\s*[!=]=\s*|in\s*\()["'](accelerate|deepspeed)["']""")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in ROOT.rglob("*.py")
        if "backends" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line)
    ]
    assert found == []
