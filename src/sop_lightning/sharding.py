"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for student and teacher, through Lightning's
``ModelParallelStrategy`` (ARCHITECTURE.md, distributed training).

Both networks get the same policy, so every teacher parameter is sharded exactly like the student
parameter of the same name and the EMA runs on local shards with no communication. The units: each
transformer block, the prototype layer when there is one (the losses call it outside the network's
forward), and the network (patch embedding, tokens, final norm, projection head; k-NN features also go
through its forward). The objectives' state (banks, centers, anchor sets) lives outside both networks and
stays replicated: it is kept identical by its own all-gathers and all-reduces.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["shard_network", "shards_line_up", "full_tensor", "reshard", "is_sharded"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (differentiable all-gather), or ``t`` itself."""
    DTensor = _dtensor_type()
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (a view: in-place updates reach the parameter), or ``t``."""
    DTensor = _dtensor_type()
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_network(network: nn.Module, mesh, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` the blocks, the prototypes (if any) and the network on ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for block in network.backbone.vit.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if getattr(network, "prototypes", None) is not None:
        fully_shard(network.prototypes, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard_after_forward)


def shards_line_up(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of the teacher parameters whose shard differs from the student's (placements, mesh or local
    shape); empty when the EMA can run shard by shard."""
    DTensor = _dtensor_type()
    student_params = dict(student.named_parameters())
    bad = []
    for name, t in teacher.named_parameters():
        s = student_params.get(name)
        if s is None:
            bad.append(f"{name}: not in the student")
            continue
        if isinstance(t, DTensor) != isinstance(s, DTensor):
            bad.append(f"{name}: sharded in one network only")
        elif isinstance(t, DTensor) and (
            t.placements != s.placements or t.device_mesh != s.device_mesh or t.to_local().shape != s.to_local().shape
        ):
            bad.append(f"{name}: teacher {t.placements} {tuple(t.to_local().shape)}, student {s.placements} "
                       f"{tuple(s.to_local().shape)}")  # fmt: skip
    return bad


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 module (the root keeps them after a forward, expecting a
    backward; the teacher has none)."""
    if is_sharded(module):
        module.reshard()


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    return [local_tensor(t) for t in tensors]


@torch.no_grad()
def sum_over_shards_(values: Tensor, tensors: list[Tensor]) -> Tensor:
    """All-reduce (sum) ``values`` over the process group of the first sharded tensor in ``tensors``."""
    DTensor = _dtensor_type()
    sharded = [t for t in tensors if DTensor is not None and isinstance(t, DTensor)]
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(values, group=sharded[0].device_mesh.get_group())
    return values
