"""`train.precision: auto`: bf16 or fp32 autocast per worker, chosen by hardware and measurement.

Why measure: on a CPU with native bf16 (AVX-512 BF16, AMX) bf16 autocast trains this project's
networks 1.6-2x faster than fp32, while where oneDNN has no bf16 kernels every convolution falls
back to aten's im2col `_slow_conv2d` and bf16 is about 10x slower (bench/RESULTS.md). Machines
sold as the same kind differ, so on a CPU `auto` checks the flag and then times a few training
steps of the run's own model in both precisions, and picks bf16 only when it is clearly faster.
The answer is cached per machine, torch version, thread count and model shape, so later runs
(and the other workers of a run) pay the ~2 s probe once.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock, Timeout

from moco.backbones import BackboneSpec
from moco.distributed import single_process
from moco.methods import Method, build_method
from pipeline.config import Params, method_settings
from pipeline.method import backbone_spec

Precision = Literal["fp32", "bf16"]
CACHE_ENV = "MOCO_PRECISION_CACHE"  # a JSON file path; overrides the default below
DEFAULT_CACHE = Path.home() / ".cache" / "moco-pipeline" / "precision.json"
MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this much: below it, timing noise could decide
# images per probe step: the worker's own batch, since bf16's gain depends on it (a probe at
# 64 chose bf16 for a batch of 256 that fp32 trained 4% faster), capped for slow bf16 paths
PROBE_BATCH_CAP = 512
PROBE_BUDGET_S = 1.5  # measured time (warm-up excluded) after the minimum steps per precision
PROBE_MIN_STEPS = 2  # measured steps per precision, whatever the budget
PROBE_LOCK_TIMEOUT_S = 60.0  # wait this long for another worker's probe on this machine
# In the cache key: 2 = probes take turns (the lock). Answers of version-1 probes, which could
# run side by side and slow each other (1.09x cached where bf16 trains 1.22x faster), are
# measured again. 3 = the probe runs the method's own forward (any method, via moco.methods).
# 4 = at the worker's own batch size (it was capped at 64).
PROBE_VERSION = 4
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512/AMX, aarch64 BF16


@dataclass(frozen=True)
class ModelShape:
    """What sets a training step's speed: the cache key's model half, and the probe's model."""

    method: str
    settings: dict[str, Any]  # the method's own (moco.methods.build_method)
    backbone: BackboneSpec
    world_size: int  # a method may build differently per world size (MoCo v2's shuffle BN)
    batch_size: int  # per worker
    channels_last: bool

    @classmethod
    def from_params(cls, params: Params, world_size: int = 1) -> ModelShape:
        """The shape one worker of a `world_size` run trains."""
        return cls(
            method=params.method.name,
            settings=method_settings(params.method),
            backbone=backbone_spec(params.model),
            world_size=world_size,
            batch_size=params.train.batch_size,
            channels_last=params.train.channels_last,
        )


@dataclass(frozen=True)
class Resolution:
    """The precision a run trains in, and why (for the run's record and the bench JSON)."""

    precision: Precision
    reason: str
    speedup: float | None = None  # bf16 over fp32 step rate in the probe, when one ran
    cached: bool = False


# shape -> (fp32 seconds per step, bf16 seconds per step): the probe, or a test's own timings.
Measure = Callable[[ModelShape], tuple[float, float]]


