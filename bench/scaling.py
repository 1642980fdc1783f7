"""How close distributed pretraining comes to what the machine can do, in one run.

Measures, taking turns so that a busy or slow machine hits every figure alike:
- the ceiling: `bench/train_step.py` (the workers' own step and data path, one thread) as one
  process alone and as N processes side by side, reading PNGs from the shards (issue 24's
  ceiling) and, with `--decoded`, images decoded once as later epochs do; each Ray figure is
  also given against side-by-side processes on its own data path (epoch 1: the shards' decoded
  arrays where the shard stage stored them, else PNG; later epochs: decoded; the task: their
  mix over the run's epochs), the stricter ratio;
- `mocopipe pretrain` on N Ray workers, called as the flow's task calls it (in this process,
  a fresh local Ray, a throw-away MLflow store): each epoch's rate and data wait from the run's
  MLflow metrics, and the task rate (epochs x images / the call's wall time, start to exported
  encoder);
- the per-step time of each collective on N gloo processes at the run's shapes (the gradient
  all-reduce as one flat tensor, the shuffle-BN gather of both views, the key un-shuffle gather),
  and of reading a shard image (PNG decode, the shard's decoded array, kept in memory);
- the matmul peak of one thread (bf16, fp32), to put absolute figures in scale.

Prints a markdown table and a final JSON line. Needs the shards (`make data`). Example:

    .venv/bin/python bench/scaling.py --epochs 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
from train_step import matmul_peak_gflops

from moco.distributed import batch_shuffle_ddp, batch_unshuffle_ddp
from pipeline.config import Params, load_params
from pipeline.dataset import DecodedShards, read_manifest, shard_urls, training_loader
from pipeline.method import build_model

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_STEPS = 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--epochs", type=int, default=None, help="default: the params' epochs")
    parser.add_argument("--rounds", type=int, default=2, help="alternated ceiling rounds")
    parser.add_argument("--steps", type=int, default=40, help="train_step's measured steps")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for the Ray run")
    return parser.parse_args()


def train_step_rates(args: argparse.Namespace, processes: int, decoded: bool) -> list[float]:
    """images/s of each of `processes` one-thread train_step processes started together: over
    all measured steps, as a worker's epoch rate is (train_step's median step is 0.3-2% faster)."""
    command = [sys.executable, str(ROOT / "bench/train_step.py"), "--params", args.params]
    command += ["--threads", "1", "--steps", str(args.steps), "--shards", args.shards]
    command += ["--decoded"] if decoded else []
    running = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    outputs = [p.communicate()[0].decode().strip().splitlines() for p in running]
    if any(p.returncode for p in running) or not all(outputs):
        raise SystemExit(f"bench/train_step.py failed: {' '.join(command)}")
    return [json.loads(lines[-1])["images_per_s_mean"] for lines in outputs]


def ray_pretrain(args: argparse.Namespace, epochs: int, scratch: Path) -> dict[str, float]:
    """One `pretrain` call on a fresh local Ray and MLflow store: task and per-epoch rates."""
    from pipeline.pretrain import pretrain  # imports Ray: only for this part

    overrides = [
        f"train.epochs={epochs}",
        f"tracking.uri=sqlite:///{scratch}/mlflow.db",
        f"tracking.artifact_location={scratch}/artifacts",
        f"train.storage_path={scratch}/ray",
        f"train.output_dir={scratch}/encoder",
        *args.set,
    ]
    params = load_params(args.params, overrides)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    result = pretrain(params)
    wall = time.perf_counter() - started
    client = MlflowClient(params.tracking.uri)
    history = {
        name: [
            m.value
            for m in sorted(client.get_metric_history(result.run_id, name), key=lambda m: m.step)
        ]
        for name in ("images_per_s", "data_wait_fraction")
    }
    rates, waits = history["images_per_s"], history["data_wait_fraction"]
    later = slice(1, None) if len(rates) > 1 else slice(None)
    images = read_manifest(params.data.shards_dir, "train")["samples"]
    return {
        "epochs": epochs,
        "task_wall_s": round(wall, 1),
        "task_images_per_s": round(epochs * images / wall, 1),
        "epoch1_images_per_s": round(rates[0], 1),
        "epoch1_data_wait": round(waits[0], 4),
        "later_epochs_images_per_s": round(statistics.mean(rates[later]), 1),
        "later_epochs_data_wait": round(statistics.mean(waits[later]), 4),
    }


def _collectives(rank: int, world: int, port: int, shapes: dict, out: dict) -> None:
    """Per-step seconds of each of the workers' collectives (median of COLLECTIVE_STEPS)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    grads = torch.randn(shapes["params"])
    views = [torch.randn(shapes["batch"], *shapes["image"]) for _ in range(2)]
    keys = torch.randn(2, shapes["batch"], shapes["dim"])
    generator = torch.Generator().manual_seed(0)
    perms = batch_shuffle_ddp(views, generator)[1]
    ops = {
        "gradient_all_reduce": lambda: dist.all_reduce(grads),
        "shuffle_bn_gather": lambda: batch_shuffle_ddp(views, generator),
        "key_unshuffle_gather": lambda: batch_unshuffle_ddp(keys, perms),
    }
    timings: dict[str, list[float]] = {name: [] for name in ops}
    for step in range(COLLECTIVE_STEPS + 5):
        for name, op in ops.items():  # turns, so load hits each alike
            dist.barrier()
            started = time.perf_counter()
            op()
            if step >= 5:
                timings[name].append(time.perf_counter() - started)
    if rank == 0:
        out.update({name: statistics.median(t) for name, t in timings.items()})
    dist.destroy_process_group()


