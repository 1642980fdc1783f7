"""train.precision: forced values pass through, `auto` is decided by capability and a timed
probe (timings injected here), cached per model shape, and never picks the slower precision."""

import multiprocessing as mp
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

from moco.backbones import BackboneSpec
from pipeline import precision as precision_module
from pipeline.config import ConfigError, load_params
from pipeline.precision import ModelShape, Resolution, probe_step_seconds, resolve_precision

CPU = torch.device("cpu")
SHAPE = ModelShape(
    method="mocov2",
    settings={"queue_size": 16, "bn_splits": 2},
    backbone=BackboneSpec("resnet18", in_channels=1, image_size=8, width=4),
    world_size=1,
    batch_size=4,
    channels_last=True,
)


class Timings:
    """A probe that answers fixed (fp32, bf16) seconds per step and counts its calls."""

    def __init__(self, fp32_s: float, bf16_s: float) -> None:
        self.answer, self.calls = (fp32_s, bf16_s), []

    def __call__(self, shape: ModelShape) -> tuple[float, float]:
        self.calls.append(shape)
        return self.answer


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU reports native bf16, whatever machine the tests run on."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: {"avx2", "avx512_bf16"})


def auto(tmp_path: Path, timings: Timings, shape: ModelShape = SHAPE) -> Resolution:
    return resolve_precision(
        "auto", shape, CPU, measure=timings, cache_path=tmp_path / "precision.json"
    )


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_forced_precision_is_kept_without_a_probe(tmp_path: Path, forced: str) -> None:
    timings = Timings(1.0, 0.1)
    resolution = resolve_precision(
        forced, SHAPE, CPU, measure=timings, cache_path=tmp_path / "c.json"
    )
    assert resolution.precision == forced
    assert "forced" in resolution.reason
    assert timings.calls == [] and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "chosen"),
    [
        (1.0, 0.5, "bf16"),  # 2x faster
        (1.0, 2.0, "fp32"),  # bf16 slower: never chosen
        (1.0, 0.95, "fp32"),  # 1.05x: within noise, not worth the lower precision
        (1.0, 1.0 / precision_module.MIN_SPEEDUP, "bf16"),  # exactly the threshold
    ],
)
def test_auto_picks_bf16_only_when_measurably_faster(
    tmp_path: Path, native_bf16: None, fp32_s: float, bf16_s: float, chosen: str
) -> None:
    resolution = auto(tmp_path, Timings(fp32_s, bf16_s))
    assert resolution.precision == chosen
    assert resolution.speedup == pytest.approx(fp32_s / bf16_s, abs=1e-3)
    assert f"{fp32_s / bf16_s:.2f}x" in resolution.reason


def test_auto_without_native_bf16_is_fp32_without_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: {"avx2", "avx512f"})
    timings = Timings(1.0, 0.1)
    resolution = auto(tmp_path, timings)
    assert resolution.precision == "fp32"
    assert "no native bf16" in resolution.reason
    assert timings.calls == []


def test_auto_is_cached_per_model_shape(tmp_path: Path, native_bf16: None) -> None:
    timings = Timings(1.0, 0.5)
    first = auto(tmp_path, timings)
    again = auto(tmp_path, timings)
    assert (first.cached, again.cached) == (False, True)
    assert again.precision == first.precision and again.reason == first.reason
    assert timings.calls == [SHAPE]  # the hit did not probe

    wider = replace(SHAPE, backbone=replace(SHAPE.backbone, width=8))
    slower = Timings(1.0, 3.0)
    assert auto(tmp_path, slower, wider).precision == "fp32"  # another shape: a miss
    assert slower.calls == [wider]
    assert auto(tmp_path, Timings(1.0, 3.0)).precision == "bf16"  # the first entry is kept


class HeldProbe:
    """A probe that logs its call (seen across processes), says it has started, and holds the
    cache's lock until the test creates the release file."""

    def __init__(self, folder: Path) -> None:
        self.log, self.started, self.release = (folder / n for n in ("probes", "started", "go"))

    def __call__(self, shape: ModelShape) -> tuple[float, float]:
        with self.log.open("a") as out:
            out.write(f"{os.getpid()}\n")
        self.started.touch()
        _wait_for(self.release)
        return 1.0, 0.5


