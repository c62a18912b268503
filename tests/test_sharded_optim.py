"""LARS and LAMB on FSDP2-sharded parameters (`fully_shard`, DTensors sharded on dim 0) over 2
real gloo processes, against the same optimizer on the unsharded model with the same gradients.

The model's parameters shard unevenly (dim 0 of 7 over 2 ranks: 4 + 3 rows) and emptily (dim 0 of
1: rank 1 holds nothing). One process pair runs every case (module fixture `runs`); each rank
saves what it saw and the tests compare it here."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.optim.lamb import LAMB
from launcher.optim.lars import LARS

pytestmark = pytest.mark.slow  # one pair of real gloo processes (mp.spawn)

WORLD = 2
STEPS, MORE = 3, 2  # steps before the state dict is taken; steps after it is reloaded
# float32: the sharded norms sum the two slices' squares, the unsharded one all at once, so the
# trust ratios differ in the last bits: measured max |difference| 3e-8 (LAMB; 0 for LARS) on
# values of O(0.1..10)
RTOL, ATOL = 1e-6, 1e-7
LOCAL_ONLY_GAP = 100 * ATOL  # what norms of the local slices only get wrong (measured: > 1e-3)

CASES: dict[str, Any] = {
    "lars": lambda ps: LARS(ps, lr=0.1, momentum=0.9, trust_coefficient=0.02, eps=1e-8),
    "lars_nesterov": lambda ps: LARS(
        ps, lr=0.1, momentum=0.9, nesterov=True, trust_coefficient=0.01
    ),
    "lars_no_momentum": lambda ps: LARS(ps, lr=0.1, momentum=0.0, trust_coefficient=0.02),
    "lamb": lambda ps: LAMB(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-6),
}
ADAPTED_GROUPS = 2  # see _groups: the number of all-reduces one sharded step may make


def _model() -> nn.Module:
    """0.weight 7x5 and 0.bias 7 (4 + 3 rows), the LayerNorm's 7 + 7 (its bias starts at 0:
    ||w|| = 0), 2.weight 1x7 and 2.bias 1 (rank 1's slices are empty)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 1))


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Matrices (weight decay, adapted), 1-D params (other decay, adapted), a plain group."""
    p = dict(model.named_parameters())
    return [
        {"params": [p["0.weight"], p["2.weight"]], "weight_decay": 0.05},
        {"params": [p["1.weight"], p["1.bias"], p["2.bias"]], "weight_decay": 0.01},
        {"params": [p["0.bias"]], "weight_decay": 0.0, "adapt": False},
    ]


def _grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """The full gradients of `step` (the same on every rank); the LayerNorm weight's is 0 at the
    first step (||g|| = 0)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = {n: torch.randn(p.shape, generator=gen) * (step + 1) for n, p in model.named_parameters()}
    if step == 0:
        out["1.weight"].zero_()
    return out


def _set_grads(model: nn.Module, step: int) -> None:
    """`_grads` as `.grad`: sharded as the parameter (as FSDP2's reduce-scatter leaves them)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for (_, p), full in zip(model.named_parameters(), _grads(model, step).values(), strict=True):
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(full, p.device_mesh, p.placements)
        else:
            p.grad = full


def _sharded(mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (`.item()`, `bool(t)`, `if t`): on a
    GPU each waits for the device, which the optimizers must never do."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[tuple[int, int]]:
    """Apply the gradients of `steps`; (collectives, host reads) of each step."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts = []
    for t in steps:
        _set_grads(model, t)
        with CommDebugMode() as comm, _HostReads() as reads:
            opt.step()
        counts.append((comm.get_total_counts(), reads.count))
    return counts


def _worker(rank: int, store: str, out: str) -> None:
    """One rank: every case, sharded and not; saves its findings to `out`/rank<rank>.pt."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=600),  # a busy machine starts one rank long after the other
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (WORLD,))
    full = StateDictOptions(full_state_dict=True)
    found: dict[str, Any] = {}
    for name, make in CASES.items():
        ref = _model()
        ref_opt = make(_groups(ref))
        _steps(ref, ref_opt, range(STEPS))
        sharded = _sharded(mesh)
        opt = make(_groups(sharded))
        comms = _steps(sharded, opt, range(STEPS))
        shard_sizes = {n: p.to_local().shape[0] for n, p in sharded.named_parameters()}
        state_layouts = {
            (k, n): (type(v).__name__, getattr(v, "placements", None) == p.placements)
            for n, p in sharded.named_parameters()
            for k, v in opt.state.get(p, {}).items()
            if torch.is_tensor(v)
        }
        ref_params, params = _full(ref), _full(sharded)
        # (copies: the unsharded one holds the live state tensors, which the steps below change)
        ref_osd = copy.deepcopy(get_optimizer_state_dict(ref, ref_opt, options=full))
        osd = copy.deepcopy(get_optimizer_state_dict(sharded, opt, options=full))

        # the full state dict loads into a fresh sharded model and optimizer, which then go on
        # exactly as the original does
        resumed = _sharded(mesh)
        resumed_opt = make(_groups(resumed))
        set_model_state_dict(resumed, dict(params), options=full)  # (it swaps the dict's values)
        if osd["state"]:  # torch refuses a full state without tensors (SGD's without momentum)
            loaded = copy.deepcopy(osd)  # (it swaps this dict's values too)
            set_optimizer_state_dict(resumed, resumed_opt, loaded, options=full)
        _steps(sharded, opt, range(STEPS, STEPS + MORE))
        _steps(resumed, resumed_opt, range(STEPS, STEPS + MORE))
        _steps(ref, ref_opt, range(STEPS, STEPS + MORE))

        # norms of the local slices only: the same run with the all-reduce taken away
        local_only = _sharded(mesh)
        local_opt = make(_groups(local_only))
        all_reduce, dist.all_reduce = dist.all_reduce, lambda *a, **k: None
        try:
            _steps(local_only, local_opt, range(STEPS))
        finally:
            dist.all_reduce = all_reduce

        found[name] = {
            "ref_params": ref_params,
            "params": params,
            "comms": comms,
            "shard_sizes": shard_sizes,
            "state_layouts": state_layouts,
            "ref_osd": ref_osd,
            "osd": osd,
            "continued": _full(sharded),
            "resumed": _full(resumed),
            "ref_continued": _full(ref),
            "local_only": _full(local_only),
            "sharded_types": {n: isinstance(p, DTensor) for n, p in sharded.named_parameters()},
        }
    torch.save(found, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the 2 ranks found (one process pair for the whole module)."""
    out = tmp_path_factory.mktemp("sharded-optim")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")


def test_the_model_shards_unevenly_and_emptily(runs: list[dict[str, Any]]) -> None:
    """The layouts the other tests rely on: every parameter a DTensor, 7 rows as 4 + 3, and
    2.weight's / 2.bias's one row on rank 0 only."""
    sizes = [run["lars"]["shard_sizes"] for run in runs]
    assert all(all(run["lars"]["sharded_types"].values()) for run in runs)
    assert (sizes[0]["0.weight"], sizes[1]["0.weight"]) == (4, 3)
    assert (sizes[0]["1.bias"], sizes[1]["1.bias"]) == (4, 3)
    assert (sizes[0]["2.weight"], sizes[1]["2.weight"]) == (1, 0)
    assert (sizes[0]["2.bias"], sizes[1]["2.bias"]) == (1, 0)


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_unsharded(runs: list[dict[str, Any]], case: str) -> None:
    """After 3 steps (and 2 more), the sharded parameters equal the unsharded optimizer's, on
    both ranks, within float32 rounding; every parameter moved."""
    init = dict(_model().named_parameters())
    for run in runs:
        got = run[case]
        for key, ref_key in (("params", "ref_params"), ("continued", "ref_continued")):
            for name, want in got[ref_key].items():
                assert not torch.allclose(want, init[name].detach()), name
                _close(got[key][name], want, f"{key} {name}")


@pytest.mark.parametrize("case", CASES)
def test_one_all_reduce_per_adapted_group_no_host_reads(
    runs: list[dict[str, Any]], case: str
) -> None:
    """A sharded step makes one collective per group that adapts (the norms of all its tensors,
    weights' and gradients' or updates' together) and no other (the update runs on the slices),
    and reads no tensor value on the host (no GPU sync)."""
    for run in runs:
        assert run[case]["comms"] == [(ADAPTED_GROUPS, 0)] * STEPS


@pytest.mark.parametrize("case", CASES)
def test_local_norms_would_be_caught(runs: list[dict[str, Any]], case: str) -> None:
    """With the all-reduce taken away (each rank's trust ratio from its own slices' norms) the
    parameters are far from the unsharded optimizer's: the equality test above has teeth."""
    for run in runs:
        got = run[case]
        gap = max(
            (got["local_only"][n] - want).abs().max().item()
            for n, want in got["ref_params"].items()
        )
        assert gap > LOCAL_ONLY_GAP, gap


@pytest.mark.parametrize("case", CASES)
def test_full_state_dict_matches_unsharded(runs: list[dict[str, Any]], case: str) -> None:
    """get_optimizer_state_dict(full_state_dict=True) of the sharded optimizer gives the
    unsharded optimizer's full state (same keys, groups, steps; tensors within tolerance); the
    live state is DTensors laid out as the params; set_optimizer_state_dict loads the full state
    into a fresh sharded optimizer that continues bit for bit as the original."""
    for run in runs:
        got = run[case]
        osd, ref_osd = got["osd"], got["ref_osd"]
        assert osd["param_groups"] == ref_osd["param_groups"]
        assert osd["state"].keys() == ref_osd["state"].keys()
        assert bool(osd["state"]) == (case != "lars_no_momentum")
        for fqn, state in ref_osd["state"].items():
            assert osd["state"][fqn].keys() == state.keys(), fqn
            for key, want in state.items():
                if torch.is_tensor(want):
                    assert not hasattr(osd["state"][fqn][key], "placements"), (fqn, key)
                    _close(osd["state"][fqn][key], want, f"{fqn} {key}")
                else:
                    assert osd["state"][fqn][key] == want, (fqn, key)
        assert bool(got["state_layouts"]) == bool(ref_osd["state"])
        assert all(layout == ("DTensor", True) for layout in got["state_layouts"].values())
        for name, want in got["continued"].items():
            assert torch.equal(got["resumed"][name], want), name
