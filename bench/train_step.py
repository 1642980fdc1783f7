"""Measure the MoCo training step on Fashion-MNIST through the project's own data path.

Shards a Fashion-MNIST subset (or reuses --shards), streams it with pipeline.dataset's training
loader and the MoCo v2 two-crop transform, and times each phase of the step separately. Ends with
ONE JSON line. Example:

    .venv/bin/python bench/train_step.py --backbone resnet18 --image-size 32 --batch-size 256 \
        --queue-size 4096 --steps 20 --warmup-steps 3 --precision bf16 --threads 2 --workers 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from moco import MoCo
from moco.augment import BatchMoCoAugment, BatchTwoCrops
from pipeline.config import load_params
from pipeline.dataset import shard_urls, training_loader
from pipeline.shard import shard

PHASES = (
    "augment",
    "momentum_update",
    "forward_keys",
    "forward_queries",
    "backward",
    "optimizer",
    "queue",
)


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_flops(model: MoCo, batch: torch.Tensor) -> float:
    """Training FLOPs of one step: query forward + backward (~3x forward) + key forward."""
    with FlopCounterMode(display=False) as counter:
        model.encoder_q(batch)
    return 4 * counter.get_total_flops()


def timed(phase: str, times: dict[str, float]):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            times[phase] = time.perf_counter() - self.start

    return _Timer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--small-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="3x3 stride-1 stem without max-pool (default: on for images <= 64 px)",
    )
    parser.add_argument("--shards", default=None, help="existing shards dir (else a temp subset)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    needed = (args.steps + args.warmup_steps) * args.batch_size
    shards_dir = args.shards or tempfile.mkdtemp(prefix="bench-shards-")
    if args.shards is None:
        params = load_params(
            None,
            [f"data.shards_dir={shards_dir}", f"data.train_limit={needed}", "data.test_limit=10"],
        )
        shard(params)
    batches = training_loader(
        shard_urls(shards_dir, "train"),
        transform=None,  # raw uint8 batches, augmented as a batch like the Ray workers do
        raw_size=args.image_size,
        batch_size=args.batch_size,
        shuffle_buffer=1000,
        seed=0,
        epoch=0,
        loader_workers=args.workers,
    )
    model = MoCo.from_backbone(
        args.backbone,
        width=args.width,
        small_stem=args.image_size <= 64 if args.small_stem is None else args.small_stem,
        in_channels=1,
        mean=[0.286],
        std=[0.353],
        queue_size=args.queue_size,
        bn_splits=2,
    )
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    two_crops = BatchTwoCrops(BatchMoCoAugment(args.image_size, "v2"))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )

    records: list[dict[str, float]] = []
    fetched = time.perf_counter()
    for images in itertools.islice(batches, args.steps + args.warmup_steps):
        times = {"data_wait": time.perf_counter() - fetched}
        with timed("augment", times):
            im_q, im_k = two_crops(images)
        im_q = im_q.contiguous(memory_format=memory_format)
        im_k = im_k.contiguous(memory_format=memory_format)
        with timed("momentum_update", times):
            model.momentum_update()
        with autocast:
            with timed("forward_keys", times):
                k = model.keys(im_k)
            with timed("forward_queries", times):
                loss, _ = model.contrast(model.queries(im_q), k)
        with timed("backward", times):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timed("optimizer", times):
            optimizer.step()
        with timed("queue", times):
            model.enqueue(k)
        times["step"] = time.perf_counter() - fetched
        records.append(times)
        fetched = time.perf_counter()
    measured = records[args.warmup_steps :]
    if not measured:
        raise SystemExit("no measured steps: raise --steps or the data size")

    with autocast:
        flops = step_flops(model, im_q)
    step_median = statistics.median(r["step"] for r in measured)
    total = sum(r["step"] for r in measured)
    peak = matmul_peak_gflops(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    result = {
        "backbone": args.backbone,
        "width": args.width,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "threads": args.threads,
        "workers": args.workers,
        "images_per_s": round(args.batch_size / step_median, 1),
        "s_per_step_median": round(step_median, 4),
        "data_wait_fraction": round(sum(r["data_wait"] for r in measured) / total, 4),
        "breakdown_s": {p: round(statistics.median(r[p] for r in measured), 4) for p in PHASES},
        "model_gflops_per_step": round(flops / 1e9, 1),
        "achieved_gflops_per_s": round(flops / 1e9 / step_median, 1),
        "matmul_peak_gflops_per_s": round(peak, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
