"""A worker's training steps run in the precision it resolved: under bf16 autocast when the
worker's train.precision says bf16, in plain fp32 otherwise (the worker writes its resolution
there before training; pipeline/precision.py decides it)."""

from __future__ import annotations

import pytest
import torch

from moco.augment import BatchTwoCrops
from pipeline.config import load_params
from pipeline.method import build_augment, build_model
from pipeline.train_worker import WorkerConfig, _epoch

STEPS = 2


class NoCheckpoints:
    """The Checkpointer's per-step hook, without Ray."""

    def after_step(self, epoch: int, step: int) -> None:
        pass


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_the_training_step_runs_in_the_resolved_precision(
    precision: str, dtype: torch.dtype
) -> None:
    params = load_params(
        None,
        [
            "model.width=4",
            "model.image_size=16",
            "method.queue_size=16",
            "train.batch_size=8",
            "train.channels_last=false",
            f"train.precision={precision}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(params, world_size=1)
    optimizer = model.optimizer(0.01, 0.0, 0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = WorkerConfig(params.model_dump(), [], [], [], 10, STEPS)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    seen: list[tuple[bool, torch.dtype]] = []

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    with torch.nn.modules.module.register_module_forward_hook(record):
        row = _epoch(
            model,
            iter([images] * STEPS),
            BatchTwoCrops(build_augment(params)),
            optimizer,
            scheduler,
            params,
            cfg,
            0,
            torch.device("cpu"),
            0,
            NoCheckpoints(),
        )
    assert seen and set(seen) == {(precision == "bf16", dtype)}
    assert row["precision_bf16"] == float(precision == "bf16")  # what MLflow records
    assert row["loss"] > 0
