"""Two hosts joined by a real network path: two network namespaces and a veth pair, addresses
inside the namespaces only, one torchrun per "host": with the rendezvous on the first, and
elastic (--nnodes=1:2), losing a host and taking it back.

Needs root and iproute2 (skipped with the reason otherwise; CI runs it). Stated tolerance:
float64, 1e-10 absolute against one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    PARITY_ARGS,
    SMALL_DATA,
    final_state,
    launcher_env,
    skip_or_fail,
)

HOSTS = ("10.99.0.1", "10.99.0.2")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces (name, veth) x 2, deleted afterwards (which removes the veth pair too)."""
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    if shutil.which("ip") is None:
        skip_or_fail("iproute2's `ip` is not installed")
    tag = os.getpid() % 100000
    hosts = [(f"launcher-{tag}-{i}", f"lveth{tag}{i}") for i in (0, 1)]
    steps = [("netns", "add", ns) for ns, _ in hosts]
    steps.append(("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1]))
    for (ns, dev), addr in zip(hosts, HOSTS, strict=True):
        steps += [
            ("link", "set", dev, "netns", ns),
            ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
            ("-n", ns, "link", "set", dev, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ]
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                skip_or_fail(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
        yield hosts
    finally:
        for ns, _ in hosts:
            _ip("netns", "del", ns)


def _tx_bytes(ns: str, dev: str) -> int:
    (link,) = json.loads(_ip("-n", ns, "-j", "-s", "link", "show", dev).stdout)
    return link["stats64"]["tx"]["bytes"]


@pytest.mark.slow
def test_torchrun_across_two_network_namespaces_matches_one_process(
    two_hosts, one_rank_reference, tmp_path, data_cache
):
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    procs = []
    for node, (ns, dev) in enumerate(two_hosts):
        torchrun = ["-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}"]
        torchrun += ["--nproc-per-node=1", f"--master-addr={HOSTS[0]}", "--master-port=29563"]
        cmd = ["ip", "netns", "exec", ns, sys.executable, *torchrun, "-m", "launcher", *args]
        env = launcher_env() | {"GLOO_SOCKET_IFNAME": dev}  # else gloo binds 127.0.0.1
        out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, **out))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    plan = (tmp_path / "run" / "plan.json").read_text()
    assert '"world_size": 2' in plan and "2 node(s)" in plan
    got = final_state(tmp_path / "run")
    for name, value in one_rank_reference.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=0, msg=name)
    params = sum(v.numel() * v.element_size() for v in got.values())
    for ns, dev in two_hosts:  # the gradients went over the veth: 5 all-reduces of float64
        assert _tx_bytes(ns, dev) > 5 * params, (ns, dev)


ELASTIC_ARGS = [
    *SMALL_DATA,
    "global_batch=64",
    "trainer.epochs=1",  # 1,600 samples at 64: 25 steps
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "checkpoint.every_samples=128",  # after every second step
]
LOST_AT, BACK_AT = 4, 10  # the lost host waits after step 4, the survivor after step 10


def _agent(hosts, node: int, store: int, run_id: str, log: Path, args: list[str], hook: str):
    """`torchrun --nnodes=1:2 --max-restarts=3` on host `node`, the rendezvous store hosted by
    host `store`'s agent, run in the log's folder with its output to `log`; `hook`:
    LAUNCHER_TEST_KILL for its workers."""
    ns, dev = hosts[node]
    elastic = ["--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3", "--rdzv-backend=c10d"]
    elastic += [f"--rdzv-id={run_id}", f"--rdzv-endpoint={HOSTS[store]}:29564"]
    elastic += [f"--local-addr={HOSTS[node]}", "--monitor-interval=0.2"]
    # is_host: an address inside a namespace is not the machine's, so torch cannot tell who
    # hosts the store; a lost agent is noticed after 3 missed 1 s heartbeats; a round takes in
    # the agents that join within 5 s of the first
    conf = f"is_host={int(node == store)},keep_alive_interval=1,keep_alive_max_attempt=3"
    elastic.append(f"--rdzv-conf={conf},last_call_timeout=5,join_timeout=120")
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", *elastic]
    # torch 2.14.1 shares the agent's store with the workers; then an agent that joins a later
    # round (the lost host coming back) waits for a MASTER_ADDR that rank 0's agent never writes
    env = launcher_env() | {"GLOO_SOCKET_IFNAME": dev, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env["LAUNCHER_TEST_KILL"] = hook
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, "-m", "launcher", *args], cwd=log.parent, env=env, stdout=out, stderr=out
        )


