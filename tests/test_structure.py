"""The layout's rules, checked on the source: a function takes the whole RunConfig only where a
job, a plan, a probe step, a backend or a script is composed from it, or where the whole config is
recorded; everywhere else it takes the groups it reads (issue 21)."""

from __future__ import annotations

import ast

from tests.helpers import ROOT

JOB = "composes a job: every group of the config meets here"
PLAN = "the planner reads most groups (batch, optimizer, schedule, backend, trainer, data, ramp)"
PROBE = "a probe step builds the run's model, data, loss, optimizer and backend"
BACKEND = "a backend is built from its own, the optimizer's and the trainer's settings"
RECORD = "records or compares the whole config (checkpoint, earlier run, trackers)"
SCRIPT = "an sbatch script carries the whole command line: overrides, recipe, _target_ paths"
TOKENS = "converts the keys in tokens of the top level and four groups, by the data's seq_len"

WHOLE = ("RunConfig", "ConcreteConfig")  # the whole config: as composed, or made concrete

WHOLE_CONFIG = {
    "training/job.py": {
        "concrete": JOB,
        "on_device": JOB,
        "estimated_memory": JOB,
        "_check_folders": JOB,
        "estimated_plan": JOB,
        "execute": JOB,
    },
    "training/job_plan.py": {"plan_for": JOB, "with_budget": RECORD},
    "training/run_folder.py": {"write_plan_files": RECORD},
    "training/phases.py": {"train_job": JOB, "set_up": JOB},
    "training/budgeting.py": {"budget_config": PLAN},
    "training/checkpointer.py": {"__init__": RECORD},
    "training/metrics.py": {"open_trackers": RECORD},
    "checkpoint/resume.py": {"capture": RECORD, "check": RECORD},
    "batchsize/prior.py": {"_same_workload": RECORD, "find_prior": RECORD},
    "planning/split.py": {"split_for": PLAN},
    "planning/ramp.py": {"ramp_stages": PLAN, "scaled_stage": PLAN},
    "planning/adaptive.py": {"stage_plan": PLAN},
    "planning/tokens.py": {
        "in_samples": TOKENS,
        "stated_in_tokens": TOKENS,
        "require_in_samples": TOKENS,
    },
    "memory/probe.py": dict.fromkeys(
        [
            "_step",
            "_seeded_step",
            "check_fit",
            "check_model_fits",
            "probe_trace",
            "probe_peak",
            "_cache_key",
            "_first_traces",
            "measured_cap",
            "backend_overhead",
            "_with_backend_overhead",
            "estimated_cap",
            "record_oom",
        ],
        PROBE,
    ),
    "backends/__init__.py": dict.fromkeys(["check", "write_config", "build_backend"], BACKEND),
    "backends/accelerate.py": {"__init__": BACKEND},
    "backends/deepspeed.py": {"__init__": BACKEND},
    "backends/fsdp.py": {"__init__": BACKEND},
    "backends/ds_config.py": {"ds_config": BACKEND},
    "cluster/sbatch.py": dict.fromkeys(["directives", "python_path", "job_script"], SCRIPT),
}


def _whole_config_functions() -> set[tuple[str, str]]:
    found = set()
    for path in sorted((ROOT / "launcher").rglob("*.py")):
        module = str(path.relative_to(ROOT / "launcher"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.annotation and ast.unparse(a.annotation) in WHOLE for a in args):
                    found.add((module, node.name))
    return found


def test_the_whole_run_config_is_taken_only_where_it_is_composed_or_recorded():
    found = _whole_config_functions()
    allowed = {(m, f) for m, functions in WHOLE_CONFIG.items() for f in functions}
    extra = sorted(found - allowed)
    assert not extra, f"take the groups they read, or say here why they need it all: {extra}"
    assert not allowed - found, f"allowed but gone (remove them here): {sorted(allowed - found)}"
