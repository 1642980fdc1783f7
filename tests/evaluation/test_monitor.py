"""The per-epoch kNN monitor split across ranks scores what one process scores on its images."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from evaluation_helpers import TINY_SPEC

from moco.augment import eval_transform
from moco.knn import extract_features, knn_accuracy
from pipeline.config import Params, load_params
from pipeline.dataset import eval_loader, shard_urls
from pipeline.monitor import KnnMonitor

WORLD = 2
BANK, QUERIES = 300, 120  # even: every rank's share has one size, nothing is dropped


def _params(shards: Path) -> Params:
    overrides = [f"data.shards_dir={shards}", "model.width=4", "model.image_size=16"]
    overrides += [f"eval.monitor_bank={BANK}", f"eval.monitor_queries={QUERIES}"]
    overrides += ["eval.batch_size=64", "eval.knn_k=20"]
    return load_params(None, overrides)


def _encoder() -> torch.nn.Module:
    torch.manual_seed(4)
    return TINY_SPEC.build()[0]


def _reference(params: Params) -> float:
    """The monitor as rank 0 alone computed it before: float views through eval_transform."""
    shards, e = params.data.shards_dir, params.eval
    transform = eval_transform(params.model.image_size)

    def features(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = eval_loader(shard_urls(shards, split), transform=transform, batch_size=count)
        return extract_features(_encoder(), [next(iter(loader))])

    bank, bank_labels = features("train", BANK)
    queries, labels = features("test", QUERIES)
    return knn_accuracy(bank, bank_labels, queries, labels, 10, e.knn_k, e.knn_t)


def _monitor(params: Params, rank: int, world: int) -> KnnMonitor:
    shards = params.data.shards_dir
    train, test = shard_urls(shards, "train"), shard_urls(shards, "test")
    return KnnMonitor.load(train, test, 10, params, rank, world)


def _rank(rank: int, port: int, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        monitor = _monitor(_params(Path(shards)), rank, WORLD)
        assert len(monitor.bank) == BANK // WORLD and len(monitor.queries) == QUERIES // WORLD
        score = monitor.knn_top1(_encoder(), torch.device("cpu"), bf16=False)
        torch.save(torch.tensor(score, dtype=torch.float64), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_scores_what_the_old_rank_0_monitor_scored(digits_shards: Path) -> None:
    params = _params(digits_shards)
    score = _monitor(params, 0, 1).knn_top1(_encoder(), torch.device("cpu"), bf16=False)
    assert 0.2 < score < 1.0  # a random tiny encoder on digits: well above chance (0.1)
    assert abs(score - _reference(params)) < 1e-9


def test_two_ranks_split_the_images_and_agree_on_the_single_process_score(
    digits_shards: Path, tmp_path: Path
) -> None:
    mp.spawn(_rank, args=(_free_port(), str(digits_shards), str(tmp_path)), nprocs=WORLD)
    scores = [torch.load(tmp_path / f"rank{r}.pt").item() for r in range(WORLD)]
    assert scores[0] == scores[1]
    assert abs(scores[0] - _reference(_params(digits_shards))) < 1e-9
