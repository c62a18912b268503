"""DeepSpeed backend: the plan run by `deepspeed.initialize` directly (ZeRO 0-3, bf16/fp16).

The loop owns the step boundary (`managed_gradient_accumulation: false`): one `engine.backward`
per micro-batch with the loop's own loss normalisation (`scale_wrt_gas=False`), one
`engine.step()` per optimizer step. Under ZeRO 0/1 backward then runs no collective at all
(gradients are reduced inside `step()`), which is what lets a step be dropped on every rank after
an out-of-memory error; ZeRO 2/3 reduce inside backward. The launcher's optimizer (SGD, AdamW,
LARS, LAMB) is the client optimizer, so nothing is JIT-compiled; DeepSpeed's fused CUDA
optimizers are opt-in (`backend.fused_optimizer`).

DeepSpeed ships no type information: the engine (the prepared model, which the methods below
take as `model`), its optimizer and what its functions return are Any here, typed where they are
handed on.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from launcher.backends.collectives import Collectives
from launcher.backends.ds_config import ds_config
from launcher.config.execution import DeepSpeedConfig
from launcher.config.schema import RunConfig
from launcher.planning.rules import checkpointing
from launcher.types.plan import BatchPlan


class DeepSpeedBackend(Collectives):
    def __init__(self, cfg: RunConfig, device: str) -> None:
        import deepspeed

        assert isinstance(cfg.backend, DeepSpeedConfig)  # the registry builds it for its name
        self.b = cfg.backend  # this backend's config section (backend.*)
        if device == "cpu":
            # the shared-memory all-reduce op is JIT-compiled C++ (~50 s on first use); gloo
            # does the job on CPU. Private switch, checked by the tests (no compile, no stall).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        kwargs: dict[str, Any] = {}
        if "WORLD_SIZE" not in os.environ:  # one plain process: no launcher, no MPI to discover
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
            kwargs = {"auto_mpi_discovery": False, "rank": 0, "world_size": 1}
            kwargs["init_method"] = "tcp://127.0.0.1:0"  # a free port, picked by the store
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", **kwargs)
        self.cfg = cfg
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.engine: Any = None  # the DeepSpeedEngine `prepare` makes (untyped)

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: BatchPlan
    ) -> tuple[torch.nn.Module, Any]:
        import deepspeed

        config = ds_config(self.cfg, plan, self.device.type)
        # the parameters in checkpoint order
        self._groups: list[list[torch.Tensor]] = [list(g["params"]) for g in optimizer.param_groups]
        kwargs: dict[str, Any]
        if "optimizer" in config:  # DeepSpeed builds its fused optimizer over our param groups
            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"]}
                for g in optimizer.param_groups
            ]
            kwargs = {"model_parameters": groups}
        else:
            kwargs = {"optimizer": optimizer}
        self.engine, opt, _, _ = deepspeed.initialize(model=model, config=config, **kwargs)
        return self.engine, opt

    def replan(self, model: Any, plan: BatchPlan) -> None:
        """Tell the engine the new micro-batch and accumulation (its sample counters use them)."""
        model.set_train_micro_batch_size(plan.micro_batch)
        model.set_train_batch_size(plan.global_batch)

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """bf16/fp16 modes hold the module in half precision: its inputs must match."""
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        b = self.b
        return dtype if b.autocast else half.get(b.mixed_precision, dtype)

    def unwrap(self, model: Any) -> torch.nn.Module:
        module: torch.nn.Module = model.module
        return module

    def gathered(self, model: Any) -> AbstractContextManager[None]:
        """Under ZeRO 3 every rank holds a shard: gather the full parameters for reading."""
        if self.b.zero_stage < 3:
            return nullcontext()
        import deepspeed

        gathered: AbstractContextManager[None] = deepspeed.zero.GatheredParameters(
            list(model.module.parameters())
        )
        return gathered

    def state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """The module's state with the float32 master weights of bf16/fp16 modes (collective
        under ZeRO 2/3, so every rank calls it, inside `gathered`)."""
        from deepspeed.utils import safe_get_full_fp32_param

        master = {}
        for p in model.module.parameters():
            full = safe_get_full_fp32_param(p)  # ZeRO 1-3 and their bf16 optimizer
            if full is not None and p.numel():
                master[p.data_ptr()] = full.detach().cpu()
        opt = model.optimizer  # ZeRO 0 in bf16/fp16: float32 copies, per tensor or flat (fused)
        if not master and hasattr(opt, "fp16_groups"):
            from torch._utils import _unflatten_dense_tensors

            copies = getattr(opt, "fp32_groups", None) or [
                _unflatten_dense_tensors(flat, params)  # type: ignore[no-untyped-call]
                for flat, params in zip(opt.fp32_groups_flat, opt.fp16_groups, strict=True)
            ]
            for params, fulls in zip(opt.fp16_groups, copies, strict=True):
                for p, full in zip(params, fulls, strict=True):
                    master[p.data_ptr()] = full.detach().cpu()
        state = model.module.state_dict()
        return {k: master.get(v.data_ptr(), v) if v.numel() else v for k, v in state.items()}

    def _sharded(self) -> bool:
        """ZeRO 1-3: optimizer state in flat shards, read and written through DeepSpeed's
        safe_get/set_full_* functions; ZeRO 0 holds a plain torch optimizer (what the plan's
        `checkpoints` row allows is exactly these two cases)."""
        on, why = checkpointing(self.cfg.checkpoint, self.cfg.backend)
        assert on, why
        return self.b.zero_stage > 0

    @staticmethod
    def _link_state(optimizer: Any) -> None:
        """Point every parameter's fragment at the shards' optimizer state. DeepSpeed links them
        once, after stepping the first param group, when a lazily created torch state (SGD
        momentum, Adam moments) exists for that group only; relink (private API, tested)."""
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()

    def optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """torch's state-dict format over the launcher's param groups, tensors whole."""
        if not self._sharded():
            whole: dict[str, Any] = model.optimizer.state_dict()
            return whole
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.b.zero_stage < 3:
            self._link_state(optimizer)
        sample = next(s for s in optimizer.optimizer.state.values() if s)
        keys = sorted(k for k, v in sample.items() if v.dim() > 0)
        scalars = {k: v.detach().cpu().clone() for k, v in sample.items() if v.dim() == 0}
        state, groups, i = {}, [], 0
        for group in self._groups:
            groups.append({"params": list(range(i, i + len(group)))})
            for p in group:  # a collective per tensor under ZeRO 2/3: every rank runs it
                state[i] = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
                state[i].update(scalars)
                i += 1
        return {"state": state, "param_groups": groups}

    def load_state(
        self, model: Any, optimizer: Any, weights: dict[str, Any], opt_state: dict[str, Any]
    ) -> None:
        if not self._sharded():
            model.module.load_state_dict(weights)
            model.optimizer.load_state_dict(opt_state)
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        first = opt_state["state"][0]
        scalars = {k: v.to(self.device) for k, v in first.items() if v.dim() == 0}
        if self.b.zero_stage == 3:  # create the sub-groups' state, as a step would
            for flat in optimizer.fp32_partitioned_groups_flat:
                state = {k: torch.zeros_like(flat) for k, v in first.items() if v.dim()}
                optimizer.optimizer.state[flat] = state | {k: v.clone() for k, v in scalars.items()}
        else:  # ZeRO 1/2 create and link it in their first step: take one that changes nothing
            lrs = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = 0.0
            zero = sum((p * 0).sum() for p in model.module.parameters())
            model.backward(zero, scale_wrt_gas=False)
            model.step()
            for g, lr in zip(optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
            self._link_state(optimizer)
            for flat_state in optimizer.optimizer.state.values():
                flat_state.update({k: v.clone() for k, v in scalars.items()})
        params = [p for group in self._groups for p in group]
        with self.gathered(model):  # parameters whole, so the state dict's tensors are theirs
            names = {v.data_ptr(): k for k, v in model.module.state_dict().items() if v.numel()}
            keys = [names[p.data_ptr()] for p in params]
        for i, (p, key) in enumerate(zip(params, keys, strict=True)):
            if self.b.zero_stage == 3:
                _set_zero3_partition(optimizer, p, weights[key], None)
            else:
                safe_set_full_fp32_param(p, weights[key].to(self.device))
            for k, v in opt_state["state"][i].items():
                if v.dim() and self.b.zero_stage == 3:
                    _set_zero3_partition(optimizer, p, v, k)
                elif v.dim():
                    safe_set_full_optimizer_state(p, v.to(self.device), k)
        # last (the warm step wrote the old masters into the module); ZeRO 3: rank 0's copy
        with deepspeed.zero.GatheredParameters(list(model.module.parameters()), modifier_rank=0):
            model.module.load_state_dict(weights)

    def save_shards(self, model: Any, optimizer: Any, folder: Path) -> dict[str, list[Any]] | None:
        raise NotImplementedError("backend=deepspeed writes whole checkpoints (optimizer_state)")

    def load_shards(self, model: Any, optimizer: Any, folder: Path, files: list[str]) -> None:
        raise NotImplementedError("backend=deepspeed loads whole checkpoints (load_state)")

    def begin_deferred_step(self, model: Any) -> None:
        """Nothing: no collective runs before the gradient reduction."""

    def no_sync(self, model: Any) -> AbstractContextManager[None]:
        return nullcontext()  # ZeRO 0/1 reduce in step(); ZeRO 2/3 partition in backward

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop normalised the loss already

    def gradient_scale(self) -> float:
        return 1.0  # the noise scale is not measured here (plan.noise_measurement)

    def reduce_gradients(self, model: Any) -> None:
        """Nothing here: `engine.step()` reduces (ZeRO 0/1) or finalises (ZeRO 2/3)."""

    def step(self, model: Any, optimizer: Any, norms: torch.Tensor | None = None) -> None:
        model.step()  # clips, steps, zeroes the gradients

    def drop_gradients(self, model: Any, optimizer: Any) -> None:
        optimizer.zero_grad()  # the engine's optimizer: also its own accumulation buffers


def _set_zero3_partition(optimizer: Any, param: Any, value: torch.Tensor, key: str | None) -> None:
    """This rank's part of a whole float32 tensor (`key`: an optimizer state, None: the master
    weight) into its ZeRO 3 partition. DeepSpeed 0.19.8's safe_set_full_* reads past the end of
    the last rank's padded partition when the size does not divide by the world size."""
    part, _ = optimizer._get_fp32_opt_state_partition(param, False, optim_state_key=key)
    start = part.numel() * optimizer._get_param_partition_rank(param)
    chunk = value.flatten()[start : start + part.numel()]
    part.data[: chunk.numel()].copy_(chunk.to(part.device))
