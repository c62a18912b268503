"""Topology from each launcher's environment, trainer.devices, and the cluster-shape checks."""

from __future__ import annotations

import json

import pytest

from launcher.cluster.topology import Topology, from_env, local_processes, resolve, slurm_env
from launcher.config.compose import compose_run
from launcher.errors import ConfigError

SRUN_TASK = {  # rank 3 of `srun --nodes=2 --ntasks-per-node=2`, as Slurm 22.05 sets it
    "SLURM_JOB_ID": "41",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "20041",
}


def _groups(overrides: list[str]):
    cfg = compose_run(overrides)
    return cfg.trainer, cfg.cluster


def test_srun_task_gets_torch_variables_from_slurm() -> None:
    assert slurm_env(SRUN_TASK) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "20041",
    }
    t = from_env(SRUN_TASK, cuda=False)
    assert (t.world_size, t.rank, t.local_rank, t.local_world_size, t.nodes) == (4, 3, 1, 2, 2)
    assert t.started and t.source == "srun in Slurm job 41"
    exported = {**SRUN_TASK, **slurm_env(SRUN_TASK)}  # as launch() leaves os.environ
    assert from_env(exported, cuda=False) == t


@pytest.mark.parametrize(
    "env",
    [
        {},  # a plain process
        {"SLURM_JOB_ID": "41", "SLURM_NNODES": "2"},  # the batch shell: no step variables
        {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"},
        {**SRUN_TASK, "WORLD_SIZE": "16", "RANK": "5"},  # torchrun inside srun: torch's win
    ],
)
def test_slurm_variables_apply_only_to_multi_task_srun_steps(env) -> None:
    assert slurm_env(env) == {}


def test_srun_rendezvous_defaults_to_the_first_node_and_a_port_from_the_job_id(
    monkeypatch,
) -> None:
    env = {k: v for k, v in SRUN_TASK.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[7-8]"}
    asked = []
    got = slurm_env(env, address=lambda e: asked.append(e["SLURM_STEP_NODELIST"]) or "10.1.2.7")
    assert (got["MASTER_ADDR"], got["MASTER_PORT"], asked) == ("10.1.2.7", "23456", ["gpu[7-8]"])
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: one clear line
    with pytest.raises(ConfigError, match=r"MASTER_ADDR is not set and scontrol cannot name"):
        slurm_env(env)
    with pytest.raises(ConfigError, match=r"unevenly over the nodes .*=2,1\)"):
        slurm_env({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"})


@pytest.mark.parametrize(
    ("env", "source", "local"),
    [
        ({}, "a single process", 1),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"},
         "torchrun / accelerate launch", 2),
        ({"WORLD_SIZE": "4", "LOCAL_SIZE": "4"}, "the deepspeed launcher", 4),
        ({"WORLD_SIZE": "2", "LAUNCHER_SPAWNED": "1", "TORCHELASTIC_RUN_ID": "x"},
         "trainer.devices", 2),
    ],
)  # fmt: skip
def test_source_and_local_world_size(env, source, local) -> None:
    t = from_env(env, cuda=False)
    assert (t.source, t.local_world_size) == (source, local)


def test_world_size_must_be_a_multiple_of_the_processes_per_node() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE=3 is not a multiple of the 2"):
        from_env({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}, cuda=False)


ONE = Topology(1, 0, 0, 1, "cpu")
GPU_BOX = Topology(1, 0, 0, 1, "cuda")


@pytest.mark.parametrize(
    ("overrides", "launched", "gpus", "workers"),
    [
        ([], ONE, 0, 0),  # CPU, auto: this process trains
        (["trainer.devices=2"], ONE, 0, 2),  # CPU: N gloo workers
        ([], GPU_BOX, 8, 8),  # auto: every visible GPU
        (["cluster=a100x8"], GPU_BOX, 8, 8),  # auto: the declared devices_per_node
        (["cluster=h100x256"], GPU_BOX, 8, 0),  # several nodes: torchrun/srun start them
        (["cluster=a100x8"], GPU_BOX, 4, 0),  # too few GPUs: resolve() refuses the shape
        (["cluster.nodes=1", "cluster.devices_per_node=2", "cluster.device=cpu"], ONE, 0, 2),
        (["trainer.devices=2", "plan_only=true"], ONE, 0, 2),  # plans for them, starts none
        ([], Topology(2, 0, 0, 2, "cpu", "torchrun", True), 0, 0),  # already launched
    ],
)
def test_local_processes(overrides, launched, gpus, workers) -> None:
    assert local_processes(*_groups(overrides), launched, gpus) == workers


def test_local_processes_refuse_what_cannot_be() -> None:
    with pytest.raises(ConfigError, match=r"trainer.devices=4: this machine has 2 visible CUDA"):
        local_processes(*_groups(["trainer.devices=4"]), GPU_BOX, 2)
    torchrun = Topology(4, 0, 0, 2, "cpu", "torchrun / accelerate launch", True)
    with pytest.raises(ConfigError, match=r"trainer.devices=8: torchrun / accelerate launch "):
        local_processes(*_groups(["trainer.devices=8"]), torchrun, 0)


def test_a_slurm_allocation_of_another_shape_than_the_cluster_is_refused() -> None:
    """Slurm gave 2 nodes x 1 task, the config expects 1 node x 8 devices: one clear line."""
    cfg = compose_run(["cluster=a100x8", "cluster.device=cpu"])
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}
    got = from_env({**env, "SLURM_JOB_ID": "7"}, cuda=False)
    with pytest.raises(ConfigError) as err:
        resolve(cfg.cluster, got, plan_only=False)
    assert str(err.value).startswith(
        "cluster='a100x8': expects 1 node(s) x 8 device(s) per node = 8, but torchrun / "
        "accelerate launch in Slurm job 7 started 2 node(s) x 1 process(es) per node = 2"
    )
    same_world = Topology(8, 0, 0, 4, "cpu", "srun", True)  # 2 x 4 is not 1 x 8 either
    with pytest.raises(ConfigError, match="started 2 node"):
        resolve(cfg.cluster, same_world, plan_only=False)
    assert resolve(cfg.cluster, Topology(8, 3, 3, 8, "cpu", "srun", True), False).rank == 3


def test_plan_only_plans_for_the_devices_it_would_start(tmp_path, monkeypatch, capsys) -> None:
    """The dry run is the real run: trainer.devices=3 under plan_only plans world size 3, so a
    batch the real run would refuse is refused here too (issue 19)."""
    from launcher.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["plan_only=true", "trainer.devices=3", "memory.probe=false", "trainer.cpu_threads=1"]
    assert main([*base, "global_batch=384", "run_dir=ok"]) == 0
    plan = json.loads((tmp_path / "ok" / "plan.json").read_text())
    assert (plan["world_size"], plan["per_device_batch"]) == (3, 128)
    assert "trainer.devices" in plan["reasons"]["world_size"]
    capsys.readouterr()
    assert main([*base, "global_batch=512", "run_dir=bad"]) == 2
    assert "not divisible by the world size 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
