"""MoCo v3 against references computed another way: the loss by loops, the EMA by hand, the
gathered-key loss on two gloo processes against one process on the concatenated batch."""

import copy
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moco.backbones import BackboneSpec
from moco.distributed import broadcast_module
from moco.lars import LARS
from moco.methods.mocov3 import MoCoV3, MoCoV3Config, contrastive_loss

T = 0.2
RESNET = BackboneSpec("resnet10", 1, 28, (0.5,), (0.25,), width=8, stem_stride=2)
VIT = BackboneSpec("vit_tiny", 1, 28, (0.5,), (0.25,), patch_size=7)
SMALL = MoCoV3Config(dim=16, mlp_dim=32)


def _drift_query(model: MoCoV3) -> None:
    """Move the query encoder off its copy: at init the EMA of two equal encoders is a no-op."""
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _ctr_by_loops(q: np.ndarray, k: np.ndarray, t: float, offset: int = 0) -> float:
    """Mean over rows of -log softmax(cos(q_i, k_j) / t)[i + offset], times 2t."""
    total = 0.0
    for i, qi in enumerate(q):
        logits = [qi @ kj / (np.linalg.norm(qi) * np.linalg.norm(kj)) / t for kj in k]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_z - logits[i + offset]
    return total / len(q) * 2 * t


def test_contrastive_loss_matches_the_loop_derivation() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss, logits, labels = contrastive_loss(torch.tensor(q), torch.tensor(k), T)
    assert loss.dtype == torch.float32  # computed in float32 whatever the input
    assert logits.shape == (6, 6) and labels.tolist() == list(range(6))
    assert loss.item() == pytest.approx(_ctr_by_loops(q, k, T), rel=1e-5)


def test_forward_is_the_symmetrised_loss_with_the_updated_key_encoder() -> None:
    torch.manual_seed(0)
    model = MoCoV3(RESNET, SMALL, world_size=1)
    _drift_query(model)
    model.on_step(0.3)
    m = model.momentum
    x1, x2 = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    # reference: the key encoder EMA-updated by hand from copies, outputs taken before forward
    q_model, k_model = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    q_path = [*q_model.backbone.parameters(), *q_model.projector.parameters()]
    with torch.no_grad():
        for pk, pq in zip(k_model.parameters(), q_path, strict=True):
            pk.copy_(m * pk + (1 - m) * pq)
        q1, q2 = q_model(x1).numpy(), q_model(x2).numpy()
        k1, k2 = k_model(x1).numpy(), k_model(x2).numpy()
    expected = _ctr_by_loops(q1, k2, T) + _ctr_by_loops(q2, k1, T)

    out = model(x1, x2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert out.logits.shape == (8, 8) and out.labels.tolist() == list(range(8))


def test_no_gradient_reaches_the_key_encoder_and_it_moves_only_by_ema() -> None:
    torch.manual_seed(0)
    model = MoCoV3(RESNET, SMALL, world_size=1)
    opt = model.optimizer(lr=0.5, weight_decay=1e-4, sgd_momentum=0.9)
    trainable = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in trainable for p in model.encoder_k.parameters())
    assert all(not p.requires_grad for p in model.encoder_k.parameters())

    _drift_query(model)
    model.on_step(0.0)
    k0 = [p.detach().clone() for p in model.encoder_k.parameters()]
    q = model.encoder_q
    q0 = [p.detach().clone() for p in [*q.backbone.parameters(), *q.projector.parameters()]]
    assert not torch.equal(k0[0], q0[0])
    out = model(torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28))
    out.loss.backward()
    opt.step()

    assert all(p.grad is None for p in model.encoder_k.parameters())
    for pk, k_before, q_before in zip(model.encoder_k.parameters(), k0, q0, strict=True):
        torch.testing.assert_close(pk, 0.99 * k_before + 0.01 * q_before)
    assert any(not torch.equal(p, b) for p, b in zip(q.backbone.parameters(), q0, strict=False))


def test_momentum_schedule_end_points() -> None:
    model = MoCoV3(RESNET, MoCoV3Config(dim=16, mlp_dim=32, momentum=0.99), world_size=1)
    assert model.momentum == 0.99  # before any on_step
    for progress, expected in [(0.0, 0.99), (0.5, 0.995), (1.0, 1.0)]:
        model.on_step(progress)
        assert model.momentum == pytest.approx(expected, abs=1e-12)
    model.on_step(0.25)
    assert model.momentum == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)


def _linears_and_last(seq: nn.Sequential) -> tuple[int, nn.Module]:
    return sum(isinstance(m, nn.Linear) for m in seq), seq[-1]


def test_heads_and_optimizer_follow_the_official_builder() -> None:
    resnet, vit = MoCoV3(RESNET, SMALL, world_size=1), MoCoV3(VIT, SMALL, world_size=1)
    n, last = _linears_and_last(resnet.encoder_q.projector)
    assert n == 2 and isinstance(last, nn.BatchNorm1d) and not last.affine
    n, last = _linears_and_last(resnet.encoder_q.predictor)
    assert n == 2 and isinstance(last, nn.Linear)  # ResNet predictor: no output BN
    n, last = _linears_and_last(vit.encoder_q.projector)
    assert n == 3 and isinstance(last, nn.BatchNorm1d) and not last.affine
    n, last = _linears_and_last(vit.encoder_q.predictor)
    assert n == 2 and isinstance(last, nn.BatchNorm1d) and not last.affine

    assert isinstance(resnet.optimizer(1.0, 1e-6, 0.9), LARS)
    adamw = vit.optimizer(1e-3, 0.1, 0.9)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(vit.encoder_q.backbone[1].patch_embed.weight) not in params
    forced = MoCoV3(VIT, MoCoV3Config(dim=16, mlp_dim=32, optimizer="lars"), world_size=1)
    assert isinstance(forced.optimizer(1.0, 1e-6, 0.9), LARS)


