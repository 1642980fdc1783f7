"""A checkpoint restores exactly what it held: the method (encoders, queue and pointer), its
extra state, optimizer, schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from pipeline.config import load_params
from pipeline.method import build_model
from pipeline.train_worker import EXTRA_FILE, _restore, _save_checkpoint, lr_multiplier


def _training_state(seed: int):
    torch.manual_seed(seed)
    params = load_params(
        None, ["model.width=4", "method.queue_size=64", "train.batch_size=8", "train.num_workers=1"]
    )
    model = build_model(params, world_size=1)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(params, 10))
    return model, optimizer, scheduler


@pytest.mark.parametrize(
    ("saved_step", "goes_on_at"),
    [(10, (5, 0)), (3, (4, 3))],  # the end of epoch 4 (10 steps), or 3 steps into it
)
def test_restore_gives_back_the_saved_state(
    tmp_path: Path, saved_step: int, goes_on_at: tuple[int, int]
) -> None:
    model, optimizer, scheduler = _training_state(seed=0)
    for _ in range(3):
        images = torch.rand(8, 1, 16, 16)
        loss = model(images, images.flip(-1)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    _save_checkpoint(tmp_path, model, optimizer, scheduler, epoch=4, step=saved_step)
    torch.save(model.extra_state(), tmp_path / EXTRA_FILE.format(rank=0))

    fresh, fresh_optimizer, fresh_scheduler = _training_state(seed=1)
    position = _restore(
        fresh, fresh_optimizer, fresh_scheduler, Checkpoint.from_directory(tmp_path), 10
    )

    assert position == goes_on_at
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert int(fresh.queue.ptr) == int(model.queue.ptr) == 24
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, state in saved["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
