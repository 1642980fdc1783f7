"""What a params file's encoder learns in a fixed CPU budget: kNN and linear top-1 after M minutes.

Why: on a 2-CPU box the recipe is limited by minutes, not epochs, so recipes compare by what
they reach in the same training time. One process (no Ray): the params file's method, built
and stepped as a worker does (build_model, the method's forward, the batched two-crop
augmentation, the method's optimizer with the worker's lr scaling, train.precision resolved as
a worker resolves it), trained on
the train split held in memory (decoded once, so the clock measures training, not PNG decoding),
with a cosine lr over the budget (after train.warmup_epochs of linear warm-up). Minutes are CPU
time per thread (see Budget), so a budget is the same work on a shared machine. At
--checkpoints evenly spaced points the clock stops and the frozen backbone is scored by the
evaluate stage's own code: weighted kNN (eval.knn_k, eval.knn_t; every train image is the bank,
every test image a query) and, at the end, the linear probe; the same protocol on raw pixels is
the reference. Ends with ONE JSON line; --jsonl appends it to a
file that bench/plot_quality.py draws. Example:

    .venv/bin/python bench/quality_budget.py --params params.yaml --minutes 3 \
        --set model.small_stem=false --label "imagenet stem" --jsonl bench/plots/quality.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from train_step import matmul_peak_gflops

from moco import cosine_with_warmup
from moco.augment import BatchTwoCrops
from moco.knn import knn_top1
from pipeline.config import Params, load_params, with_overrides
from pipeline.dataset import read_manifest
from pipeline.evaluation.features import LabelledSplit, extract, feature_net, load_split
from pipeline.evaluation.probes import ProbeRecipe, fit_probe, top1
from pipeline.method import build_augment, build_model
from pipeline.precision import ModelShape, cpu_model, resolve_precision
from pipeline.shard import shard

SCHEDULE_STEPS = 10_000  # resolution of the budget-fraction lr / momentum schedules


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as mocopipe's")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training wall-clock (evaluation excluded)")
    budget.add_argument("--images", type=int, help="training images (steps x batch)")
    parser.add_argument("--checkpoints", type=int, default=3, help="kNN points on the curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="", help="the curve's name in the plot")
    parser.add_argument("--jsonl", default=None, help="also append the JSON line to this file")
    return parser.parse_args()


class Budget:
    """Training progress in [0, 1] by minutes of training or by images.

    A minute is this process's CPU time divided by its threads: on an idle machine that is the
    wall clock, and on a shared one it is still the same amount of work (the wall clock of a
    run that other jobs slowed 3x would buy it a third of the training). Wall time is kept too.
    """

    def __init__(self, minutes: float | None, images: int | None, threads: int) -> None:
        self.seconds, self.images, self.threads = (minutes or 0) * 60, images, threads
        self.trained_s, self.wall_s, self.seen = 0.0, 0.0, 0

    def progress(self) -> float:
        if self.images is not None:
            return min(1.0, self.seen / self.images)
        return min(1.0, self.trained_s / self.seconds)

    @contextmanager
    def clock(self, images: int) -> Iterator[None]:
        """Count the block's CPU time (per thread), wall time and `images` as training."""
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        self.trained_s += (time.process_time() - cpu) / self.threads
        self.wall_s += time.perf_counter() - wall
        self.seen += images


def ensure_shards(params: Params) -> None:
    """The shard stage's output for params.data, written on first use (idempotent)."""
    try:
        read_manifest(params.data.shards_dir, "test")
    except FileNotFoundError:
        shard(params)


def warmup_steps(warmup_epochs: float, train_size: int, images: int | None) -> int:
    """train.warmup_epochs as schedule steps: a fraction of an --images budget. A --minutes
    budget has no fixed number of images, so it is refused there rather than guessed."""
    if not warmup_epochs:
        return 0
    if images is None:
        raise SystemExit("train.warmup_epochs needs an --images budget (epochs -> images)")
    return min(SCHEDULE_STEPS, round(warmup_epochs * train_size / images * SCHEDULE_STEPS))