def _until(condition, agents: list, logs: list[Path], what: str, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail at once when an agent ends, or after `timeout`
    seconds, with the agents' output."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [agent.returncode for agent in agents if agent.poll() is not None]
        if ended or time.monotonic() > deadline:
            said = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
            pytest.fail(f"waiting for {what}: agents ended {ended} or timed out\n{said}")
        time.sleep(0.1)


def _losses(run: Path) -> list[dict]:
    """The records of metrics.jsonl with a loss, in order (complete lines only)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith("\n")]
    return [r for r in records if "loss" in r]


def _plan(run: Path) -> dict:
    try:
        return json.loads((run / "plan.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return {}


@pytest.mark.slow
def test_elastic_torchrun_loses_a_host_and_takes_it_back(two_hosts, tmp_path, data_cache):
    """torchrun --nnodes=1:2 --max-restarts=3 on two hosts. Host 0 (rank 0: the lower address)
    is lost: its agent is killed while host 0 waits after step 4, its worker dies with it, the
    worker on host 1 fails its next collective, and host 1's agent (it hosts the rendezvous)
    restarts it at world size 1: rank 0 now, it takes over the run's lock and resumes the newest
    checkpoint (step 2) in the same folder at the same global batch. Host 0's agent comes back
    while host 1 waits after step 10: host 1's agent sees it waiting and stops its worker
    (SIGTERM: a checkpoint of step 10), and both train the rest at world size 2."""
    lost, survivor = 0, 1
    run_id = f"elastic-{os.getpid()}"
    run = tmp_path / "outputs" / "mnist1d" / f"torchrun-{run_id}"
    args = [*ELASTIC_ARGS, f"data.cache_dir={data_cache}"]
    logs = [tmp_path / "lost.log", tmp_path / "survivor.log", tmp_path / "back.log"]
    hooks = [f"{LOST_AT}:step:WAIT", f"{BACK_AT}:step:WAIT", ""]
    agents = []

    def start(node: int, i: int) -> None:
        agents.append(_agent(two_hosts, node, survivor, run_id, logs[i], args, hooks[i]))

    try:
        start(lost, 0)  # first: it waits for the survivor's store, so both join round 0
        start(survivor, 1)
        _until(lambda: len(_losses(run)) == LOST_AT, agents, logs, f"step {LOST_AT} at world 2")
        assert _plan(run)["world_size"] == 2, _plan(run)
        assert (run / "checkpoints" / "step-000000002.pt").exists()
        agents[0].kill()  # SIGKILL
        agents[0].wait(timeout=60)

        def alone() -> bool:
            steps = [r["step"] for r in _losses(run)]
            return _plan(run).get("world_size") == 1 and BACK_AT in steps

        _until(alone, agents[1:], logs, f"step {BACK_AT} at world size 1")
        plan = _plan(run)
        assert (plan["global_batch"], plan["world_size"], plan["steps"]) == (64, 1, 25), plan
        start(lost, 2)
        for agent, log in zip(agents[1:], logs[1:], strict=True):
            assert agent.wait(timeout=180) == 0, log.read_text()[-4000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()  # its workers die with it (launcher/cluster/spawn.py)
                agent.wait(timeout=60)
    said = "".join(log.read_text() for log in logs)  # rank 0 says what it resumed
    for step, ranks in ((2, 2), (BACK_AT, 1)):
        resumed = f"step {step} of 25 ({step * 64:,} samples consumed, saved on {ranks} rank(s))"
        assert resumed in said, said[-6000:]
    assert f"(elastic run {run_id} restarted)" in said  # rank 0's lock, left by a SIGKILL
    assert list(run.parent.iterdir()) == [run]  # one folder for the whole elastic run
    plan = _plan(run)
    assert (plan["global_batch"], plan["world_size"], plan["total_samples"]) == (64, 2, 1600)
    losses = _losses(run)  # every step once, in order, each of 64 samples
    assert [(r["step"], r["samples"]) for r in losses] == [(s, 64 * s) for s in range(1, 26)]
    assert (run / "model_final.pt").exists()
