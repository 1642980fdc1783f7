"""Which data each kind of protocol is measured on, and the versions that make two
evaluations comparable.

- Labelled protocols: the benchmark's train/test splits (eval.benchmark, in its own folder),
  else the source's own labelled splits, else none (an unlabelled stream with no benchmark).
- Label-free metrics: a fixed slice of the held-out split of the training stream (a folder's
  `holdout`, else `test`): the first shards holding eval.label_free_samples images. New shards
  are appended after the old ones, so once it is full the slice never changes as data arrives.
- Drift: the training split's shards that a model was trained on (a prefix: shards are only
  ever appended) against the shards added since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from pipeline.config import Params
from pipeline.dataset import data_version, read_manifest, shard_urls
from pipeline.evaluation import keys
from pipeline.sources import HOLDOUT

HELDOUT_SPLITS = (HOLDOUT, "test")


class NoEvaluationData(ValueError):
    """The configured evaluation cannot run on this data; the message names the setting."""


@dataclass(frozen=True)
class Slice:
    """Shard URLs and how many of their images to take (the loader's fixed order)."""

    urls: list[str]
    samples: int
    version: str


def _has_split(shards_dir: str, split: str, *, labelled: bool = False) -> bool:
    try:
        manifest = read_manifest(shards_dir, split)
    except FileNotFoundError:
        return False
    return bool(manifest["label_counts"]) if labelled else manifest["samples"] > 0


def labelled_dir(params: Params) -> str | None:
    """Where the labelled protocols read train/test: the benchmark, the source's own labelled
    splits, or None."""
    if params.eval.benchmark:
        return params.eval.benchmark_dir
    shards = params.data.shards_dir
    if all(_has_split(shards, split, labelled=True) for split in ("train", "test")):
        return shards
    return None


def heldout_slice(params: Params) -> Slice | None:
    """The label-free metrics' images: None when off or when the stream holds nothing back."""
    wanted, shards = params.eval.label_free_samples, params.data.shards_dir
    split = next((s for s in HELDOUT_SPLITS if _has_split(shards, s)), None)
    if not wanted or split is None:
        return None
    listed = read_manifest(shards, split)["shards"]
    ends = list(accumulate(s["samples"] for s in listed))
    used = next((i + 1 for i, end in enumerate(ends) if end >= wanted), len(listed))
    samples = min(wanted, ends[used - 1])
    identity = [split, samples, [[s["file"], s["sha256"]] for s in listed[:used]]]
    return Slice(shard_urls(shards, split)[:used], samples, _short_hash(identity))


def drift_sides(params: Params, trained_on: int) -> tuple[Slice, Slice] | None:
    """(old, new) training shards around the first `trained_on` samples (what production saw),
    each thinned to about eval.drift_samples images spread over its shards; None when nothing
    arrived since or the split was rebuilt (its first shards no longer add up to `trained_on`)."""
    n, shards = params.eval.drift_samples, params.data.shards_dir
    listed = read_manifest(shards, "train")["shards"]
    ends = [0, *accumulate(s["samples"] for s in listed)]
    if not n or trained_on not in ends or trained_on == ends[-1]:
        return None
    cut = ends.index(trained_on)
    urls = shard_urls(shards, "train")
    return _spread(urls[:cut], listed[:cut], n), _spread(urls[cut:], listed[cut:], n)


def _spread(urls: list[str], listed: list[dict], n: int) -> Slice:
    """Every k-th shard, so a sample of n images covers the whole range, not its first days."""
    per_shard = max(1, sum(s["samples"] for s in listed) // len(listed))
    step = max(1, len(listed) // max(1, -(-n // per_shard)))
    picked = list(range(0, len(listed), step))
    samples = min(n, sum(listed[i]["samples"] for i in picked))
    identity = [[listed[i]["file"], listed[i]["sha256"]] for i in picked]
    return Slice([urls[i] for i in picked], samples, _short_hash(identity))


def train_samples(params: Params) -> int:
    """Images in the training split now (recorded with a model: what it was trained on)."""
    return int(read_manifest(params.data.shards_dir, "train")["samples"])


def versions(params: Params) -> dict[str, str]:
    """The data versions an evaluation depends on: the training stream (`data_version`), the
    labelled set (`benchmark_version`, "" without one) and the held-out slice. `eval_version`
    combines the last two: equal eval versions, comparable scores."""
    labelled = labelled_dir(params)
    heldout = heldout_slice(params)
    found = {
        "data_version": data_version(params.data.shards_dir),
        "benchmark_version": data_version(labelled) if labelled else "",
        "heldout_version": heldout.version if heldout else "",
    }
    found["eval_version"] = _short_hash([found["benchmark_version"], found["heldout_version"]])
    return found


def require_evaluable(params: Params, *, sharded: bool = True) -> None:
    """Refuse, before any training, an evaluation that cannot produce the gate's metric.

    `sharded=False` checks what the settings alone tell (a flow's first step, before sharding):
    an unlabelled folder with no benchmark cannot give a labelled metric."""
    metric = params.registry.primary_metric
    if metric in keys.NOT_GATEABLE:
        raise NoEvaluationData(
            f"registry.primary_metric={metric} compares with production, it does not rank "
            "models; gate on a quality metric such as knn_top1 or rankme"
        )
    unlabelled_folder = Path(params.data.source).is_dir() and params.data.labels == "none"
    no_labels = not params.eval.benchmark and unlabelled_folder
    if sharded:
        no_labels = labelled_dir(params) is None
    if keys.needs_labels(metric) and no_labels:
        raise NoEvaluationData(
            f"registry.primary_metric={metric} needs labels, but {params.data.shards_dir} has no "
            "labelled train/test splits (data.labels=none) and eval.benchmark is empty; set "
            "eval.benchmark=fashion-mnist (or a labelled folder), or gate on a label-free metric: "
            "registry.primary_metric=rankme"
        )
    if sharded and not keys.needs_labels(metric) and heldout_slice(params) is None:
        raise NoEvaluationData(
            f"registry.primary_metric={metric} is label-free but {params.data.shards_dir} holds "
            "no held-out split (holdout or test) or eval.label_free_samples is 0; set "
            "data.holdout_percent > 0 and eval.label_free_samples > 0"
        )


def _short_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
