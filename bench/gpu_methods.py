"""One short GPU check of the method seam, sized for a single `device` call (torch only).

For each preset (MoCo v2 / v3 on the GPU ResNet-18, MoCo v3 on ViT-S at 32 px and at 224 px) it
runs real training steps through `build_method` with the batched augmentation on the device, in
bf16 autocast, and prints images/s, peak memory and whether the loss fell. Then it times JPEG
decoding of 224-px images on the CPU (per core) and on the GPU (`torchvision.io.decode_jpeg`):
the figures `params-gpu*.yaml`'s `cpus_per_worker` and a GPU-decode setting would rest on.

    PYTHONPATH=. python3 bench/gpu_methods.py     # on the lent GPU machine, from the repo root
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torchvision.io import decode_jpeg, encode_jpeg

from moco.augment import BatchMoCoAugment
from moco.backbones import BackboneSpec
from moco.methods import build_method

PRESETS = {  # name: (method, settings, spec, per-GPU batch, base lr, weight decay)
    "mocov2-resnet18-32px": (
        "mocov2",
        {"queue_size": 16384, "symmetric": False, "temperature": 0.1},
        BackboneSpec("resnet18", 3, 32, (0.5,) * 3, (0.25,) * 3, width=64),
        512,
        0.06,
        5e-4,
    ),
    "mocov3-resnet18-32px": (
        "mocov3",
        {"mlp_dim": 4096, "dim": 256},
        BackboneSpec("resnet18", 3, 32, (0.5,) * 3, (0.25,) * 3, width=64),
        512,
        0.6,
        1e-6,
    ),
    "mocov3-vit_small-p4-32px": (
        "mocov3",
        {"mlp_dim": 4096, "dim": 256},
        BackboneSpec("vit_small", 3, 32, (0.5,) * 3, (0.25,) * 3, patch_size=4),
        512,
        1.5e-4,
        0.1,
    ),
    "mocov3-vit_small-p16-224px": (
        "mocov3",
        {"mlp_dim": 4096, "dim": 256},
        BackboneSpec("vit_small", 3, 224, (0.5,) * 3, (0.25,) * 3, patch_size=16),
        128,
        1.5e-4,
        0.1,
    ),
}


def train_rate(name: str, steps: int, device: torch.device) -> dict[str, float]:
    method_name, settings, spec, batch, lr, wd = PRESETS[name]
    torch.manual_seed(0)
    method = build_method(method_name, spec, settings).to(device)
    method = method.to(memory_format=torch.channels_last) if "resnet" in spec.name else method
    optimizer = method.optimizer(lr * batch / 256, wd, 0.9)
    augment = BatchMoCoAugment(spec.image_size, "v2")
    source = torch.randint(0, 256, (batch, 3, spec.image_size + 8, spec.image_size + 8))
    source = source.to(torch.uint8).to(device)
    torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    start = 0.0
    for step in range(steps + 5):
        if step == 5:  # warm-up steps (cuDNN autotune, allocator) are not timed
            torch.cuda.synchronize(device)
            start = time.perf_counter()
        method.on_step(step / (steps + 5))
        v1, v2 = augment(source), augment(source)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method(v1, v2).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item() if step % 10 == 0 or step == steps + 4 else losses[-1])
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "images/s": steps * batch / seconds,
        "ms/step": 1000 * seconds / steps,
        "peak GiB": torch.cuda.max_memory_allocated(device) / 2**30,
        "loss first": losses[0],
        "loss last": losses[-1],
    }


def jpeg_rates(count: int, device: torch.device) -> dict[str, float]:
    """224-px JPEGs (smooth images, like photos, q 90): decode+crop+flip per image on one CPU
    thread, and batched decode on the GPU."""
    torch.set_num_threads(1)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16), size=256, mode="bicubic")
    images = [(base.roll(i, dims=-1)[0].clamp(0, 1) * 255).to(torch.uint8) for i in range(64)]
    blobs = [encode_jpeg(img, quality=90) for img in images]
    data = [blobs[i % len(blobs)] for i in range(count)]
    crop = torchvision.transforms.v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True)
    start = time.perf_counter()
    for blob in data:
        img = decode_jpeg(blob)
        crop(img).flip(-1)
    cpu = count / (time.perf_counter() - start)
    decode_jpeg(data[:64], device=device)  # warm-up (nvjpeg handles)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, count, 256):
        decode_jpeg(data[i : i + 256], device=device)
    torch.cuda.synchronize(device)
    gpu = count / (time.perf_counter() - start)
    return {
        "cpu decode+crop+flip images/s per core": cpu,
        "gpu decode images/s": gpu,
        "jpeg KiB": sum(len(b) for b in blobs) / len(blobs) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--jpegs", type=int, default=2048)
    args = parser.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS handles and clocks
        a @ a
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    peak = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    print(f"device {props.name}, torch {torch.__version__}, bf16 matmul {peak:.0f} TFLOP/s")
    for name in PRESETS:
        row = train_rate(name, args.steps, device)
        print(f"{name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()), flush=True)
    row = jpeg_rates(args.jpegs, device)
    print("jpeg 224 px: " + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
