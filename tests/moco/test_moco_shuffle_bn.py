"""Shuffle BN: single-process shuffle + SplitBatchNorm, and the DDP path on 2 gloo processes."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from moco import (
    BackboneSpec,
    MoCoV2,
    MoCoV2Config,
    SplitBatchNorm,
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    broadcast_module,
    concat_all_gather,
)

WORLD, BATCH, STEPS = 2, 4, 3
QUEUE = 20  # not a multiple of the global batch (8, or 16 symmetric): wraps mid-batch


def test_single_process_shuffle_round_trip() -> None:
    x = torch.arange(10.0).view(10, 1).expand(10, 3)
    shuffled, idx = batch_shuffle_single(x)
    assert sorted(shuffled[:, 0].tolist()) == list(range(10))
    torch.testing.assert_close(batch_unshuffle_single(shuffled, idx), x)


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2)
    assert concat_all_gather(x) is x


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batchnorm_equals_per_split_batchnorm(channels_last: bool) -> None:
    torch.manual_seed(0)
    splits, n, c = 2, 8, 4
    bn = SplitBatchNorm(c, num_splits=splits)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(n, c, 5, 5) * 3 + 1
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()

    expected = torch.empty_like(x)
    means, variances = [], []
    block = n // splits
    for j in range(splits):  # split j holds the j-th block of n / splits samples
        rm, rv = start_mean.clone(), start_var.clone()
        rows = slice(j * block, (j + 1) * block)
        expected[rows] = F.batch_norm(
            x[rows], rm, rv, bn.weight, bn.bias, True, bn.momentum, bn.eps
        )
        means.append(rm), variances.append(rv)

    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = bn(inp)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0))
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)

    bn.eval()
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(bn(x), ref)
    with pytest.raises(ValueError, match="equal BN splits"):
        bn.train()(torch.randn(7, c, 2, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_steps(rank: int, symmetric: bool) -> dict[str, object]:
    """STEPS MoCo steps with the query encoder in DDP; returns what must agree across ranks."""
    torch.manual_seed(rank)  # deliberately different init: broadcast_module must fix it
    spec = BackboneSpec("resnet18", in_channels=3, image_size=16, width=8)
    model = MoCoV2(spec, MoCoV2Config(dim=8, queue_size=QUEUE, symmetric=symmetric))
    broadcast_module(model)
    model.encoder_q = DistributedDataParallel(model.encoder_q)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1000 + rank)  # different data per rank
    keys = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=symmetric):
            out = model(torch.rand(BATCH, 3, 16, 16), torch.rand(BATCH, 3, 16, 16))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        keys.append(out.keys)
    return {
        "queue": model.queue.keys,
        "ptr": model.queue.ptr,
        "encoder_k": [p.detach() for p in model.encoder_k.parameters()],
        "encoder_q": [p.detach() for p in model.encoder_q.parameters()],
        "keys": keys,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        # two views of distinct rows per rank; a different generator seed draws other
        # permutations, the same seed the same ones on both ranks
        views = [torch.arange(BATCH * 3.0).view(BATCH, 3) + 100 * rank + 1000 * v for v in (0, 1)]
        shares, perms = batch_shuffle_ddp(views, torch.Generator().manual_seed(7))
        assert torch.equal(concat_all_gather(perms[None])[0], concat_all_gather(perms[None])[1])
        assert not torch.equal(perms[0], perms[1])  # each view its own permutation
        local, everyone = batch_unshuffle_ddp(shares, perms)
        assert torch.equal(local, torch.stack(views))  # back in this rank's order
        assert torch.equal(everyone, concat_all_gather(torch.cat(views)))
        for v in (0, 1):
            everything = concat_all_gather(views[v])
            assert torch.equal(everything[rank * BATCH : (rank + 1) * BATCH], views[v])
            rows = concat_all_gather(shares[v])[:, 0].tolist()
            assert sorted(rows) == sorted(everything[:, 0].tolist())  # a permutation of all
            assert rows != everything[:, 0].tolist()  # ... across ranks, not the identity

        results = {sym: _ddp_steps(rank, sym) for sym in (False, True)}  # symmetric in bf16
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_keep_queue_and_key_encoder_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for symmetric in (False, True):
        r0, r1 = (r[symmetric] for r in ranks)
        assert r0["queue"].dtype == torch.float32
        assert torch.equal(r0["queue"], r1["queue"])
        assert int(r0["ptr"]) == int(r1["ptr"])
        for name in ("encoder_k", "encoder_q"):
            assert all(torch.equal(a, b) for a, b in zip(r0[name], r1[name], strict=True))

        # every step enqueues all ranks' keys in rank order; the queue keeps the last QUEUE
        enqueued = torch.cat([torch.cat([r0["keys"][s], r1["keys"][s]]) for s in range(STEPS)])
        n = enqueued.shape[0]
        assert n > QUEUE, "the test should wrap around the queue"
        assert int(r0["ptr"]) == n % QUEUE
        for i in range(n - QUEUE, n):
            torch.testing.assert_close(r0["queue"][:, i % QUEUE], enqueued[i].float())
