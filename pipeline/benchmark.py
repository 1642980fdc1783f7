"""The benchmark stage: a fixed labelled set, apart from the training stream, that every model
is scored on (eval.benchmark). Sharded once by the shard stage's own code into
eval.benchmark_dir, where DVC versions it; a re-run is a no-op while the set is unchanged.

A team's own images arrive unlabelled, so the labelled protocols (kNN, probes, few-shot,
robustness) need labels from somewhere else: a built-in set (fashion-mnist, digits) or a folder
with train/ and test/ class folders. The transfer probe's dataset is sharded the same way.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.dataset import read_manifest
from pipeline.shard import ShardSummary, shard
from pipeline.sources import SPLIT_FOLDERS, SourceError


def shard_reference(
    params: Params, source: str, shards_dir: str, *, train_limit: int = 0, test_limit: int = 0
) -> ShardSummary:
    """Shard a labelled reference set (idempotent: current shards are not rewritten)."""
    folder = Path(source)
    if source not in ("fashion-mnist", "digits"):
        splits = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        if not {"train", "test"} <= splits or not splits <= set(SPLIT_FOLDERS):
            raise SourceError(
                f"eval.benchmark={source!r}: expected fashion-mnist, digits or a folder holding "
                "train/ and test/ with one sub-folder per class; fix eval.benchmark"
            )
    data = params.data.model_copy(
        update={
            "source": source,
            "shards_dir": shards_dir,
            "train_limit": train_limit,
            "test_limit": test_limit,
            "labels": "folders",
            "holdout_percent": 0.0,
            "image_mode": "auto",
        }
    )
    return shard(params.model_copy(update={"data": data}))


def benchmark(params: Params) -> ShardSummary | None:
    """Shard eval.benchmark into eval.benchmark_dir; None when no benchmark is configured
    (the labelled protocols then use the source's own labelled splits, if it has any, and the
    folder stays empty)."""
    e = params.eval
    if not e.benchmark:
        Path(e.benchmark_dir).mkdir(parents=True, exist_ok=True)  # DVC's output, kept empty
        return None
    summary = shard_reference(
        params,
        e.benchmark,
        e.benchmark_dir,
        train_limit=e.benchmark_train_limit,
        test_limit=e.benchmark_test_limit,
    )
    refuse_overlap(params)
    return summary


def refuse_overlap(params: Params) -> None:
    """Refuse a benchmark that shares an image with the training stream (by the content
    sha256 both manifests list): a model scored on images it was trained on would look better
    than it is. Checked on every run, since each drop may bring the overlap."""
    try:
        trained = read_manifest(params.data.shards_dir, "train")["files"]
    except FileNotFoundError:
        return  # nothing sharded yet: the next run checks
    stream = {sha for sha in trained.values() if sha}
    for split in ("train", "test"):
        listed = read_manifest(params.eval.benchmark_dir, split)["files"]
        shared = sorted(ref for ref, sha in listed.items() if sha in stream)
        if shared:
            raise SourceError(
                f"eval.benchmark={params.eval.benchmark!r}: {len(shared)} image(s) of its {split}"
                f" split are also in the training stream {params.data.shards_dir}/train (e.g. "
                f"{shared[0]}); use a benchmark apart from data.source, or change eval.benchmark"
            )
