"""The per-worker training loop that Ray Train runs on every rank, for any method (moco.methods).

Ray starts the processes and the process group; this loop lets the method wrap the parts that
get gradients in DDP (a key encoder follows by EMA, so it needs none), streams its share of the
shards, and reports one metrics row (plus a checkpoint from rank 0) per epoch, with more checkpoints
inside the epoch (train.checkpoint_every_steps / _minutes) so a lost worker costs minutes.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from torch.nn.parallel import DistributedDataParallel
from webdataset.utils import make_seed

from moco import Method, cosine_with_warmup, step_schedule
from moco.augment import BatchTwoCrops
from moco.distributed import broadcast_module, plain_state_dict
from pipeline.config import Params
from pipeline.dataset import DecodedShards, decode_batch, training_loader
from pipeline.encoder import EncoderSpec, check_warm_start, load_encoder, save_encoder
from pipeline.epoch_reports import STEP_KEY
from pipeline.errors import DivergedError
from pipeline.method import build_augment, build_model
from pipeline.monitor import KnnMonitor
from pipeline.precision import ModelShape, precision_cache_path, resolve_precision

STATE_FILE = "state.pt"
# each rank's Method.extra_state() (MoCo v2: its queue, so the ranks' queues can be compared)
EXTRA_FILE = "extra-rank{rank}.pt"
# The ranks agree on the clock (a collective, ~1 ms on 2 busy CPUs) every this many steps only:
# next to a 20 ms GPU step, every step would cost a few percent.
CLOCK_EVERY_STEPS = 10


@dataclass
class WorkerConfig:
    """What the driver hands every worker: the validated params and the resolved data layout."""

    params: dict[str, Any]
    train_urls: list[str]
    monitor_bank_urls: list[str]
    monitor_query_urls: list[str]
    num_classes: int
    steps_per_epoch: int
    run_id: str = ""  # the MLflow run: each node's first worker logs the node's system metrics


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


def _save_checkpoint(
    directory: Path, model: Method, optimizer, scheduler, epoch: int, step: int
) -> None:
    """Full training state for a resume (the method's extra state is each rank's own file),
    `step` steps into `epoch` (steps_per_epoch at the epoch's end). The model's state is saved
    without DDP / compile wrappers, so it loads into a freshly built method."""
    torch.save(
        {
            "model": plain_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
        },
        directory / STATE_FILE,
    )


def _restore(
    model: Method,
    optimizer,
    scheduler,
    checkpoint: ray.train.Checkpoint,
    steps_per_epoch: int,
    rank: int = 0,
) -> tuple[int, int]:
    """Load a checkpoint written by _save_checkpoint (before DDP wrapping); returns where to go
    on: (epoch, steps of it already done)."""
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")
        extra = Path(directory) / EXTRA_FILE.format(rank=rank)
        if not extra.exists():  # a rank this run has that the checkpointed one had not
            extra = Path(directory) / EXTRA_FILE.format(rank=0)
        model.load_state_dict(state["model"])
        model.load_extra_state(torch.load(extra, weights_only=True, map_location="cpu"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = state.get("step", steps_per_epoch)  # checkpoints from before mid-epoch ones: ends
    return (state["epoch"], step) if step < steps_per_epoch else (state["epoch"] + 1, 0)


def _fresh_seed(seed: int, start_step: int) -> int:
    """The seed of an epoch that starts at `start_step`: the seed itself from the start, else a
    fresh one derived from both (see Checkpointer on what a resumed epoch reads)."""
    return seed if start_step == 0 else make_seed(seed, start_step)


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank: ranks' clocks differ, and ray.train.report must be called
    by all of them or by none."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


@dataclass
class Checkpointer:
    """Reports to Ray Train, with a checkpoint at epoch ends (train.checkpoint_every) and inside
    epochs (every train.checkpoint_every_steps steps and/or train.checkpoint_every_minutes).

    A mid-epoch checkpoint holds the same state as an epoch's plus the step within the epoch.
    Resumed from it, the epoch runs its remaining steps with the LR schedule, momentum, queue
    and optimizer where they were; the stream cannot be replayed from that point, so those
    steps read a freshly seeded shuffle of the rank's shards (some images of the epoch are then
    seen twice and others not at all)."""

    model: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: Params
    steps_per_epoch: int
    rank: int
    device: torch.device
    last_saved: float = field(default_factory=time.monotonic)

    def report(self, metrics: dict[str, Any], epoch: int, step: int | None) -> None:
        """ray.train.report on every rank; with `step`, a checkpoint `step` steps into `epoch`:
        rank 0 writes the state and the encoder, every rank its extra state (Ray merges the
        folders, so the ranks' queues can be compared)."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if step is not None:
                if self.rank == 0:
                    _save_checkpoint(
                        Path(tmp), self.model, self.optimizer, self.scheduler, epoch, step
                    )
                    spec = EncoderSpec.from_params(self.params)
                    save_encoder(self.model.export_encoder(), spec, tmp)
                extra = self.model.extra_state()
                torch.save(extra, Path(tmp) / EXTRA_FILE.format(rank=self.rank))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                self.last_saved = time.monotonic()
            ray.train.report(metrics, checkpoint=checkpoint)

    def after_step(self, epoch: int, step: int) -> None:
        """Called on every rank after `step` steps of `epoch`: a mid-epoch checkpoint if due
        (the epoch's last step is left to the epoch-end report)."""
        if step < self.steps_per_epoch and self._due(step):
            self.report({"epoch": epoch, STEP_KEY: step}, epoch, step)

    def _due(self, step: int) -> bool:
        t = self.params.train
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
            return True
        if not t.checkpoint_every_minutes or step % CLOCK_EVERY_STEPS:
            return False
        late = time.monotonic() - self.last_saved >= 60 * t.checkpoint_every_minutes
        return _rank0_decides(late, self.device)


def _warm_start(model: Method, params: Params, location: str) -> None:
    """Start the method's backbones from an exported encoder (scheduled retraining): the
    exported weights become the query backbone, and the method's export/EMA copies follow."""
    encoder, spec = load_encoder(location)
    check_warm_start(EncoderSpec.from_params(params), spec, location)
    weights = encoder.state_dict()
    for name, module in model.named_modules():
        if name.endswith("backbone"):  # encoder_q.backbone, encoder_k.backbone, ...
            module.load_state_dict(weights)


def _epoch(
    model: Method,
    batches,
    views: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    optimizer,
    scheduler,
    params: Params,
    cfg: WorkerConfig,
    epoch: int,
    device: torch.device,
    start_step: int,
    checkpointer: Checkpointer,
) -> dict[str, float]:
    """One pass over this rank's shards (the steps after `start_step`, when resumed inside the
    epoch); returns the epoch's metrics row."""
    t = params.train
    total_steps = t.epochs * cfg.steps_per_epoch
    steps = cfg.steps_per_epoch - start_step
    loss_sum, wait, started = 0.0, 0.0, time.perf_counter()
    fetched = started
    for step, images in enumerate(itertools.islice(batches, steps), start=start_step):
        wait += time.perf_counter() - fetched
        im_q, im_k = views(images)  # augmented on the device
        model.on_step((epoch * cfg.steps_per_epoch + step) / total_steps)
        with _autocast(params, device):
            loss = model(
                _to_device(im_q, device, t.channels_last), _to_device(im_k, device, t.channels_last)
            ).loss
        if not torch.isfinite(loss):
            raise DivergedError(
                f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr or raise "
                "method.temperature — this run is failed and will not be promoted"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        checkpointer.after_step(epoch, step + 1)
        fetched = time.perf_counter()
    elapsed = time.perf_counter() - started
    row = {
        "epoch": epoch,
        "epochs_done": epoch + 1,  # Tune's clock: survives a restart, unlike its iteration count
        "loss": loss_sum / steps,
        "lr": scheduler.get_last_lr()[0],
        **model.epoch_metrics(),
        "images_per_s": steps * t.global_batch / elapsed,
        "data_wait_fraction": wait / elapsed,
        "precision_bf16": float(t.precision == "bf16"),  # the run's record of what auto chose
    }
    if start_step:  # the run's record that a lost worker was survived inside this epoch
        row["resumed_at_step"] = start_step
    return row


def decodes_on_device(params: Params, device: torch.device) -> bool:
    """train.gpu_decode on a CUDA worker: the loader passes encoded images, the GPU decodes."""
    return params.train.gpu_decode and device.type == "cuda"


def views_on_device(
    params: Params, device: torch.device
) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batch -> the two augmented views on the device: uint8 images copied there,
    or (decodes_on_device) the batch's encoded images decoded there."""
    two_crops = BatchTwoCrops(build_augment(params))
    if decodes_on_device(params, device):
        m = params.model
        decode = partial(decode_batch, size=m.image_size, channels=m.in_channels, device=device)
        return lambda encoded: two_crops(decode(encoded))
    return lambda images: two_crops(images.to(device, non_blocking=True))


def _system_metrics(cfg: WorkerConfig, params: Params, ctx) -> Callable[[], None]:
    """CPU, memory, disk, network (and GPU) utilisation of this worker's node, logged to the
    run as system/node<k>/... by the node's first worker (the driver may be on another node).
    Started in a thread (MLflow's set-up takes ~2 s the other ranks would wait for); returns
    the stop function."""
    seconds = params.train.system_metrics_seconds
    if not (cfg.run_id and seconds and ctx.get_local_rank() == 0):
        return lambda: None
    started: list[SystemMetricsMonitor] = []

    def start() -> None:
        monitor = SystemMetricsMonitor(
            cfg.run_id,
            sampling_interval=seconds,
            node_id=f"node{ctx.get_node_rank()}",
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        )
        monitor.start()
        started.append(monitor)

    thread = threading.Thread(target=start, name="system-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        thread.join()
        for monitor in started:
            monitor.finish()

    return stop


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (train_loop_per_worker)."""
    cfg = WorkerConfig(**config)
    params = Params.model_validate(cfg.params)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stop_system_metrics = _system_metrics(cfg, params, ctx)
    try:
        _train(cfg, params, rank, world)
    finally:
        stop_system_metrics()


def _train(cfg: WorkerConfig, params: Params, rank: int, world: int) -> None:
    """The run on this rank: set-up, resume or warm start, the epochs and their reports."""
    t = params.train
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    # auto -> bf16 | fp32 for this worker (may probe: before the seed, so weights do not change)
    precision = resolve_precision(t.precision, ModelShape.from_params(params, world), device)
    cached = f", cached in {precision_cache_path()}" if precision.cached else ""
    print(f"[pretrain] rank {rank}: {precision.precision} ({precision.reason}{cached})", flush=True)
    t.precision = precision.precision  # what _autocast reads from here on
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    model = build_model(params, world).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = model.optimizer(t.lr * t.global_batch / 256, t.weight_decay, t.sgd_momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(params, cfg.steps_per_epoch)
    )
    start_epoch, start_step = 0, 0
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        start_epoch, start_step = _restore(
            model, optimizer, scheduler, checkpoint, cfg.steps_per_epoch, rank
        )
    elif t.init_from:
        _warm_start(model, params, t.init_from)
    if world > 1:
        broadcast_module(model)  # rank 0's key encoder and queue too, not only what DDP wraps
        model.ddp_wrap(DistributedDataParallel)
    if t.compile:
        model.ddp_wrap(torch.compile)

    views = views_on_device(params, device)
    checkpointer = Checkpointer(
        model, optimizer, scheduler, params, cfg.steps_per_epoch, rank, device
    )
    # small images: the shards' stored decoded arrays (or decoded in the first epoch), then
    # read from memory (pipeline/dataset.py)
    encoded = decodes_on_device(params, device)
    in_process = t.loader_workers == 0 and t.decoded_cache_mb > 0 and not encoded
    decoded = DecodedShards(t.decoded_cache_mb << 20) if in_process else None
    monitor = None
    if params.eval.monitor_bank and cfg.monitor_bank_urls:
        monitor = KnnMonitor.load(
            cfg.monitor_bank_urls, cfg.monitor_query_urls, cfg.num_classes, params, rank, world
        )
    for epoch in range(start_epoch, t.epochs):
        # augmentations: reproducible per epoch (a fresh draw for the rest of a resumed one)
        torch.manual_seed(_fresh_seed(t.seed + 1000 * epoch + rank, start_step))
        model.train()
        batches = training_loader(
            cfg.train_urls,
            transform=None,  # raw uint8 batches: augmented as a batch, on the device
            raw_size=params.model.image_size,
            batch_size=t.batch_size,
            shuffle_buffer=t.shuffle_buffer,
            seed=_fresh_seed(t.seed, start_step),
            epoch=epoch,
            loader_workers=t.loader_workers,
            decoded=decoded,
            encoded=encoded,  # then decoded on the GPU by `views`
            pin_memory=device.type == "cuda",
        )
        metrics = _epoch(
            model,
            batches,
            views,
            optimizer,
            scheduler,
            params,
            cfg,
            epoch,
            device,
            start_step,
            checkpointer,
        )
        start_step = 0
        if monitor is not None:  # every rank embeds its share of the monitor's images
            bf16 = t.precision == "bf16"
            metrics["knn_top1"] = monitor.knn_top1(model.export_encoder(), device, bf16)
        save = epoch == t.epochs - 1 or (epoch + 1) % t.checkpoint_every == 0
        checkpointer.report(metrics, epoch, cfg.steps_per_epoch if save else None)
