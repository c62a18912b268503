"""FSDP2 backend: PyTorch's own sharding (`fully_shard`, DTensor parameters) run from the plan.

Why `fully_shard` directly rather than Accelerate's FSDP plugin: the loop, not a wrapper, owns
the step boundary (micro-steps, the flag gather, the deferred reduction below), and the plugin
adds its own accumulation and no-sync bookkeeping on top of the same four calls.

Sharding units ("the wrap policy"): each block of the model is one unit (`fully_shard` on it),
the root takes what is left. The blocks are the built-in models' BLOCKS (launcher/models: GPT's
transformer layers, ResNet's residual blocks, the MLP's and CNN's blocks) and, for a model of
your own, `model.checkpoint_blocks` (or the decoder layers a Transformers model declares in
`_no_split_modules`); a model naming none shards each module held in an nn.ModuleList (the usual
list of transformer blocks), and a model without one is a single unit.
Blocks wrapped for activation checkpointing are sharded with their wrapper.

Mixed precision is FSDP2's policy: float32 sharded parameters and optimizer state, parameters
all-gathered in `mixed_precision` for forward and backward, gradients reduce-scattered in
`reduce_dtype` (float32 by default).

Out-of-memory-safe steps ("deferred reduction"): FSDP2 all-gathers parameters inside forward and
reduce-scatters gradients inside backward, so a rank that runs out of memory mid-step would leave
the others waiting in a collective. With `plan.oom_recovery` every step therefore starts by
gathering each unit's parameters (`unshard`, every rank at the same point, before any forward),
runs its micro-steps with resharding and gradient sync off (no collective at all), agrees on the
flags, and only then either reduce-scatters the accumulated gradients through FSDP2's own
post-backward (dtype policy and divide factor as in a normal backward) or drops them on every
rank (`reset_iter_state`, FSDP2's recovery after an aborted forward/backward). The price: during a
step the parameters and gradients are held whole (ZeRO-1-like memory; the optimizer state stays
sharded); `trainer.oom_recovery=false` keeps FSDP2's full sharding with its in-backward reduction.
The reduction calls FSDP2's per-group post_backward and the root's final callback, private API of
torch 2.14, pinned by tests/test_fsdp.py against the plain FSDP2 path.

Checkpoints are sharded: every rank writes its shards of the model and optimizer state through
torch.distributed.checkpoint into the checkpoint's folder (launcher/checkpoint/files.py: atomic,
digest-checked), and loads them back re-split for the world size it runs on (elastic resume).
A whole checkpoint of another backend resumes here too (its tensors scattered into the shards);
model_final.pt holds the whole float32 state (gathered by the state-dict functions).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from launcher.backends.collectives import Collectives
from launcher.checkpoint.files import hash_files
from launcher.checkpoint.shards import SafePlanner, SafeReader, Unsafe
from launcher.config.execution import FsdpConfig
from launcher.config.schema import RunConfig, require_concrete
from launcher.models import blocks_of
from launcher.types.plan import BatchPlan

if TYPE_CHECKING:  # seconds to import: where a backend is built, not where shard_units is read
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.fsdp import FSDPModule

PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16}


class FsdpBackend(Collectives):
    def __init__(self, cfg: RunConfig, device: str) -> None:
        require_concrete(cfg.backend, cfg.trainer)
        assert isinstance(cfg.backend, FsdpConfig)  # the registry builds it for its name
        self.cfg, self.b = cfg, cfg.backend  # b: this backend's config section (backend.*)
        if device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            if "WORLD_SIZE" in os.environ:  # torchrun, accelerate launch, srun, trainer.devices
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            else:  # one plain process: a group of one, on a free port picked by the store
                dist.init_process_group(
                    backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1
                )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.deferred = False  # the OOM-safe path (plan.oom_recovery): set by prepare
        self._units: list[FSDPModule] = []  # the FSDP modules, root last
        self._names: list[list[str]] = []  # the optimizer's parameters by name, group by group
        self._pending = False  # a deferred step has gathered parameters and not reduced yet

    # ----------------------------------------------------------------------------- set-up
    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: BatchPlan
    ) -> tuple[torch.nn.Module, Any]:
        """Shard `model` unit by unit and point `optimizer` at the sharded parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        b = self.b
        param_dtype = PARAM_DTYPES[b.mixed_precision]
        # without a half parameter dtype, gradients reduce in the parameters' own (float64 too)
        reduce_dtype = torch.float32 if param_dtype and b.reduce_dtype == "float32" else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        model.to(self.device)
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        units = shard_units(model, blocks_of(self.cfg.model, model))
        if self.cfg.trainer.compile:
            _compile_units(model, units)
        self._units = [  # fully_shard gives back the module, its class made an FSDPModule
            fully_shard(
                unit, mesh=mesh, mp_policy=policy, reshard_after_forward=b.reshard_after_forward
            )
            for unit in units
        ]
        self._units.append(fully_shard(model, mesh=mesh, mp_policy=policy))
        sharded = dict(model.named_parameters())
        for group, group_names in zip(optimizer.param_groups, self._names, strict=True):
            group["params"] = [sharded[n] for n in group_names]
        self.deferred = plan.oom_recovery
        if self.deferred:
            for unit in self._units:
                unit.set_requires_gradient_sync(False, recurse=False)
                unit.set_reshard_after_backward(False, recurse=False)
        return model, optimizer

    def replan(self, model: torch.nn.Module, plan: BatchPlan) -> None:
        """Nothing to tell: the loop drives accumulation."""

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the policy casts floating inputs to the parameter dtype

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard changes the module's class in place

    # ----------------------------------------------------------------------------- a step
    def begin_deferred_step(self, model: torch.nn.Module) -> None:
        """Gather every unit's parameters (every rank, before any forward): the micro-steps
        that follow run no collective."""
        for unit in self._units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        self._pending = True

    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        if self.deferred:
            return nullcontext()  # gradient sync is off for the whole deferred step
        return _sync_off(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated

    def gradient_scale(self) -> float:
        return 1.0

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Deferred steps: reduce-scatter the accumulated gradients now (FSDP2's post-backward
        per parameter group, then the root's final callback, which waits for them)."""
        if not self._pending:
            return  # reduced inside the last backward
        for unit in reversed(self._units):
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                group.reduce_grads = group.all_reduce_grads = True
                group.reshard_after_backward = True
                group.post_backward()
                group.reduce_grads = group.all_reduce_grads = False
                group.reshard_after_backward = False
        root = _sharded(model)._get_fsdp_state()
        root._state_ctx.is_last_backward = True
        root._root_post_backward_final_callback()
        self._end_deferred()

    def step(
        self, model: torch.nn.Module, optimizer: Any, norms: torch.Tensor | None = None
    ) -> None:
        if self.cfg.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self, model: torch.nn.Module, optimizer: Any) -> None:
        """Discard a step's gradients on this rank: FSDP2's per-iteration state reset (it may
        have stopped mid-forward), the unsharded accumulations freed, the parameters resharded."""
        if self._pending:
            _sharded(model).reset_iter_state()
            for unit in self._units:
                for group in unit._get_fsdp_state()._fsdp_param_groups:
                    for param in group.fsdp_params:
                        param.unsharded_accumulated_grad = None
                        if hasattr(param, "_unsharded_param"):
                            param._unsharded_param.grad = None
                unit.reshard()
            self._end_deferred()
        optimizer.zero_grad(set_to_none=True)

    def _end_deferred(self) -> None:
        for unit in self._units[:-1]:
            unit.set_reshard_after_forward(self.b.reshard_after_forward, recurse=False)
        self._units[-1].set_reshard_after_forward(False, recurse=False)  # the root's default
        self._pending = False

    # ----------------------------------------------------------------------------- state
    def gathered(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        return nullcontext()  # state_dict gathers what it needs itself

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole float32 state on rank 0 (every rank takes part; the others get {})."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full())
        return cast(dict[str, torch.Tensor], state)  # full_state_dict: plain tensors

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """Not asked for: this backend's checkpoints are sharded (save_shards)."""
        raise NotImplementedError("backend=fsdp writes sharded checkpoints (save_shards)")

    def save_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path
    ) -> dict[str, list[Any]] | None:
        """Every rank writes its shards of the model and optimizer state into `folder`
        (torch.distributed.checkpoint, fsynced) and hashes its own files; rank 0 gets the whole
        manifest (launcher/checkpoint/files.py), the others None. A rank that cannot write
        (disk full) makes every rank raise."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import save

        try:
            save(self._sharded_state(model, optimizer), checkpoint_id=folder)
        except CheckpointException as exc:  # a BaseException holding every rank's error
            raise _os_error(exc) from None
        mine = sorted(folder.glob(f"__{self.rank}_*"))
        if self.rank == 0:
            mine.append(folder / ".metadata")
        manifests = self.gather_objects(hash_files(mine))
        return {k: v for m in manifests for k, v in m.items()} if self.rank == 0 else None

    def load_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, files: list[str]
    ) -> None:
        """A sharded checkpoint into this rank's shards; saved on another number of ranks, the
        shards are re-split by torch.distributed.checkpoint (elastic resume). `files`: the
        manifest's names, the only files its metadata may point at; nothing it holds is
        unpickled as code (checkpoint/shards.py)."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.checkpoint.state_dict_loader import load

        state = self._sharded_state(model, optimizer)
        try:
            load(state, storage_reader=SafeReader(folder, files), planner=SafePlanner())
        except CheckpointException as exc:  # a BaseException holding every rank's error
            raise Unsafe(f"{folder} cannot be loaded safely ({_first_error(exc)})") from None
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])

    @staticmethod
    def _sharded_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }

    def load_state(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        weights: dict[str, Any],
        opt_state: dict[str, Any],
    ) -> None:
        """A checkpoint's whole tensors (every rank read it) scattered into this rank's shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        if not opt_state["state"]:  # plain SGD keeps none (and torch cannot load an empty one)
            return
        order = [_fqn(n) for group in self._names for n in group]
        groups = []
        for group, names in zip(opt_state["param_groups"], self._names, strict=True):
            groups.append({**group, "params": [_fqn(n) for n in names]})
        by_name: dict[str, Any] = {  # torch's OptimizerStateType, keyed by parameter name
            "state": {order[int(i)]: s for i, s in opt_state["state"].items()},
            "param_groups": groups,
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _errors(exc: BaseException) -> list[BaseException]:
    """What each rank raised inside a CheckpointException, with their causes."""
    found = []
    for failure in getattr(exc, "failures", {}).values():
        e = failure[0] if isinstance(failure, tuple) else failure
        while e is not None:
            found.append(e)
            e = e.__cause__ or e.__context__
    return found


def _first_error(exc: BaseException) -> str:
    errors = _errors(exc)
    return str(errors[0]).strip().splitlines()[0] if errors else type(exc).__name__


def _os_error(exc: BaseException) -> OSError:
    """The OSError (disk full) some rank's write raised, or one saying what went wrong."""
    for e in _errors(exc):
        if isinstance(e, OSError):
            return e
    return OSError(None, str(exc).strip().splitlines()[0] if str(exc).strip() else "failed")