def scores(
    net: nn.Module,
    train: LabelledSplit,
    test: LabelledSplit,
    params: Params,
    *,
    bf16: bool,
    linear: bool,
) -> dict[str, float]:
    """kNN (and the linear probe) top-1 of a feature network, as the evaluate stage scores."""
    e = params.eval
    train_f = extract(net, train, batch_size=e.batch_size, bf16=bf16)
    test_f = extract(net, test, batch_size=e.batch_size, bf16=bf16)
    classes = train.num_classes
    knn = knn_top1(train_f, train.labels, test_f, test.labels, classes, [e.knn_k], e.knn_t)
    found = {"knn_top1": round(knn[e.knn_k], 4)}
    if linear:
        probe = fit_probe(
            train_f, train.labels, classes, ProbeRecipe(e.probe_iters, e.probe_weight_decay)
        )
        found["linear_top1"] = round(top1(probe, test_f, test.labels), 4)
    return found


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params = with_overrides(load_params(args.params, args.set), {"train.num_workers": 1})
    t, m = params.train, params.model
    ensure_shards(params)
    splits = {
        name: load_split(
            params.data.shards_dir,
            name,
            image_size=m.image_size,
            channels=m.in_channels,
            batch_size=params.eval.batch_size,
        )
        for name in ("train", "test")
    }
    train, test = splits["train"], splits["test"]
    peak = matmul_peak_gflops(torch.float32)
    precision = resolve_precision(
        t.precision, ModelShape.from_params(params, 1), torch.device("cpu")
    )
    bf16 = precision.precision == "bf16"

    torch.manual_seed(t.seed)
    model = build_model(params, world_size=1)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # the worker's linear lr scaling (one worker here)
    optimizer = model.optimizer(t.lr * t.batch_size / 256, t.weight_decay, t.sgd_momentum)
    base_lr = optimizer.param_groups[0]["lr"]
    two_crops = BatchTwoCrops(build_augment(params))
    budget = Budget(args.minutes, args.images, args.threads)
    marks = [(i + 1) / args.checkpoints for i in range(args.checkpoints)]
    curve: list[dict[str, float]] = []
    order = torch.randperm(len(train))
    cursor = 0
    warmup = warmup_steps(t.warmup_epochs, len(train), args.images)
    while marks:
        step = int(budget.progress() * SCHEDULE_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = base_lr * cosine_with_warmup(step, SCHEDULE_STEPS, warmup)
        model.on_step(step / SCHEDULE_STEPS)
        if cursor + t.batch_size > len(order):
            order, cursor = torch.randperm(len(train)), 0
        index = order[cursor : cursor + t.batch_size]
        cursor += t.batch_size
        with budget.clock(t.batch_size):
            model.train()
            im_q, im_k = two_crops(train.images[index])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(
                    im_q.contiguous(memory_format=memory_format),
                    im_k.contiguous(memory_format=memory_format),
                ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if budget.progress() >= marks[0]:  # the clock is stopped while scoring
            final = len(marks) == 1
            found = scores(
                feature_net(model.export_encoder()), train, test, params, bf16=bf16, linear=final
            )
            curve.append(
                {"minutes": round(budget.trained_s / 60, 3), "images": budget.seen} | found
            )
            print(f"[quality] {curve[-1]}  loss {loss.item():.3f}", flush=True)
            marks.pop(0)

    result = {
        "label": args.label,
        "params": args.params,
        "set": args.set,
        "budget": {"minutes": args.minutes} if args.minutes else {"images": args.images},
        "trained_minutes": round(budget.trained_s / 60, 3),  # CPU time / threads
        "wall_minutes": round(budget.wall_s / 60, 3),
        "images_seen": budget.seen,
        "images_per_s": round(budget.seen / budget.trained_s, 1),  # per trained (CPU) second
        "precision": precision.precision,
        "precision_reason": precision.reason,
        **{k: v for k, v in curve[-1].items() if k.endswith("_top1")},
        "pixels": scores(feature_net(None), train, test, params, bf16=False, linear=True),
        "curve": curve,
        "protocol": f"kNN k={params.eval.knn_k} t={params.eval.knn_t}, {len(train)} train "
        f"bank / {len(test)} test queries; linear probe {params.eval.probe_iters} L-BFGS iters",
        "machine": {
            "cpu": cpu_model(),
            "threads": args.threads,
            "matmul_fp32_gflops_per_s": round(peak, 1),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
        },
    }
    line = json.dumps(result)
    print(line)
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
