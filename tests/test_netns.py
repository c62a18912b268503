"""Two hosts joined by a real network path: two network namespaces and a veth pair, addresses
inside the namespaces only, one torchrun per "host" with the rendezvous on the first.

Needs root and iproute2 (skipped with the reason otherwise; CI runs it). Stated tolerance:
float64, 1e-10 absolute against one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import PARITY_ARGS, final_state, launcher_env, skip_or_fail

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
