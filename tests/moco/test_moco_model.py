"""The MoCo module: gradients, EMA, queue bookkeeping, symmetric loss, bf16 and export."""

import pytest
import torch
import torch.nn.functional as F

from moco import BackboneSpec, MoCoV2, MoCoV2Config, info_nce

BATCH, SIZE, DIM, QUEUE = 8, 16, 16, 32
SPEC = BackboneSpec("resnet18", in_channels=3, image_size=SIZE, width=8)


def moco_v2(spec: BackboneSpec = SPEC, **settings) -> MoCoV2:
    return MoCoV2(spec, MoCoV2Config(**settings))


@pytest.fixture
def tiny_moco() -> MoCoV2:
    """resnet18 at width 8 on 16 px: a full MoCo step takes milliseconds on 2 CPUs."""
    torch.manual_seed(0)
    return moco_v2(dim=DIM, queue_size=QUEUE, momentum=0.9)


@pytest.fixture
def views() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.rand(BATCH, 3, SIZE, SIZE), torch.rand(BATCH, 3, SIZE, SIZE)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_key_encoder_gets_no_gradient_and_moves_only_by_ema(tiny_moco: MoCoV2, views) -> None:
    model, (x1, x2) = tiny_moco, views
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())

    model(x1, x2).loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())

    k_before, q_before = _params(model.encoder_k), _params(model.encoder_q)
    opt.step()
    q_after_step = _params(model.encoder_q)
    assert not _same(q_before, q_after_step)
    assert _same(k_before, _params(model.encoder_k)), "the optimiser must not touch encoder_k"

    model(x1, x2)
    m = model.momentum
    for k_old, q, k_new in zip(k_before, q_after_step, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(k_new, m * k_old + (1 - m) * q)


def test_forward_contrasts_against_the_queue_then_enqueues(tiny_moco: MoCoV2, views) -> None:
    model, (x1, x2) = tiny_moco, views
    queue_before = model.queue.keys.clone()
    out = model(x1, x2)

    assert out.logits.shape == (BATCH, 1 + QUEUE)
    assert out.keys.shape == (BATCH, DIM)
    torch.testing.assert_close(out.keys.norm(dim=1), torch.ones(BATCH))
    torch.testing.assert_close(model.queue.keys[:, :BATCH], out.keys.T)
    torch.testing.assert_close(model.queue.keys[:, BATCH:], queue_before[:, BATCH:])
    assert int(model.queue.ptr) == BATCH

    # the loss used the queue as it was before this step's keys were enqueued
    q = model.queries(x1)
    loss, _ = info_nce(q, out.keys, queue_before, model.temperature)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)


def test_keys_are_unshuffled_back_to_input_order(tiny_moco: MoCoV2, views) -> None:
    """In eval mode BN is per-sample, so shuffled keys must equal unshuffled ones row by row."""
    model, (x1, _) = tiny_moco, views
    model.eval()
    expected = F.normalize(model.encoder_k(x1), dim=1)
    torch.testing.assert_close(model.keys(x1)[0][0], expected)


def test_symmetric_loss_and_enqueue(views) -> None:
    torch.manual_seed(0)
    model = moco_v2(dim=DIM, queue_size=QUEUE, symmetric=True)
    x1, x2 = views
    model.eval()  # deterministic keys, so we can recompute the reference
    queue_before = model.queue.keys.clone()
    out = model(x1, x2)
    (k1, k2), enqueued = model.keys(x1, x2)
    torch.testing.assert_close(enqueued, torch.cat([k1, k2]))
    q1, q2 = model.queries(x1), model.queries(x2)
    expected = 0.5 * (
        info_nce(q1, k2, queue_before, model.temperature)[0]
        + info_nce(q2, k1, queue_before, model.temperature)[0]
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-4)
    assert out.logits.shape == (2 * BATCH, 1 + QUEUE)
    torch.testing.assert_close(model.queue.keys[:, : 2 * BATCH], torch.cat([k1, k2]).T)
    assert int(model.queue.ptr) == 2 * BATCH


def test_bf16_autocast_channels_last_with_split_bn(views) -> None:
    torch.manual_seed(0)
    model = moco_v2(dim=DIM, queue_size=QUEUE, bn_splits=2)
    model = model.to(memory_format=torch.channels_last)
    x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x1, x2)
    out.loss.backward()
    assert out.loss.dtype == out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert model.queue.keys.dtype == torch.float32
    assert out.keys.dtype == torch.float32
    torch.testing.assert_close(model.queue.keys[:, :BATCH], out.keys.T)


def test_momentum_is_settable_per_step(tiny_moco: MoCoV2, views) -> None:
    tiny_moco.momentum = 1.0
    k_before = _params(tiny_moco.encoder_k)
    with torch.no_grad():
        for p in tiny_moco.encoder_q.parameters():
            p.add_(1.0)
    tiny_moco(*views)
    assert _same(k_before, _params(tiny_moco.encoder_k))


def test_state_dict_round_trip_restores_queue(tiny_moco: MoCoV2, views) -> None:
    tiny_moco(*views)
    state = tiny_moco.state_dict()
    assert {"queue.keys", "queue.ptr"} <= set(state)
    torch.manual_seed(5)
    fresh = moco_v2(dim=DIM, queue_size=QUEUE)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue.keys, tiny_moco.queue.keys)
    assert int(fresh.queue.ptr) == BATCH


def test_export_encoder_is_a_detached_backbone_copy(tiny_moco: MoCoV2) -> None:
    encoder = tiny_moco.export_encoder()
    assert not encoder.training and tiny_moco.training
    assert encoder(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 64)  # width 8 -> 512 * 8 / 64
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    assert not torch.equal(
        next(encoder.parameters()), next(tiny_moco.encoder_q.backbone.parameters())
    )


@pytest.mark.parametrize("mlp", [True, False])
def test_from_backbone_grayscale_with_normalisation(mlp: bool) -> None:
    spec = BackboneSpec("resnet18", 1, SIZE, mean=(0.5,), std=(0.25,), width=8)
    model = moco_v2(spec, dim=8, mlp=mlp, queue_size=16)
    x = torch.rand(4, 1, SIZE, SIZE)
    out = model(x, x)
    assert out.logits.shape == (4, 17)
