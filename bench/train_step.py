"""Measure the MoCo training step on Fashion-MNIST through the project's own data path.

The model is the one a params file describes (`--params params.yaml`: the default model; without
it, the typed defaults, which are the same); the flags override it. Shards a Fashion-MNIST
subset (or reuses --shards), streams it with pipeline.dataset's training loader and the batched
two-crop augmentation the workers use, and runs the workers' step (`MoCo.forward`, so a
symmetric loss is measured too), timing each phase. Several `--precision` values are measured
side by side: steps take turns, so load from other processes hits each alike and their ratio
means something on a shared machine. `auto` is resolved exactly as a worker resolves it
(pipeline/precision.py). Ends with one JSON line per precision. Example:

    .venv/bin/python bench/train_step.py --params params.yaml --batch-size 256 --threads 2 \
        --precision fp32 bf16 auto --steps 10 --warmup-steps 2
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from moco import MoCoV2
from moco.augment import BatchTwoCrops
from pipeline.config import Params, load_params, with_overrides
from pipeline.dataset import DecodedShards, shard_urls, training_loader
from pipeline.method import build_augment, build_model
from pipeline.precision import ModelShape, Resolution, resolve_precision
from pipeline.shard import shard

PHASES = (
    "augment",
    "momentum_update",
    "forward_keys",
    "forward_queries",
    "contrast",  # the rest of MoCo.forward: InfoNCE against the queue
    "backward",
    "optimizer",
    "queue",
)
# phase -> the MoCo method that does it, timed where MoCo.forward calls it
FORWARD_PARTS = {
    "momentum_update": "momentum_update",
    "forward_keys": "keys",
    "forward_queries": "queries",
    "queue": "enqueue",
}
# flag -> the setting it overrides
FLAG_SETTINGS = {
    "backbone": "model.backbone",
    "width": "model.width",
    "image_size": "model.image_size",
    "small_stem": "model.small_stem",
    "stem_stride": "model.stem_stride",
    "batch_size": "train.batch_size",
    "queue_size": "method.queue_size",
    "channels_last": "train.channels_last",
}


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_flops(model: MoCoV2, batch: torch.Tensor) -> float:
    """Training FLOPs of one step: query forward + backward (~3x forward) + key forward
    (x2 for a symmetric loss, which runs both views through both encoders)."""
    with FlopCounterMode(display=False) as counter:
        model.encoder_q(batch)
    return 4 * counter.get_total_flops() * (2 if model.symmetric else 1)


def timed(phase: str, times: dict[str, float]):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - self.start

    return _Timer()


def instrument(model: MoCoV2, times: dict[str, float]) -> None:
    """Time MoCo.forward's parts where the model calls them (a symmetric step calls keys and
    queries twice; both calls count), so the bench runs the workers' own step code."""
    for phase, name in FORWARD_PARTS.items():
        method = getattr(model, name)

        def wrapper(*args: Any, _method: Callable = method, _phase: str = phase) -> Any:
            with timed(_phase, times):
                return _method(*args)

        setattr(model, name, wrapper)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: typed defaults)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as mocopipe's")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--queue-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per precision")
    parser.add_argument("--warmup-steps", type=int, default=3, help="per precision")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="one or more, measured side by side (default: the params' train.precision)",
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--small-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="3x3 stem without max-pool (default: the params' model.small_stem)",
    )
    parser.add_argument(
        "--stem-stride", type=int, choices=[1, 2], default=None, help="model.stem_stride"
    )
    parser.add_argument("--shards", default=None, help="existing shards dir (else a temp subset)")
    parser.add_argument(
        "--decoded",
        action="store_true",
        help="read images decoded once (DecodedShards, as workers do after epoch 1), not PNGs",
    )
    return parser.parse_args()