def test_export_encoder_is_a_detached_eval_copy_of_the_query_backbone() -> None:
    torch.manual_seed(0)
    model = MoCoV3(RESNET, SMALL, world_size=1)
    model.ddp_wrap(lambda m: m)  # identity "wrap": nothing else changes on one CPU process
    enc = model.export_encoder()
    assert not enc.training and model.training
    x = torch.rand(4, 1, 28, 28)
    model.encoder_q.backbone.eval()
    torch.testing.assert_close(enc(x), model.encoder_q.backbone(x))
    with torch.no_grad():
        next(enc.parameters()).add_(1.0)
    assert not torch.equal(next(enc.parameters()), next(model.encoder_q.parameters()))
    assert model.extra_state() == {}
    with pytest.raises(ValueError, match="no extra state"):
        model.load_extra_state({"queue": torch.zeros(1)})


def test_ddp_wrap_syncs_bn_once_off_cpu_and_never_on_cpu() -> None:
    """On an accelerator with several ranks BN becomes SyncBatchNorm (moco-v3's setup); the
    "meta" device stands in for a GPU here. gloo on CPU has no SyncBatchNorm: BN stays."""
    cpu = MoCoV3(RESNET, SMALL, world_size=2)
    cpu.ddp_wrap(lambda m: m)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())

    off_cpu = MoCoV3(RESNET, SMALL, world_size=2).to("meta")
    params = list(off_cpu.parameters())
    off_cpu.ddp_wrap(lambda m: m)
    bns = [m for m in off_cpu.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert all(a is b for a, b in zip(off_cpu.parameters(), params, strict=True))  # optimiser's
    off_cpu.ddp_wrap(lambda m: m)  # a second wrap (torch.compile after DDP) converts nothing
    assert [m for m in off_cpu.modules() if isinstance(m, nn.SyncBatchNorm)] == bns

    alone = MoCoV3(RESNET, SMALL, world_size=1).to("meta")
    alone.ddp_wrap(lambda m: m)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in alone.modules())


def test_config_refuses_an_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="auto, lars or adamw, not 'sgd'"):
        MoCoV3Config(optimizer="sgd")  # type: ignore[arg-type]


def test_loss_falls_on_random_images() -> None:
    """32 fixed random images, two noisy views each: the encoder learns to tell them apart."""
    torch.manual_seed(0)
    images = torch.rand(32, 1, 28, 28)
    model = MoCoV3(RESNET, SMALL, world_size=1)
    opt = model.optimizer(lr=1.0, weight_decay=1e-6, sgd_momentum=0.9)
    losses = []
    steps = 30
    for step in range(steps):
        model.on_step(step / steps)
        v1 = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
        v2 = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
        loss = model(v1, v2).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, losses


# --- two real processes -----------------------------------------------------------------------

WORLD, N = 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, q_all: torch.Tensor, k_all: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        q = q_all[rank * N : (rank + 1) * N].clone().requires_grad_(True)
        loss, logits, labels = contrastive_loss(q, k_all[rank * N : (rank + 1) * N], T)
        loss.backward()

        # a few DDP steps of the whole method keep every rank's encoders identical
        torch.manual_seed(rank)  # different init per rank: broadcast_module must fix it
        model = MoCoV3(RESNET, SMALL, world_size=WORLD)
        broadcast_module(model)
        model.ddp_wrap(DistributedDataParallel)
        opt = model.optimizer(lr=1.0, weight_decay=1e-6, sgd_momentum=0.9)
        torch.manual_seed(100 + rank)  # different data per rank
        for step in range(2):
            model.on_step(step / 2)
            out = model(torch.rand(N, 1, 28, 28), torch.rand(N, 1, 28, 28))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        torch.save(
            {
                "loss": loss.detach(),
                "logits": logits.detach(),
                "labels": labels,
                "grad": q.grad,
                "step_labels": out.labels,
                "params": [p.detach() for p in model.parameters()],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_gathered_keys_on_two_processes_equal_one_process_on_the_whole_batch(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    q_all, k_all = torch.randn(WORLD * N, 8), torch.randn(WORLD * N, 8)
    mp.spawn(_worker, args=(_free_port(), q_all, k_all, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    q_ref = q_all.clone().requires_grad_(True)
    loss_ref, logits_ref, labels_ref = contrastive_loss(q_ref, k_all, T)
    loss_ref.backward()
    # each rank's loss is the mean over its rows: their average is the whole batch's loss
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss_ref)
    for r, res in enumerate(ranks):
        rows = slice(r * N, (r + 1) * N)
        torch.testing.assert_close(res["logits"], logits_ref[rows])
        assert res["labels"].tolist() == labels_ref[rows].tolist()  # arange(N) + N * rank
        assert res["step_labels"].tolist() == [N * r + i for i in range(N)]
        # DDP averages gradients over ranks: rank r's gradient / WORLD is the whole batch's
        torch.testing.assert_close(res["grad"] / WORLD, q_ref.grad[rows])
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
