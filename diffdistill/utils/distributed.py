"""What the one trainer needs to run on several processes (launched by ``accelerate launch`` or ``torchrun``).

The trainer reduces gradients itself instead of wrapping roles in ``DistributedDataParallel``: objectives call
their roles in many ways (several forwards per update, methods other than ``forward``, a frozen critic inside the
generator's graph, as in SiD and SIM), and DDP synchronises only what passes through its own ``forward``. After
the backward passes of an update (all micro-batches of gradient accumulation), each updated role's gradients are
averaged across processes in one flat all-reduce: exactly one synchronisation per update and role.

Randomness is tied to the sample, not to the process: micro-batch ``v`` of iteration ``step`` (``v = rank *
accumulation + k``) seeds torch's generators from ``(seed, step, phase, v)``, and takes slice ``v`` of the
iteration's global batch. Two processes at batch ``B`` therefore compute what one process computes with two
accumulated micro-batches of ``B``, and a resumed run at the same world size repeats the same draws.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def micro_seed(seed: int, step: int, phase: str, virtual_rank: int) -> int:
    """A 63-bit seed for one micro-batch of one update phase (``generator`` / ``critic``)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{phase}:{virtual_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def broadcast_parameters(modules: list[nn.Module]) -> None:
    """Rank 0's parameters and buffers to every process (a run starts from one model everywhere)."""
    if not is_distributed():
        return
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(params: list[Tensor]) -> None:
    """Average ``.grad`` of ``params`` across processes, in one flat all-reduce (a missing grad counts as 0)."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (so that all of them skip, or stop, together)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_true(flag: bool, device: torch.device) -> bool:
    return not all_true(not flag, device)


def mean_scalars(scalars: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each logged scalar over processes (every process logs the same keys)."""
    if not is_distributed() or not scalars:
        return scalars
    keys = sorted(scalars)
    t = torch.tensor([float(scalars[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def shard(n: int) -> tuple[int, int]:
    """This process's contiguous share ``[start, stop)`` of ``n`` items (all of them in one process)."""
    if not is_distributed():
        return 0, n
    world, rank = dist.get_world_size(), dist.get_rank()
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def gather_cat(part: Tensor) -> Tensor:
    """Every process's ``part`` concatenated in rank order, on every process (for per-sample evaluation)."""
    if not is_distributed():
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part.cpu())
    return torch.cat(parts)


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0
