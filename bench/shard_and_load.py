"""Benchmark the data stage: sharding throughput on full Fashion-MNIST, then loader throughput
(decode only, and decode + MoCo v2 two-crop augmentation) with 0, 1 and 2 DataLoader workers.

    .venv/bin/python bench/shard_and_load.py [--batches 20] [--batch-size 256]

Prints a table, then one JSON line (the last line) with every number. Wall-clock rates depend
on what else runs on the machine; the per-CPU-second rates (user+system time of this process and
its children: decode pool and loader workers) much less so, so both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config import load_params
from pipeline.dataset import shard_urls, training_loader
from pipeline.shard import shard

WORKERS = (0, 1, 2)


def _decode_only(image: Tensor) -> tuple[Tensor, Tensor]:
    view = image.float()
    return view, view


def _transforms() -> dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]]:
    transforms: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {"decode": _decode_only}
    try:
        from moco.augment import TwoCropsTransform, moco_v2_transform
    except ImportError as error:
        print(f"moco.augment is not importable yet ({error}): measuring decode only")
        return transforms
    transforms["decode+moco_v2"] = TwoCropsTransform(moco_v2_transform(28))
    return transforms


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_shard(shards_dir: Path) -> dict[str, float]:
    params = load_params(None, [f"data.shards_dir={shards_dir}", "data.source=fashion-mnist"])
    cpu, started = _cpu_seconds(), time.perf_counter()
    summary = shard(params)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    print(summary.render())
    images = sum(split["samples"] for split in summary.splits.values())
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "per_cpu_s": images / cpu,
    }


def bench_loader(
    urls: list[str], transform: Callable, workers: int, batches: int, size: int
) -> dict[str, float]:
    """Wall rate after the first batch (worker start-up excluded); CPU rate over everything."""
    loader = training_loader(
        urls,
        transform=transform,
        batch_size=size,
        shuffle_buffer=2000,
        seed=0,
        epoch=0,
        loader_workers=workers,
        steps=batches + 1,
    )
    cpu = _cpu_seconds()
    iterator = iter(loader)
    first = next(iterator)[0].shape[0]
    started = time.perf_counter()
    seen = sum(view_q.shape[0] for view_q, _ in iterator)
    wall = time.perf_counter() - started
    del iterator  # joins the workers, so their CPU time is counted
    cpu = _cpu_seconds() - cpu
    return {"images_per_s": seen / wall, "per_cpu_s": (seen + first) / cpu}


def _print_table(sharded: dict[str, float], loader: dict[str, Any], batch_size: int) -> None:
    print(
        f"\nsharding: {sharded['images']} images in {sharded['wall_s']:.1f} s = "
        f"{sharded['images_per_s']:.0f} images/s ({sharded['per_cpu_s']:.0f} per CPU-second)"
    )
    print(f"loader, batch {batch_size}: images/s (per CPU-second)")
    print(f"{'':<16}" + "".join(f"{f'{w} workers':>18}" for w in WORKERS))
    for name, by_workers in loader.items():
        cells = [f"{r['images_per_s']:.0f} ({r['per_cpu_s']:.0f})" for r in by_workers.values()]
        print(f"{name:<16}" + "".join(f"{cell:>18}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what one loader worker, or a Ray worker with 1 CPU, gets
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        results["shard"] = bench_shard(Path(tmp))
        urls = shard_urls(tmp, "train")
        results["loader"] = {
            name: {w: bench_loader(urls, fn, w, args.batches, args.batch_size) for w in WORKERS}
            for name, fn in _transforms().items()
        }
    results["load_avg_1m_end"] = os.getloadavg()[0]
    _print_table(results["shard"], results["loader"], args.batch_size)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
