"""The plan as the table the launcher prints: every number with its reason. PURE."""

from __future__ import annotations

from launcher.planning.rules import fmt
from launcher.types.plan import BatchPlan

TABLE_ROWS = (
    "global_batch",
    "tokens_per_batch",
    "world_size",
    "memory",
    "data",
    "per_device_batch",
    "micro_batch",
    "accumulation",
    "optimizer",
    "lr",
    "weight_decay",
    "clip_grad_norm",
    "warmup_samples",
    "decay",
    "epoch_samples",
    "steps",
    "oom_recovery",
    "checkpoints",
    "noise_scale",
    "ramp",
    "budget",
)


OPTIONAL_ROWS = ("ramp", "tokens_per_batch", "budget", "data")  # shown when the run has them


def format_plan(plan: BatchPlan) -> str:
    """The plan as a table: one row per derived number, with its reason."""
    values = {
        "lr": fmt(plan.lr),
        "weight_decay": fmt(plan.weight_decay),
        "clip_grad_norm": fmt(plan.clip_grad_norm) if plan.clip_grad_norm else "off",
        "warmup_samples": f"{plan.warmup_samples:,}",
        "epoch_samples": f"{plan.epoch_samples:,}",
        "steps": f"{plan.steps:,}",
        "memory": f"{plan.memory['cap']:,}" if plan.memory else "-",
        "oom_recovery": "on" if plan.oom_recovery else "off",
        "checkpoints": "on" if plan.checkpoints else "off",
        "noise_scale": plan.noise,
        "ramp": f"{plan.ramp[0].global_batch}->{plan.global_batch}" if plan.ramp else "-",
        **({"ramp": f"adaptive<={plan.adaptive_cap}"} if plan.adaptive_cap else {}),
        "tokens_per_batch": f"{plan.global_batch * plan.sample_tokens:,}",
        **(
            {"accumulation": "varies", "micro_batch": f"<={plan.micro_batch}"}
            if plan.data == "budget"
            else {}
        ),
    }
    seq = plan.sample_tokens  # a run stated in tokens: both units (launcher/planning/tokens.py)
    if "global_batch_tokens" in plan.in_tokens:
        values["global_batch"] = (
            f"{plan.global_batch:,} sequences = {plan.global_batch * seq:,} tokens"
        )
    if "schedule.warmup_tokens" in plan.in_tokens:
        values["warmup_samples"] += f" = {plan.warmup_samples * seq:,} tokens"
    rows = [
        (k, values[k] if k in values else str(getattr(plan, k)), plan.reasons.get(k, ""))
        for k in TABLE_ROWS
        if k not in OPTIONAL_ROWS or k in plan.reasons
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'':-<{w0 + w1 + 40}}", "batch plan", f"{'':-<{w0 + w1 + 40}}"]
    lines += [f"{k:<{w0}}  {v:>{w1}}  {why}" for k, v, why in rows]
    return "\n".join(lines)