def resolve_precision(
    requested: str,
    shape: ModelShape,
    device: torch.device,
    *,
    measure: Measure | None = None,
    cache_path: Path | None = None,
) -> Resolution:
    """`fp32` and `bf16` are returned as forced; `auto` is decided for this device (see module)."""
    if requested in ("fp32", "bf16"):
        return Resolution(requested, f"train.precision: {requested} (forced)")
    if requested != "auto":
        raise ValueError(f"train.precision: expected auto, fp32 or bf16, got {requested!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Resolution("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Resolution("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Resolution("fp32", f"auto: no bf16 probe for {device.type} devices")
    flags = cpu_flags()
    native = sorted(set(NATIVE_BF16_FLAGS) & flags)
    if not native:
        return Resolution("fp32", "auto: the CPU has no native bf16 (avx512_bf16/amx_bf16)")
    threads = torch.get_num_threads()
    key = _cache_key(shape, threads, native)
    path = cache_path or precision_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One probe per machine at a time: workers of one run start together, and two probes
    # side by side slow each other unevenly (seen: 1.09x on one rank, 1.46x on the other,
    # so the ranks chose differently). The second waits and reads the first's answer. The
    # lock is the OS's, released if its holder dies; a holder stuck past the timeout
    # costs this worker only a probe of its own.
    lock = FileLock(path.with_name(f".{path.name}.lock"), timeout=PROBE_LOCK_TIMEOUT_S)
    try:
        with lock:
            if (hit := _cached(_read_cache(path).get(key))) is not None:
                return hit
            return _probe_and_cache(shape, threads, native, key, path, measure)
    except Timeout:
        return _probe_and_cache(shape, threads, native, key, path, measure)


def _probe_and_cache(
    shape: ModelShape,
    threads: int,
    native: list[str],
    key: str,
    path: Path,
    measure: Measure | None,
) -> Resolution:
    fp32_s, bf16_s = (measure or probe_step_seconds)(shape)
    speedup = fp32_s / bf16_s
    precision: Precision = "bf16" if speedup >= MIN_SPEEDUP else "fp32"
    resolution = Resolution(
        precision,
        f"auto: CPU has {'+'.join(native)}; probe at batch {min(shape.batch_size, PROBE_BATCH_CAP)}"
        f", {threads} thread(s): bf16 {speedup:.2f}x fp32 (needs >= {MIN_SPEEDUP}x)",
        round(speedup, 3),
    )
    _write_cache(path, _read_cache(path) | {key: asdict(resolution)})
    return resolution


def precision_cache_path() -> Path:
    """Where `auto` keeps its decisions (MOCO_PRECISION_CACHE moves it; delete it to re-probe)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, aarch64 `Features`); empty
    where there is no such file (then `auto` stays fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model() -> str:
    """The CPU's model name, for the cache key (`platform.processor()` where /proc has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_step_seconds(shape: ModelShape) -> tuple[float, float]:
    """Median seconds of one training step of the method (its forward and backward) in fp32
    and in bf16 autocast, interleaved so load from other processes hits both alike.

    The probe builds its own model from `shape` (the run's model is left untouched) and calls no
    collective, so workers of one run may each probe on their own. One warm-up step per precision
    (oneDNN creates its kernels there) is not timed."""
    batch = min(shape.batch_size, PROBE_BATCH_CAP)
    model = build_method(shape.method, shape.backbone, shape.settings, world_size=shape.world_size)
    spec = shape.backbone
    images = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size)
    if shape.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):
        _probe_step(model, images, bf16)
    started = time.perf_counter()
    while (
        min(len(t) for t in times.values()) < PROBE_MIN_STEPS
        or time.perf_counter() - started < PROBE_BUDGET_S
    ):
        for bf16 in (False, True):
            step_started = time.perf_counter()
            _probe_step(model, images, bf16)
            times[bf16].append(time.perf_counter() - step_started)
    return statistics.median(times[False]), statistics.median(times[True])


def _probe_step(model: Method, images: torch.Tensor, bf16: bool) -> None:
    """One step of the method on `images` as both views, without collectives."""
    with single_process(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(images, images).loss
    model.zero_grad(set_to_none=True)
    loss.backward()


def _cache_key(shape: ModelShape, threads: int, native: list[str]) -> str:
    machine = [platform.node(), cpu_model(), "+".join(native), f"torch {torch.__version__}"]
    return json.dumps(
        {"probe": PROBE_VERSION, "machine": machine, "threads": threads, "shape": asdict(shape)}
    )


def _cached(entry: object) -> Resolution | None:
    """A cache entry as a Resolution; None for a miss or an entry of another shape."""
    try:
        return Resolution(**entry | {"cached": True})  # type: ignore[operator]
    except TypeError:
        return None


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached decisions; an unreadable file counts as empty (it is only a cache)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict[str, dict]) -> None:
    """Through a temp file and a rename: workers probing side by side never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)