def _fqn(name: str) -> str:
    """A parameter's name as the state-dict functions (and the plain module) spell it: without
    the activation-checkpointing wrapper's and torch.compile's inserted module names."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full() -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _sharded(model: torch.nn.Module) -> FSDPModule:
    """The model `prepare` sharded, as the FSDPModule fully_shard made its class."""
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(model, FSDPModule), type(model)
    return model


@contextmanager
def _sync_off(model: torch.nn.Module) -> Iterator[None]:
    """A micro-step that is not the last of its step: gradients accumulate unreduced."""
    sharded = _sharded(model)
    sharded.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        sharded.set_requires_gradient_sync(True)


def _compile_units(model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
    """trainer.compile under FSDP2: each unit's forward compiled on its own, as torchtitan does
    (the units' all-gathers and reduce-scatters run in FSDP2's hooks, outside the graphs), in
    place so the state-dict keys stay the plain module's. The whole-model compile the job set up
    is undone: its graph would stop at FSDP2's dynamo-disabled hooks, and a torch.nn block such
    as nn.TransformerEncoderLayer is only traced when its own forward is compiled."""
    model._compiled_call_impl = None
    for unit in units:
        unit.forward = torch.compile(unit.forward)


def shard_units(model: torch.nn.Module, blocks: tuple[type, ...]) -> list[torch.nn.Module]:
    """The modules sharded as one unit each, in module order (the wrap policy, module
    docstring): instances of `blocks` (with their activation-checkpointing wrapper), else the
    members of every nn.ModuleList, else none (the root alone)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    if blocks:

        def inner(m: torch.nn.Module) -> torch.nn.Module:
            return m._checkpoint_wrapped_module if isinstance(m, CheckpointWrapper) else m

        return _outermost([m for m in model.modules() if isinstance(inner(m), blocks)])
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return _outermost([child for lst in lists for child in lst.children()])


def _outermost(units: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """`units` without those nested inside another unit (one unit owns each parameter)."""
    inside = {id(m) for u in units for m in u.modules() if m is not u}
    return [u for u in units if id(u) not in inside]
