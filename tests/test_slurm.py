"""The slurm/ templates on a real Slurm: slurmctld and two slurmd (two emulated nodes on this
machine, tests/slurm_cluster.py), jobs submitted with sbatch by `python -m launcher.slurm`.

Needs root, slurm-wlm and munge (skipped with the reason otherwise; CI installs them and runs
these). Stated tolerance: float64, 1e-10 absolute on the final parameters against one process
with the same global batch (PARITY_ARGS: 5 steps of 64 samples).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.cluster.sbatch import directives, render
from launcher.config.compose import compose_run, hydra_quote
from tests.helpers import (
    PARITY_ARGS,
    ROOT,
    final_state,
    read_metrics,
    run_process,
    skip_or_fail,
    wheel_env,
)
from tests.slurm_cluster import SlurmCluster, skip_reason

TWO_NODES = ["cluster.nodes=2", "cluster.devices_per_node=1", "cluster.device=cpu"]


def test_directives_come_from_the_cluster_config(tmp_path) -> None:
    cfg = compose_run(["cluster=h100x256", "slurm.partition=gpu", "slurm.extra=['--qos=high']"])
    options = directives(cfg, tmp_path / "run", tmp_path)
    assert options[1:4] == ["--nodes=32", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert {"--partition=gpu", "--signal=USR1@120", "--requeue", "--qos=high"} <= set(options)
    # torchrun's 8 processes in one task; host RAM as much as each GPU holds
    assert {"--cpus-per-task=8", "--mem-per-gpu=80G"} <= set(options)
    srun = compose_run(["cluster=h100x256", "slurm.template=multi_node_srun", "slurm.mem=500G"])
    options = directives(srun, tmp_path, tmp_path)
    assert {"--ntasks-per-node=8", "--cpus-per-task=1", "--mem=500G"} <= set(options)
    assert not [o for o in options if o.startswith("--mem-per-gpu")]
    cpu = compose_run([*TWO_NODES, "slurm.signal_seconds=0", "slurm.exclusive=true"])
    options = directives(cpu, tmp_path, tmp_path)
    assert not [o for o in options if "gpus" in o or "signal" in o]
    assert {"--cpus-per-task=1", "--mem=0", "--exclusive"} <= set(options)  # the whole node
    sized = compose_run([*TWO_NODES, "cluster.device_memory_gb=3.5", "slurm.cpus_per_task=4"])
    assert {"--cpus-per-task=4", "--mem=4G"} <= set(directives(sized, tmp_path, tmp_path))
    plain = compose_run([*TWO_NODES, "slurm.extra=--qos high  --exclusive --comment x"])
    assert plain.slurm.extra == ("--qos=high", "--exclusive", "--comment=x")
    assert directives(plain, tmp_path, tmp_path)[-3:] == list(plain.slurm.extra)
    text = render(
        "#!/bin/bash\n# about\n#SBATCH --nodes=9\n#SBATCH --time=1\nrun\n", ["--x"], [":"]
    )
    assert text == "#!/bin/bash\n# about\n#SBATCH --x\n:\nrun\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "cluster.nodes=auto: a Slurm job needs the cluster's shape"),
        (["cluster=a100x8", "cluster.device=auto"], "cluster.device=auto: say cpu or cuda"),
        (["cluster=h100x256", "slurm.template=single_node"], "slurm.template='single_node': "),
        (["cluster=a100x8", "slurm.time=1:2:3:4"], "slurm.time='1:2:3:4': must be MINUTES"),
        ([*TWO_NODES, 'slurm.extra="--qos high;reboot"'], "slurm.extra='--qos=high;reboot': "),
        ([*TWO_NODES, "slurm.partition=a b"], "slurm.partition='a b': must be a Slurm name"),
        ([*TWO_NODES, "slurm.mem_per_gpu=8G"], "slurm.mem_per_gpu='8G': cluster='local' has no"),
        (["cluster=a100x8", "slurm.mem=lots"], "slurm.mem='lots': must be a size like 64G"),
    ],
)
def test_render_refuses_bad_input_with_one_line_and_writes_nothing(
    tmp_path, overrides, message, monkeypatch, capsys
):
    """`python -m launcher.slurm OVERRIDES` in this process (the slurm fixture's tests start it
    as a process)."""
    from launcher.slurm import main as render

    monkeypatch.chdir(tmp_path)
    assert render(overrides) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("launcher: error: ")
    assert message in err
    assert not list(tmp_path.iterdir())


HOSTILE = "x\ntouch pwned"  # the injection: bash ran the line after the newline


@pytest.mark.parametrize(
    "key",
    ["run_dir", "cluster.name", "slurm.partition", "slurm.account", "slurm.extra", "cd", "cwd"],
)
def test_no_value_reaches_the_sbatch_script_unsafely(tmp_path, key, monkeypatch, capsys) -> None:
    """Every value the rendered script holds (#SBATCH options, the comment, the shell words)
    with a newline: refused in one line, exit 2, no script written (sbatch would also have
    stopped reading #SBATCH lines at it, dropping --requeue and --signal). In this process."""
    from launcher.slurm import main as render

    cwd, args = tmp_path, [*TWO_NODES]
    if key in ("cd", "cwd"):
        folder = tmp_path / HOSTILE
        folder.mkdir()
        cwd = folder if key == "cwd" else tmp_path
        args += [f"--config-dir={folder}"] if key == "cd" else []
    else:
        args.append(f"{key}='{HOSTILE}'")
    monkeypatch.chdir(cwd)
    assert render(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("launcher: error: ")
    assert not list(tmp_path.rglob("*.sbatch")) and not list(tmp_path.rglob("pwned"))


def test_hydra_quote_reads_back_as_written() -> None:
    from launcher.config.compose import hydra_quote, override_value

    for text in ["/runs/a", '/r w#1/"a" 5%', "it's", "a${x}b", "both'\"", "end\\", "a,b", "x=y"]:
        assert override_value(f"run_dir={hydra_quote(text)}") == text


def _sbatch_words(line: str, space_escape: bool = False) -> list[str]:
    """The words sbatch reads from an #SBATCH line: get_argument of Slurm's src/sbatch/opt.c
    (22.05, Debian's; space_escape: 24.05's `\\ ` for a space) written in Python."""
    text, i, words = line.removeprefix("#SBATCH"), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        word, quote, escape = "", "", False
        while i < len(text) and (quote or not text[i].isspace()):
            ch = text[i]
            if escape:
                escape = False
            elif ch == "\\":
                i += 1
                if space_escape and text[i : i + 1] == " ":
                    word, i = word + " ", i + 1
                else:
                    escape = True
                continue
            elif quote:
                if ch == quote:
                    quote, i = "", i + 1
                    continue
            elif ch in "\"'":
                quote, i = ch, i + 1
                continue
            elif ch == "#":  # the rest of the line is a comment
                return words + [word] if word else words
            word, i = word + ch, i + 1
        if quote:
            raise ValueError(f"sbatch: Unmatched `{quote}` in [{line}]")
        if not word:
            return words
        words.append(word)


# the characters sbatch reads in an #SBATCH line; % is Slurm's pattern sign (doubled: a %)
SBATCH_HOSTILE = ["it's", 'say "hi"', "back\\slash", "#1", "my runs", "5%%", "a'b c\"d#e%%f \\"]


def test_each_sbatch_option_is_one_word_as_sbatch_reads_it() -> None:
    from launcher.cluster.sbatch import sbatch_option

    for value in ["/runs/plain-1", *(f"/runs/{v}" for v in SBATCH_HOSTILE)]:
        option = f"--output={value}/slurm-%j.out"
        line = f"#SBATCH {sbatch_option(option)}"
        for space_escape in (False, True):
            assert _sbatch_words(line, space_escape) == [option], line
    assert sbatch_option("--output=/runs/it's") == '--output="/runs/it\'s"'  # was bare: unmatched
    assert sbatch_option("--requeue") == "--requeue"


def test_a_run_dir_slurm_cannot_name_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    """A backslash in --output turns off Slurm's %j and is dropped: refused, nothing written."""
    from launcher.slurm import main as render

    monkeypatch.chdir(tmp_path)
    assert render([*TWO_NODES, "run_dir='a\\b'"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher: error: run_dir='"), err
    assert "holds a backslash" in err and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = skip_reason()
    if reason:
        skip_or_fail(reason)
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def _submit(slurm, cwd: Path, overrides: list[str], env: dict | None = None) -> int:
    res = run_process(
        [sys.executable, "-m", "launcher.slurm", "--submit", *overrides],
        cwd,
        env=slurm.env | (env or {}),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return int(re.search(r"submitted Slurm job (\d+)", res.stdout).group(1))


def _same(got: dict, ref: dict) -> None:
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=0, msg=name)


def _output(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in run_dir.glob("slurm-*.out"))


@pytest.mark.slow
@pytest.mark.parametrize("template", ["multi_node", "multi_node_srun"])
def test_two_node_job_matches_one_process(
    slurm, template, one_rank_reference, tmp_path, data_cache
):
    """2 nodes x 1 process (torchrun per node, or one srun task per device), gloo."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    job = _submit(slurm, tmp_path, [*args, *TWO_NODES, f"slurm.template={template}"])
    state = slurm.wait(job, timeout=600)
    run = tmp_path / "run"
    assert state == "COMPLETED", (slurm.job_info(job), _output(run)[-3000:])
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in (run / "job.sbatch").read_text()
    if template == "multi_node":  # srun tasks find the first node's NodeAddr themselves
        assert "rendezvous at 127.0.0.1:" in _output(run)
    plan = (run / "plan.json").read_text()
    source = {"multi_node": "torchrun / accelerate launch", "multi_node_srun": "srun"}[template]
    assert '"world_size": 2' in plan and f"on 2 node(s), {source} in Slurm job {job}" in plan
    _same(final_state(run), one_rank_reference)


@pytest.mark.slow
def test_single_node_job_spawns_its_workers(slurm, one_rank_reference, tmp_path, data_cache):
    """1 node, 1 task: the launcher inside the Slurm step starts trainer.devices=2 workers."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", "run_dir=run"]
    shape = ["cluster.nodes=1", "cluster.devices_per_node=2", "cluster.device=cpu"]
    job = _submit(slurm, tmp_path, [*args, *shape])
    run = tmp_path / "run"
    assert slurm.wait(job, timeout=600) == "COMPLETED", _output(run)[-3000:]
    assert "single_node.sbatch" in (run / "job.sbatch").read_text()
    plan = (run / "plan.json").read_text()
    assert '"world_size": 2' in plan and "on 1 node(s), trainer.devices" in plan
    _same(final_state(run), one_rank_reference)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_finishes(
    slurm, one_rank_reference, tmp_path, data_cache
):
    """Slurm delivers SIGUSR1 to the job's processes (as `--signal=USR1@120` would before the
    time limit) while both ranks wait after step 3: they save, rank 0 requeues the job, the
    requeued job resumes in the same run_dir and ends with every sample counted once."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    job = _submit(slurm, tmp_path, [*args, *TWO_NODES], env={"LAUNCHER_TEST_KILL": "3:step:WAIT"})
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
    while '"step": 3' not in (metrics.read_text() if metrics.exists() else ""):
        assert time.monotonic() < deadline, (slurm.job_info(job), _output(tmp_path / "run"))
        time.sleep(0.2)  # polling for a condition, not timing anything
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm._env(), check=True)
    state = slurm.wait(job, timeout=600)
    run, info = tmp_path / "run", slurm.job_info(job)
    out = _output(run)
    assert state == "COMPLETED" and info["Restarts"] == "1", (info, out[-3000:])
    saved = run.resolve() / "checkpoints" / "step-000000003.pt"
    assert f"stopped by SIGUSR1 after step 3 of 5; checkpoint {saved}; requeueing Slurm job" in out
    assert "(restart 1)" in out and "resuming from" in out
    logged = read_metrics(run)
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3, 4, 5]
    events = [(m["event"], m["step"]) for m in logged if "event" in m]
    assert events == [("checkpoint", 3), ("stopped", 3), ("resumed", 3), ("checkpoint", 5)]
    assert [m["samples"] for m in logged if "loss" in m][-1] == 5 * 64
    _same(final_state(run), one_rank_reference)


@pytest.mark.slow
def test_allocation_of_another_shape_fails_with_one_line(slurm, tmp_path, data_cache):
    """The rendered 2 x 1 script (test_two_node_job_matches_one_process runs it as rendered),
    told (by an extra argument) to expect 2 devices per node."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "run_dir=run", *TWO_NODES]
    rendered = run_process([sys.executable, "-m", "launcher.slurm", *args], tmp_path, env=slurm.env)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    script = tmp_path / "run" / "job.sbatch"
    bad = slurm.submit(script, ["cluster.devices_per_node=2", "run_dir=run2"], cwd=tmp_path)
    assert slurm.wait(bad, timeout=600) == "FAILED"
    expected = (
        "launcher: error: cluster='local': expects 2 node(s) x 2 device(s) per node = 4, but "
        f"torchrun / accelerate launch in Slurm job {bad} started 2 node(s) x 1 process(es) per "
        "node = 2 process(es)"
    )
    assert expected in _output(tmp_path / "run"), _output(tmp_path / "run")[-3000:]


@pytest.mark.slow
def test_rendered_job_trains_a_users_project_from_the_installed_wheel(
    slurm, wheel_python, tmp_path
):
    """examples/waves outside the repo, importable only through PYTHONPATH when the script is
    rendered (from another folder); the job is submitted without it: the script carries the
    config dir and the project's folder, and 2 nodes x 1 process train the user's model."""
    project = Path(shutil.copytree(ROOT / "examples" / "waves", tmp_path / "project"))
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    render = [str(wheel_python), "-m", "launcher.slurm", "--config-dir", str(project / "conf")]
    render += ["+recipe=waves", *TWO_NODES, "run_dir=run", "trainer.progress=false"]
    env = wheel_env() | {"PYTHONPATH": str(project)}
    res = subprocess.run(render, cwd=submit_dir, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    run = submit_dir / "run"
    script = (run / "job.sbatch").read_text()
    assert f"export PYTHONPATH={project}" in script
    assert f"--config-dir={project / 'conf'}" in script
    job = slurm.submit(run / "job.sbatch", cwd=submit_dir, env={"HOME": wheel_env()["HOME"]})
    assert slurm.wait(job, timeout=600) == "COMPLETED", _output(run)[-3000:]
    assert '"world_size": 2' in (run / "plan.json").read_text()
    config = (run / "config.yaml").read_text()
    assert "_target_: waves.model.WaveNet" in config
    evals = [m["eval_accuracy"] for m in read_metrics(run) if "eval_accuracy" in m]
    assert evals[-1] >= 0.95


@pytest.mark.slow
def test_submitit_sweep_trains_each_job_on_two_nodes(
    slurm, one_rank_reference, tmp_path, data_cache
):
    """hydra/launcher=submitit_slurm: a 2-job sweep (micro-batch 16 and 32 at global batch 64)
    becomes a Slurm array of two jobs, each on the 2 emulated nodes x 1 process (srun tasks, the
    launcher's own topology detection), each equal to one process's training."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16,32", *TWO_NODES]
    sweep = ["-m", "hydra/launcher=submitit_slurm", *args, "hydra.sweep.dir=sw"]
    res = run_process([sys.executable, "-m", "launcher", *sweep], tmp_path, env=slurm.env)
    assert res.returncode == 0, res.stderr[-3000:]
    (script,) = (tmp_path / "sw").glob(".submitit/*/*_submission.sh")
    options = set(re.findall(r"^#SBATCH (\S+)$", script.read_text(), re.MULTILINE))
    assert options >= {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=0"}
    assert options >= {"--requeue", "--signal=USR2@120", "--time=24:00:00"}
    for job in ("0", "1"):
        run = tmp_path / "sw" / job
        plan = (run / "plan.json").read_text()
        assert '"world_size": 2' in plan and "on 2 node(s), srun in Slurm job " in plan
        assert (run / ".hydra" / "overrides.yaml").exists()
        _same(final_state(run), one_rank_reference)


@pytest.mark.slow
def test_sbatch_reads_each_hostile_run_dir_as_written(slurm, tmp_path, monkeypatch):
    """Slurm's own parser and filename patterns: the #SBATCH lines rendered for each run_dir,
    with a body that only prints its working directory, run as jobs; each job's output is in its
    run_dir and says it ran where it was rendered (a folder with the same characters)."""
    from launcher.slurm import main as render

    workdir = tmp_path / "submit from 'here' #2 %d"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    jobs = {}
    for name in SBATCH_HOSTILE:
        run = tmp_path / name.replace("%%", "%")
        if "\\" in name:  # Slurm cannot name it in --output (refused: test above)
            continue
        assert render([*TWO_NODES, f"run_dir={hydra_quote(str(run))}"]) == 0
        lines = (run / "job.sbatch").read_text().splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        probe = run / "probe.sbatch"
        probe.write_text("\n".join([*lines[: last + 1], "pwd"]) + "\n")
        jobs[run] = slurm.submit(probe, cwd=tmp_path)
    assert len(jobs) == len(SBATCH_HOSTILE) - 2
    for run, job in jobs.items():
        assert slurm.wait(job, timeout=120) == "COMPLETED", slurm.job_info(job)
        assert (run / f"slurm-{job}.out").read_text() == f"{workdir}\n", list(run.iterdir())


@pytest.mark.slow
def test_a_run_dir_with_spaces_quotes_and_percent_trains_where_it_says(slurm, tmp_path, data_cache):
    """sbatch splits #SBATCH lines at spaces, ends them at #, expands % in --output: the script
    quotes and escapes for it, and Hydra reads the run_dir it passes back as written."""
    run = tmp_path / "my runs #1" / 'b "64" 5%'
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", *TWO_NODES[1:], "cluster.nodes=1"]
    job = _submit(slurm, tmp_path, [*args, f"run_dir='{run}'"])
    assert slurm.wait(job, timeout=600) == "COMPLETED", (slurm.job_info(job), _output(run)[-3000:])
    assert (run / f"slurm-{job}.out").exists() and (run / "model_final.pt").exists()
    assert '#SBATCH --output="' in (run / "job.sbatch").read_text()