def bench_params(args: argparse.Namespace) -> Params:
    """The params file with --set, then the flags that were given, on top."""
    params = load_params(args.params, args.set)
    flags = {
        setting: getattr(args, flag)
        for flag, setting in FLAG_SETTINGS.items()
        if getattr(args, flag) is not None
    }
    return with_overrides(params, flags | {"train.num_workers": 1})  # one process


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params = bench_params(args)
    t, m = params.train, params.model
    requested = args.precision or [t.precision]
    shape = ModelShape.from_params(params, world_size=1)
    resolved: dict[str, Resolution] = {
        p: resolve_precision(p, shape, torch.device("cpu")) for p in dict.fromkeys(requested)
    }

    needed = (args.steps + args.warmup_steps) * len(requested) * t.batch_size
    shards_dir = args.shards or tempfile.mkdtemp(prefix="bench-shards-")
    if args.shards is None:
        data = {"data.shards_dir": shards_dir, "data.train_limit": needed, "data.test_limit": 10}
        shard(with_overrides(params, data))
    urls = shard_urls(shards_dir, "train")
    loader = functools.partial(
        training_loader,
        urls,
        transform=None,  # raw uint8 batches, augmented as a batch like the Ray workers do
        raw_size=m.image_size,
        batch_size=t.batch_size,
        shuffle_buffer=1000,
        seed=0,
        loader_workers=args.workers,
    )
    decoded = DecodedShards(t.decoded_cache_mb << 20) if args.decoded else None
    if decoded is not None:
        for _ in loader(epoch=0, decoded=decoded):  # one decoding pass fills it
            pass
    batches = loader(epoch=1, decoded=decoded)
    model = build_model(params, world_size=1)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    two_crops = BatchTwoCrops(build_augment(params))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9)
    times: dict[str, float] = {}
    instrument(model, times)

    records: dict[str, list[dict[str, float]]] = {p: [] for p in requested}
    turns = itertools.cycle(requested)
    fetched = time.perf_counter()
    total_steps = (args.steps + args.warmup_steps) * len(requested)
    for images in itertools.islice(batches, total_steps):
        name = next(turns)
        times.clear()
        times["data_wait"] = time.perf_counter() - fetched
        with timed("augment", times):
            im_q, im_k = two_crops(images)
        im_q = im_q.contiguous(memory_format=memory_format)
        im_k = im_k.contiguous(memory_format=memory_format)
        bf16 = resolved[name].precision == "bf16"
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(im_q, im_k).loss
        forward = time.perf_counter() - started
        times["contrast"] = forward - sum(times.get(p, 0.0) for p in FORWARD_PARTS)
        with timed("backward", times):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timed("optimizer", times):
            optimizer.step()
        times["step"] = time.perf_counter() - fetched
        records[name].append(dict(times))
        fetched = time.perf_counter()

    flops = step_flops(model, im_q)
    peaks = {
        p: matmul_peak_gflops(torch.bfloat16 if p == "bf16" else torch.float32)
        for p in {r.precision for r in resolved.values()}
    }
    for name in requested:
        measured = records[name][args.warmup_steps :]
        if not measured:
            raise SystemExit("no measured steps: raise --steps or the data size")
        resolution = resolved[name]
        step_median = statistics.median(r["step"] for r in measured)
        total = sum(r["step"] for r in measured)
        result = {
            "params": args.params,
            "shape": asdict(shape),
            "symmetric": params.method.symmetric,
            "queue_size": params.method.queue_size,
            "precision_requested": name,
            "precision": resolution.precision,
            "precision_reason": resolution.reason,
            "probe_bf16_speedup": resolution.speedup,
            "threads": args.threads,
            "workers": args.workers,
            "decoded": args.decoded,
            "measured_side_by_side": requested,
            "images_per_s": round(t.batch_size / step_median, 1),
            "images_per_s_mean": round(t.batch_size * len(measured) / total, 1),
            "s_per_step_median": round(step_median, 4),
            "data_wait_fraction": round(sum(r["data_wait"] for r in measured) / total, 4),
            "breakdown_s": {
                p: round(statistics.median(r.get(p, 0.0) for r in measured), 4) for p in PHASES
            },
            "model_gflops_per_step": round(flops / 1e9, 1),
            "achieved_gflops_per_s": round(flops / 1e9 / step_median, 1),
            "matmul_peak_gflops_per_s": round(peaks[resolution.precision], 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
