"""Shuffling BN: keep the key encoder's BN statistics from leaking which key matches which query.

With BN computed over the same samples in both encoders, the model can "cheat" the pretext task
through batch statistics. MoCo shuffles the key batch across ranks before the key encoder and
restores the order after. On one process, SplitBatchNorm plus a local shuffle emulates this.

The DDP helpers assume every rank holds a batch of the same size (drop_last=True).
"""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

_local_only = False  # set by single_process()


def is_distributed() -> bool:
    """True when more than one process takes part, i.e. when gathering changes anything."""
    if _local_only:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def single_process() -> Iterator[None]:
    """Run a method's steps as if alone, even inside a process group: no collective is called
    (a rank's private measurement, e.g. the precision probe, must not wait on the others)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into `module` on every rank (no-op on one process).

    DDP only synchronises what it wraps; call this on the whole MoCo model so the key encoder and
    the queue start identical on every rank even if ranks were seeded differently.
    """
    if is_distributed():
        for t in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(t, src)


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """Concatenate `t` from all ranks along dim 0 (rank order). Carries no gradient."""
    if not is_distributed():
        return t
    return torch.cat(_all_gather(t), dim=0)


@torch.no_grad()
def batch_shuffle_ddp(views: list[Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Shuffle each view's batch across all ranks: returns this rank's share of every view
    after a permutation of all ranks' samples of that view ([V, B, ...]) and the permutations
    ([V, world x B]) that batch_unshuffle_ddp undoes.

    One all-gather brings every rank's views (the official builder gathers once per view and
    broadcasts rank 0's permutation: 3 collectives a view where this takes 1). Every rank draws
    the same permutations from `generator`, seeded alike on all ranks and called in lockstep."""
    world, rank, batch = dist.get_world_size(), dist.get_rank(), views[0].shape[0]
    gathered = _all_gather(torch.cat(views))  # per rank: its views one after the other
    perms = torch.stack([torch.randperm(world * batch, generator=generator) for _ in views])
    perms = perms.to(views[0].device)
    shares = []
    for v, perm in enumerate(perms):
        everyone = torch.cat([g[v * batch : (v + 1) * batch] for g in gathered])
        shares.append(everyone[perm.view(world, batch)[rank]])
    return torch.stack(shares), perms


@torch.no_grad()
def batch_unshuffle_ddp(outputs: Tensor, perms: Tensor) -> tuple[Tensor, Tensor]:
    """Undo batch_shuffle_ddp on per-sample outputs [V, B, ...]: returns this rank's rows in
    its original order ([V, B, ...]) and every rank's ([world x V x B, ...], rank by rank, each
    rank's views in order: what concat_all_gather of its outputs would give). One all-gather."""
    world, rank, batch = dist.get_world_size(), dist.get_rank(), outputs.shape[1]
    gathered = _all_gather(outputs.flatten(0, 1))
    restored = []
    for v, perm in enumerate(perms):
        shuffled = torch.cat([g[v * batch : (v + 1) * batch] for g in gathered])
        original = torch.empty_like(shuffled)
        original[perm] = shuffled  # shuffled position j holds sample perm[j]
        restored.append(original.view(world, batch, *original.shape[1:]))
    by_rank = torch.stack(restored, dim=1)  # [world, V, B, ...]
    return by_rank[rank], by_rank.flatten(0, 2)


def _all_gather(t: Tensor) -> list[Tensor]:
    t = t.contiguous()  # gloo needs dense, contiguous tensors
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return gathered


@torch.no_grad()
def batch_shuffle_single(x: Tensor) -> tuple[Tensor, Tensor]:
    """Single-process shuffle: (permuted batch, index that restores the original order)."""
    idx_shuffle = torch.randperm(x.shape[0], device=x.device)
    return x[idx_shuffle], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle_single(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Undo batch_shuffle_single."""
    return x[idx_unshuffle]


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are computed separately on `num_splits` sub-batches.

    Emulates per-GPU BN on one process (as in the official MoCo CIFAR-10 demo): split j holds
    the j-th contiguous block of N / num_splits samples (the demo interleaves, sample i in split
    i % num_splits; both are arbitrary partitions of a shuffled batch). Blocks are chunks that
    keep the batch's memory format, so a channels_last batch is never converted: folding the
    splits into channels cost two layout copies per layer, ~20% of a CPU step
    (bench/RESULTS.md). Running statistics are the average of the splits' running statistics;
    eval mode is plain BatchNorm2d.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        s = self.num_splits
        if x.shape[0] % s:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {s} equal BN splits")
        outs, means, variances = [], [], []
        for block in x.chunk(s):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(
                F.batch_norm(
                    block, mean, var, self.weight, self.bias, True, self.momentum, self.eps
                )
            )
            means.append(mean)
            variances.append(var)
        self.running_mean.copy_(torch.stack(means).mean(dim=0))
        self.running_var.copy_(torch.stack(variances).mean(dim=0))
        return torch.cat(outs)


WRAPPER_PARTS = frozenset({"module", "_orig_mod"})  # DDP's and torch.compile's inner attribute


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers, if any."""
    while isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, DistributedDataParallel) else module._orig_mod
    return module


def plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """state_dict() with the wrappers' path parts dropped, so a checkpoint written while parts
    are wrapped (DDP, torch.compile) loads into the unwrapped module."""
    return {
        ".".join(p for p in key.split(".") if p not in WRAPPER_PARTS): value
        for key, value in module.state_dict().items()
    }
