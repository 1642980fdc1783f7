"""Loss, momentum, queue and schedules against straightforward hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F

from moco import (
    KeyQueue,
    cosine_momentum,
    cosine_with_warmup,
    info_nce,
    momentum_update,
    step_schedule,
)


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_info_nce_matches_per_sample_reference() -> None:
    torch.manual_seed(0)
    n, c, k, t = 5, 8, 11, 0.07
    q, pos, negatives = _unit(n, c), _unit(n, c), _unit(k, c).T
    loss, logits = info_nce(q, pos, negatives, t)

    rows = []
    for i in range(n):
        row = [float(q[i] @ pos[i])] + [float(q[i] @ negatives[:, j]) for j in range(k)]
        rows.append(torch.tensor(row) / t)
    expected_logits = torch.stack(rows)
    expected_loss = sum(-torch.log_softmax(r, 0)[0] for r in rows) / n
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(loss, F.cross_entropy(expected_logits, torch.zeros(n).long()))


def test_info_nce_is_float32_for_bf16_inputs_under_autocast() -> None:
    q, pos, negatives = (_unit(4, 8).bfloat16(), _unit(4, 8).bfloat16(), _unit(16, 8).T.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce(q, pos, negatives, 0.1)
    assert loss.dtype == logits.dtype == torch.float32
    ref, _ = info_nce(q.float(), pos.float(), negatives.float(), 0.1)
    torch.testing.assert_close(loss, ref)


def test_momentum_update_matches_formula_per_parameter() -> None:
    torch.manual_seed(0)
    shapes = [(3, 4), (7,), (2, 3, 5)]
    key = [torch.randn(s) for s in shapes]
    query = [torch.randn(s) for s in shapes]
    m = 0.9
    expected = [m * k + (1 - m) * q for k, q in zip(key, query, strict=True)]
    momentum_update(key, query, m)
    for got, want in zip(key, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_momentum_update_rejects_mismatched_parameter_lists() -> None:
    with pytest.raises(ValueError):
        momentum_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.9)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_queue_init_is_normalised_float32_buffers() -> None:
    queue = KeyQueue(dim=6, size=10)
    assert queue.keys.shape == (6, 10) and queue.keys.dtype == torch.float32
    torch.testing.assert_close(queue.keys.norm(dim=0), torch.ones(10))
    assert queue.ptr.dtype == torch.long and queue.ptr.ndim == 0 and queue.size == 10
    assert set(queue.state_dict()) == {"keys", "ptr"}


@pytest.mark.parametrize(("size", "batch"), [(10, 4), (12, 4), (7, 7), (5, 1)])
def test_enqueue_matches_list_reference_with_wraparound(size: int, batch: int) -> None:
    torch.manual_seed(0)
    dim = 3
    queue = KeyQueue(dim, size)
    ref = [col.clone() for col in queue.keys.T]
    ref_ptr = 0
    for _ in range(7):
        keys = torch.randn(batch, dim)
        queue.enqueue(keys)
        for key in keys:
            ref[ref_ptr] = key
            ref_ptr = (ref_ptr + 1) % size
        torch.testing.assert_close(queue.keys, torch.stack(ref, dim=1))
        assert int(queue.ptr) == ref_ptr


def test_enqueue_casts_to_float32_and_rejects_oversized_batches() -> None:
    queue = KeyQueue(dim=4, size=6)
    queue.enqueue(torch.ones(2, 4, dtype=torch.bfloat16))
    assert queue.keys.dtype == torch.float32
    with pytest.raises(ValueError, match="queue of size 6"):
        queue.enqueue(torch.ones(7, 4))


def test_step_schedule_paper_milestones() -> None:
    assert step_schedule(0, [120, 160]) == 1.0
    assert step_schedule(119, [120, 160]) == 1.0
    assert step_schedule(120, [120, 160]) == pytest.approx(0.1)
    assert step_schedule(199, [120, 160]) == pytest.approx(0.01)


def test_cosine_with_warmup_shape_and_lambdalr() -> None:
    total, warmup = 100, 10
    assert cosine_with_warmup(0, total, warmup) == pytest.approx(0.1)
    assert cosine_with_warmup(9, total, warmup) == pytest.approx(1.0)
    assert cosine_with_warmup(10, total, warmup) == pytest.approx(1.0)
    assert cosine_with_warmup(55, total, warmup) == pytest.approx(0.5)
    assert cosine_with_warmup(total, total, warmup) == pytest.approx(0.0)
    assert cosine_with_warmup(30, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
