"""The per-worker MoCo training loop that Ray Train runs on every rank.

Ray starts the processes and the process group; this loop wraps only the query encoder in DDP
(the key encoder follows by EMA, so it needs no gradient sync), streams its share of the shards,
and reports one metrics row (plus a checkpoint from rank 0) per epoch.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from moco import MoCo, cosine_momentum, cosine_with_warmup, step_schedule
from moco.augment import BatchMoCoAugment, BatchTwoCrops, eval_transform
from moco.distributed import broadcast_module
from moco.knn import extract_features, knn_accuracy
from pipeline.config import Params
from pipeline.dataset import eval_loader, training_loader
from pipeline.encoder import EncoderSpec, load_encoder, save_encoder
from pipeline.errors import DivergedError
from pipeline.precision import ModelShape, resolve_precision

STATE_FILE = "state.pt"
QUEUE_FILE = "queue-rank{rank}.pt"  # each rank's queue, to check they stayed identical


@dataclass
class WorkerConfig:
    """What the driver hands every worker: the validated params and the resolved data layout."""

    params: dict[str, Any]
    train_urls: list[str]
    monitor_bank_urls: list[str]
    monitor_query_urls: list[str]
    num_classes: int
    steps_per_epoch: int


def build_model(params: Params, world_size: int) -> MoCo:
    m = params.model
    return MoCo.from_backbone(
        m.backbone,
        width=m.width,
        small_stem=m.small_stem,
        in_channels=m.in_channels,
        mean=m.mean,
        std=m.std,
        dim=m.dim,
        mlp=m.mlp,
        queue_size=params.moco.queue_size,
        momentum=params.moco.momentum,
        temperature=params.moco.temperature,
        symmetric=params.moco.symmetric,
        # Across ranks, real shuffle BN; on one process, the split-batch emulation.
        bn_splits=params.moco.bn_splits if world_size == 1 else 1,
    )


def lr_multiplier(params: Params, steps_per_epoch: int):
    """LambdaLR factor per optimizer step: cosine with warmup, or the paper's x0.1 steps."""
    t = params.train
    total = t.epochs * steps_per_epoch
    warmup = int(t.warmup_epochs * steps_per_epoch)
    if t.schedule == "cosine":
        return lambda step: cosine_with_warmup(step, total, warmup)
    milestones = [int(t.epochs * 0.6), int(t.epochs * 0.8)]
    return lambda step: step_schedule(step // steps_per_epoch, milestones)


def _autocast(params: Params, device: torch.device):
    if params.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def knn_monitor(
    backbone: torch.nn.Module, cfg: WorkerConfig, params: Params, device: torch.device
) -> float:
    """kNN top-1 of the current query backbone on small labelled subsets (cheap, every epoch)."""
    transform = eval_transform(params.model.image_size)
    batch = params.eval.batch_size

    def features(urls: list[str], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = itertools.islice(
            eval_loader(urls, transform=transform, batch_size=batch), math.ceil(limit / batch)
        )
        with _autocast(params, device):
            return extract_features(backbone, batches)

    bank, bank_labels = features(cfg.monitor_bank_urls, params.eval.monitor_bank)
    queries, labels = features(cfg.monitor_query_urls, params.eval.monitor_queries)
    return knn_accuracy(
        bank, bank_labels, queries, labels, cfg.num_classes, params.eval.knn_k, params.eval.knn_t
    )


def _save_checkpoint(directory: Path, model: MoCo, query_encoder, optimizer, scheduler, epoch):
    """Full training state for an exact resume (the queue and its pointer included)."""
    torch.save(
        {
            "encoder_q": query_encoder.state_dict(),
            "encoder_k": model.encoder_k.state_dict(),
            "queue": model.queue.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
        },
        directory / STATE_FILE,
    )


def _restore(model: MoCo, optimizer, scheduler, checkpoint: ray.train.Checkpoint) -> int:
    """Load a checkpoint written by _save_checkpoint (before DDP wrapping); returns the next
    epoch to run."""
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")
    model.encoder_q.load_state_dict(state["encoder_q"])
    model.encoder_k.load_state_dict(state["encoder_k"])
    model.queue.load_state_dict(state["queue"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1


def _warm_start(model: MoCo, location: str) -> None:
    """Start both encoders' backbones from an exported encoder (scheduled retraining)."""
    encoder, _ = load_encoder(location)
    weights = encoder.state_dict()
    model.encoder_q.backbone.load_state_dict(weights)
    model.encoder_k.backbone.load_state_dict(weights)


def _epoch(
    model: MoCo,
    batches,
    two_crops: BatchTwoCrops,
    optimizer,
    scheduler,
    params: Params,
    cfg: WorkerConfig,
    epoch: int,
    device: torch.device,
) -> dict[str, float]:
    """One pass over this rank's shards; returns the epoch's metrics row."""
    t = params.train
    total_steps = t.epochs * cfg.steps_per_epoch
    loss_sum, wait, started = 0.0, 0.0, time.perf_counter()
    fetched = started
    for step, images in enumerate(itertools.islice(batches, cfg.steps_per_epoch)):
        wait += time.perf_counter() - fetched
        im_q, im_k = two_crops(images.to(device, non_blocking=True))  # augmented on the device
        if params.moco.momentum_schedule == "cosine":
            global_step = epoch * cfg.steps_per_epoch + step
            model.momentum = cosine_momentum(params.moco.momentum, global_step, total_steps)
        with _autocast(params, device):
            loss = model(
                _to_device(im_q, device, t.channels_last), _to_device(im_k, device, t.channels_last)
            ).loss
        if not torch.isfinite(loss):
            raise DivergedError(
                f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr or raise "
                "moco.temperature — this run is failed and will not be promoted"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        fetched = time.perf_counter()
    elapsed = time.perf_counter() - started
    return {
        "epoch": epoch,
        "epochs_done": epoch + 1,  # Tune's clock: survives a restart, unlike its iteration count
        "loss": loss_sum / cfg.steps_per_epoch,
        "lr": scheduler.get_last_lr()[0],
        "momentum": model.momentum,
        "images_per_s": cfg.steps_per_epoch * t.global_batch / elapsed,
        "data_wait_fraction": wait / elapsed,
    }


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (train_loop_per_worker)."""
    cfg = WorkerConfig(**config)
    params = Params.model_validate(cfg.params)
    t = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    # auto -> bf16 | fp32 for this worker (may probe: before the seed, so weights do not change)
    precision = resolve_precision(t.precision, ModelShape.from_params(params, world), device)
    print(f"[pretrain] rank {rank}: {precision.precision} ({precision.reason})", flush=True)
    t.precision = precision.precision  # what _autocast reads from here on
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    model = build_model(params, world).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(),
        lr=t.lr * t.global_batch / 256,
        momentum=t.sgd_momentum,
        weight_decay=t.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(params, cfg.steps_per_epoch)
    )
    start_epoch = 0
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        start_epoch = _restore(model, optimizer, scheduler, checkpoint)
    elif t.init_from:
        _warm_start(model, t.init_from)
    query_encoder = model.encoder_q  # the plain module, for export and the kNN monitor
    if world > 1:
        broadcast_module(model)  # rank 0's key encoder and queue too, not only what DDP wraps
        model.encoder_q = DistributedDataParallel(model.encoder_q)
    if t.compile:
        model.encoder_q = torch.compile(model.encoder_q)

    two_crops = BatchTwoCrops(BatchMoCoAugment(params.model.image_size, params.moco.augmentation))
    for epoch in range(start_epoch, t.epochs):
        torch.manual_seed(t.seed + 1000 * epoch + rank)  # augmentations: reproducible per epoch
        model.train()
        batches = training_loader(
            cfg.train_urls,
            transform=None,  # raw uint8 batches: augmented as a batch, on the device
            raw_size=params.model.image_size,
            batch_size=t.batch_size,
            shuffle_buffer=t.shuffle_buffer,
            seed=t.seed,
            epoch=epoch,
            loader_workers=t.loader_workers,
        )
        metrics = _epoch(
            model, batches, two_crops, optimizer, scheduler, params, cfg, epoch, device
        )
        metrics["precision_bf16"] = float(t.precision == "bf16")  # the run's record of auto
        save = epoch == t.epochs - 1 or (epoch + 1) % t.checkpoint_every == 0
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if params.eval.monitor_bank and cfg.monitor_bank_urls:
                    metrics["knn_top1"] = knn_monitor(query_encoder.backbone, cfg, params, device)
                if save:
                    _save_checkpoint(Path(tmp), model, query_encoder, optimizer, scheduler, epoch)
                    spec = EncoderSpec.from_params(params.model)
                    save_encoder(model.export_encoder(), spec, tmp)
            if save:  # every rank adds its queue: Ray merges the folders, so they can be compared
                torch.save(model.queue.state_dict(), Path(tmp) / QUEUE_FILE.format(rank=rank))
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if save else None
            ray.train.report(metrics, checkpoint=checkpoint)