def collective_seconds(params: Params, world: int) -> dict[str, float]:
    model = build_model(params, world_size=1)
    m = params.model
    shapes = {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch": params.train.batch_size,
        "image": (m.in_channels, m.image_size, m.image_size),
        "dim": params.method.dim,
    }
    with mp.Manager() as manager:
        out = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(_collectives, args=(world, port, shapes, out), nprocs=world)
        return {**dict(out), "gradient_elements": shapes["params"]}


def decode_us_per_image(params: Params, shards: str) -> dict[str, float]:
    """Reading a shard image into a uint8 tensor: PNG decode (the tar streamed), the shard's
    stored decoded array (when it has one), and kept in memory (DecodedShards)."""
    urls = shard_urls(shards, "train")[:2]
    decoded = DecodedShards(params.train.decoded_cache_mb << 20)
    result = {}
    for name, kept in (("png", None), ("array", decoded), ("decoded", decoded)):
        started, count = time.perf_counter(), 0
        for batch in training_loader(
            urls,
            transform=None,
            raw_size=params.model.image_size,
            batch_size=256,
            shuffle_buffer=0,
            seed=0,
            epoch=0,
            loader_workers=0,
            decoded=kept,  # "array" fills it (from the arrays, or decoding when there are none)
        ):
            count += len(batch)
        result[f"{name}_us_per_image"] = round((time.perf_counter() - started) / count * 1e6, 2)
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params, args.set)
    workers, epochs = params.train.num_workers, args.epochs or params.train.epochs
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for decoded in (False, True):
            tag = "decoded" if decoded else "png"
            rounds.setdefault(f"alone_{tag}", []).append(train_step_rates(args, 1, decoded)[0])
            rounds.setdefault(f"side_{tag}", []).append(
                sum(train_step_rates(args, workers, decoded))
            )
    peaks = {
        str(d).removeprefix("torch."): round(matmul_peak_gflops(d), 1)
        for d in (torch.bfloat16, torch.float32)
    }
    collectives = collective_seconds(params, workers)
    decode = decode_us_per_image(params, args.shards)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        ray = ray_pretrain(args, epochs, Path(scratch))

    ceiling = statistics.mean(rounds["side_png"])
    ceiling_decoded = statistics.mean(rounds["side_decoded"])
    step_s = params.train.global_batch / ray["later_epochs_images_per_s"]
    pct = lambda rate, of=ceiling: f"{100 * rate / of:.0f}%"  # noqa: E731
    fmt = lambda xs: " / ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
    # the same data path as the run: epoch 1 reads the shards' decoded arrays where the shard
    # stage stored them, else PNGs; later epochs images decoded once
    arrays = all("decoded" in s for s in read_manifest(args.shards, "train")["shards"])
    ceiling_epoch1 = ceiling_decoded if arrays else ceiling
    ceiling_mixed = epochs / (1 / ceiling_epoch1 + (epochs - 1) / ceiling_decoded)
    epoch1_path = "the shards' decoded arrays" if arrays else "PNG"
    later = ray["later_epochs_images_per_s"]
    rows = [
        ("1 process alone, PNG (rounds)", fmt(rounds["alone_png"]), "", ""),
        (f"{workers} side by side, PNG: the ceiling", fmt(rounds["side_png"]), "100%", ""),
        ("1 process alone, decoded once", fmt(rounds["alone_decoded"]), "", ""),
        (
            f"{workers} side by side, decoded once",
            fmt(rounds["side_decoded"]),
            pct(ceiling_decoded),
            "",
        ),
        (
            f"{workers} side by side, epoch 1 {epoch1_path} then decoded ({epochs} epochs)",
            f"{ceiling_mixed:,.0f}",
            pct(ceiling_mixed),
            "",
        ),
        (
            f"{workers} Ray workers, epoch 1 from {epoch1_path} "
            f"(data-wait {ray['epoch1_data_wait']:.3f})",
            f"{ray['epoch1_images_per_s']:,.0f}",
            pct(ray["epoch1_images_per_s"]),
            pct(ray["epoch1_images_per_s"], ceiling_epoch1),
        ),
        (
            f"{workers} Ray workers, epochs 2-{epochs} (data-wait "
            f"{ray['later_epochs_data_wait']:.3f})",
            f"{later:,.0f}",
            pct(later),
            pct(later, ceiling_decoded),
        ),
        (
            f"{workers} Ray workers, whole task ({epochs} epochs in {ray['task_wall_s']:.0f} s)",
            f"{ray['task_images_per_s']:,.0f}",
            pct(ray["task_images_per_s"]),
            pct(ray["task_images_per_s"], ceiling_mixed),
        ),
    ]
    print("| what | images/s | of the PNG ceiling | of the same data path side by side |")
    print("|---|---|---|---|")
    print("\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows))
    print(
        f"\nper step on {workers} gloo processes (a step at the Ray epoch rate: "
        f"{step_s * 1e3:.0f} ms):"
    )
    for name in ("gradient_all_reduce", "shuffle_bn_gather", "key_unshuffle_gather"):
        print(f"- {name}: {collectives[name] * 1e3:.1f} ms ({pct(collectives[name], step_s)})")
    print(
        f"- reading an image: PNG {decode['png_us_per_image']} us, the shard's decoded array "
        f"{decode['array_us_per_image']} us, kept in memory {decode['decoded_us_per_image']} us"
    )
    print(f"- matmul peak, 1 thread: bf16 {peaks['bfloat16']} GFLOP/s, fp32 {peaks['float32']}")
    print(
        json.dumps(
            {
                "rounds": rounds,
                "ray": ray,
                "collectives_s": collectives,
                "decode": decode,
                "matmul_peak_gflops": peaks,
            }
        )
    )


if __name__ == "__main__":
    main()