def _wait_for(path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def _resolve_in_child(tmp_path: Path, results: "mp.Queue[tuple[str, bool]]") -> None:
    found = auto(tmp_path, HeldProbe(tmp_path))  # type: ignore[arg-type]
    results.put((found.precision, found.cached))


def test_workers_starting_together_probe_once_per_machine(
    tmp_path: Path, native_bf16: None
) -> None:
    # two worker processes of one run resolve together: while the first probes it holds the
    # cache's lock (no other process can take it), and the second reads the first's answer
    context = mp.get_context("fork")
    results = context.Queue()
    probe = HeldProbe(tmp_path)
    first = context.Process(target=_resolve_in_child, args=(tmp_path, results))
    first.start()
    _wait_for(probe.started)  # the first is inside its probe, under the lock
    lock = FileLock(tmp_path / ".precision.json.lock", timeout=0)
    with pytest.raises(Timeout):
        lock.acquire()
    second = context.Process(target=_resolve_in_child, args=(tmp_path, results))
    second.start()
    probe.release.touch()
    for worker in (first, second):
        worker.join(timeout=120)
    assert [w.exitcode for w in (first, second)] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in "ab") == [("bf16", False), ("bf16", True)]
    assert len(probe.log.read_text().splitlines()) == 1
    with lock:  # released by its holder's exit
        pass


def test_auto_cache_depends_on_thread_count(tmp_path: Path, native_bf16: None) -> None:
    threads = torch.get_num_threads()
    timings = Timings(1.0, 0.5)
    auto(tmp_path, timings)
    try:
        torch.set_num_threads(threads + 1)
        auto(tmp_path, timings)
    finally:
        torch.set_num_threads(threads)
    assert len(timings.calls) == 2


def test_an_unreadable_cache_is_a_miss_and_rewritten(tmp_path: Path, native_bf16: None) -> None:
    (tmp_path / "precision.json").write_text("{not json")
    timings = Timings(1.0, 0.5)
    assert auto(tmp_path, timings).precision == "bf16"
    assert auto(tmp_path, timings).cached
    assert len(timings.calls) == 1


def test_answers_of_an_older_probe_are_measured_again(
    tmp_path: Path, native_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Timings(1.0, 0.95)  # a skewed probe (e.g. two side by side): fp32
    monkeypatch.setattr(precision_module, "PROBE_VERSION", 1)
    assert auto(tmp_path, first).precision == "fp32"
    monkeypatch.setattr(precision_module, "PROBE_VERSION", 2)
    again = Timings(1.0, 0.8)
    found = auto(tmp_path, again)
    assert (found.precision, found.cached, len(again.calls)) == ("bf16", False, 1)


def test_the_cache_path_comes_from_the_environment(
    tmp_path: Path, native_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(precision_module.CACHE_ENV, str(tmp_path / "elsewhere.json"))
    resolve_precision("auto", SHAPE, CPU, measure=Timings(1.0, 0.5))
    assert (tmp_path / "elsewhere.json").exists()


def test_the_probe_times_both_precisions_of_the_real_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every convolution of the probe's model runs in fp32 in one half and under bf16 autocast
    in the other, the same number of times each: the timings compare the two precisions."""
    monkeypatch.setattr(precision_module, "PROBE_BUDGET_S", 0.0)  # the minimum steps only
    seen: list[tuple[bool, torch.dtype]] = []

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    with torch.nn.modules.module.register_module_forward_hook(record):
        fp32_s, bf16_s = probe_step_seconds(SHAPE)
    assert fp32_s > 0 and bf16_s > 0
    fp32 = [dtype for autocast, dtype in seen if not autocast]
    bf16 = [dtype for autocast, dtype in seen if autocast]
    assert set(fp32) == {torch.float32} and set(bf16) == {torch.bfloat16}
    assert len(fp32) == len(bf16) > 0


def test_the_worker_shape_follows_the_params() -> None:
    params = load_params(None, ["train.batch_size=64", "model.width=8"])
    one, two = ModelShape.from_params(params, 1), ModelShape.from_params(params, 2)
    assert (one.batch_size, one.backbone.width, one.method) == (64, 8, "mocov2")
    assert one.settings["bn_splits"] == params.method.bn_splits
    assert (one.world_size, two.world_size) == (1, 2)  # MoCo v2 builds plain BN across ranks


def test_config_defaults_to_auto_and_refuses_other_precisions() -> None:
    assert load_params(None).train.precision == "auto"
    assert load_params(None, ["train.precision=fp32"]).train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_params(None, ["train.precision=fp16"])
