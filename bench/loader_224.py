"""What one CPU core feeds a GPU worker at ImageNet size: 224-px JPEGs through the project's
own path (a folder source sharded by `pipeline.shard`, read by the workers' training loader:
decode, resize the shorter side and centre-crop to `model.image_size`, one uint8 batch; the
crops, flips and colour jitter run batched on the device), in images per CPU-second of the
process. `params-gpu.yaml`'s `train.cpus_per_worker` follows from it: the GPU's training rate
divided by this. Measured twice: decoded on the CPU (a CPU worker, or a GPU worker without
train.gpu_decode) and with train.gpu_decode's loader, which passes each JPEG's bytes for the GPU
to decode (nvJPEG; that side needs a GPU and is not measured here).

    .venv/bin/python bench/loader_224.py [--images 600] [--batches 8]

The images are Fashion-MNIST upscaled to 256-320 px and tinted (JPEG quality 90): real edges,
so JPEG decoding works as on photos; their content does not matter here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import load_params
from pipeline.dataset import shard_urls, training_loader
from pipeline.shard import shard


def write_jpegs(fashion_mnist_dir: str, folder: Path, count: int) -> None:
    with gzip.open(Path(fashion_mnist_dir) / "train-images-idx3-ubyte.gz") as stream:
        raw = stream.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    rng = np.random.default_rng(0)
    for i, image in enumerate(images):
        side = int(rng.integers(256, 321))
        rgb = (image[..., None].astype(np.float32) * rng.uniform(0.4, 1.0, 3)).astype(np.uint8)
        big = Image.fromarray(rgb).resize((side, side), Image.BICUBIC)
        big.save(folder / f"{i:05d}.jpg", quality=90)


def loader_rate(
    urls: list[str], args: argparse.Namespace, size: int, encoded: bool
) -> dict[str, float]:
    """The training loader's rate in this process: decoded uint8 batches as a CPU worker reads
    them, or (`encoded`, train.gpu_decode on a CUDA worker) the images' bytes only."""
    batches = iter(
        training_loader(
            urls,
            transform=None,
            raw_size=size,
            batch_size=args.batch_size,
            shuffle_buffer=0,
            seed=0,
            epoch=0,
            loader_workers=0,  # in this process: its CPU time is the loader's
            resampled=True,  # round and round the shards: exactly the batches asked
            steps=args.batches + 1,
            encoded=encoded,
        )
    )
    next(batches)  # start-up (first shard) is not the rate
    cpu, wall, count = time.process_time(), time.perf_counter(), 0
    for _ in range(args.batches):
        next(batches)  # full batches only (partial=False)
        count += args.batch_size
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "images_per_s": round(count / wall, 1),
        "images_per_cpu_s": round(count / cpu, 1),
        "ms_per_image_cpu": round(cpu / count * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the rate per core
    with tempfile.TemporaryDirectory(prefix="bench-224-") as scratch:
        images, shards = Path(scratch) / "images", Path(scratch) / "shards"
        images.mkdir()
        overrides = [f"data.source={images}", f"data.shards_dir={shards}", "model.image_size=224"]
        params = load_params("params-gpu.yaml", [*overrides, "data.holdout_percent=0"])
        write_jpegs(params.data.fashion_mnist_dir, images, args.images)
        shard(params)
        urls = shard_urls(shards, "train")
        result = {"image_size": params.model.image_size, "batch_size": args.batch_size}
        for label, encoded in (("decoded", False), ("encoded", True)):
            rate = loader_rate(urls, args, params.model.image_size, encoded)
            result |= {f"{label}_{key}": value for key, value in rate.items()}
    for label, what in (("decoded", "decoded, resized"), ("encoded", "bytes only (gpu_decode)")):
        print(
            f"224-px JPEG -> batch, {what}, on one core: {result[f'{label}_images_per_s']} "
            f"images/s ({result[f'{label}_images_per_cpu_s']} per CPU-second, "
            f"{result[f'{label}_ms_per_image_cpu']} ms each)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
