"""Process group, 1-D data-parallel mesh, and FSDP2 wrapping of the draft.

The whole draft is one FSDP2 unit (``fully_shard`` on the root, or ``replicate`` for DDP-like
all-reduce): a one-layer drafter gains nothing from per-layer sharding, and a single unit means one
all-gather per forward and one gradient reduction per optimizer step, however many TTT steps reuse
the layer. The frozen target embedding is an ignored parameter: replicated, never gathered,
never reduced, and not stored in checkpoints (it is read from the target).

``training.dtype=bfloat16`` computes in bf16 with fp32 parameters (the master weights) and fp32
gradient reduction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from spec_core.config import TrainingConfig
from spec_core.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(tcfg: TrainingConfig, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (env://): gloo on CPU, nccl on CUDA."""
    use_cuda = torch.cuda.is_available() and tcfg.backend != "gloo"
    backend = tcfg.backend if tcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("'training.backend' is nccl but no CUDA device is visible; use gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _restart_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=backend, timeout=timeout, store=store, rank=rank, world_size=world
            )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _restart_store(timeout: timedelta):
    """After a torchrun restart, the agent's store under a key prefix of this attempt; else None.

    torch's static rendezvous keeps one agent store across restarts while its workers assume a
    fresh one, so restarted ranks would read the dead ranks' gloo/NCCL addresses and fail to
    connect. Every rank of one node agrees on the attempt number (one agent restarts them all),
    which is why restarts are single-node only (``launch_training``)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"specflow/attempt_{attempt}", agent)


def build_mesh(info: DistInfo) -> DeviceMesh:
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def compute_dtype(tcfg: TrainingConfig) -> torch.dtype:
    return torch.bfloat16 if tcfg.dtype == "bfloat16" else torch.float32


def parallelize(
    model: nn.Module, mesh: DeviceMesh, tcfg: TrainingConfig, frozen: set[nn.Parameter]
) -> nn.Module:
    """Wrap ``model`` in place as one FSDP2 unit (full_shard) or replicate unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = compute_dtype(tcfg)
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,
    )
    if tcfg.fsdp_strategy == "replicate":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(model, mesh=mesh, mp_policy=mp_policy, ignored_params=frozen)
    else:
        fully_shard(model, mesh=mesh, mp_policy=mp_policy, ignored_params=frozen)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients only on the last micro-batch of an accumulation window."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor
