"""Helpers for the evaluation tests (a plain module, so test files import it by name)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelParams, Params, load_params
from pipeline.encoder import EncoderSpec

# Width 4 at 16 px (digits are upsampled from 8 px): every forward pass is trivial.
TINY_SPEC = EncoderSpec.from_params(Params(model=ModelParams(width=4, image_size=16)))

# Small knobs: every protocol runs, on digits (1437 train / 360 test images), in seconds.
TINY_EVAL = {
    "knn_k": 20,
    "knn_extra_k": [5],
    "batch_size": 256,
    "probe_iters": 30,
    "fewshot_episodes": 20,
    "supervised_steps": 10,
    "supervised_batch_size": 16,
    "robustness_subset": 48,
    "corruption_severities": [1, 3],
    "attack_eps": [0.05],
    "pgd_steps": 2,
    "tsne_points": 60,
}


def tiny_params(root: Path, shards: Path, **eval_overrides: object) -> Params:
    """Params for a stage run on the digits shards, every output under `root`."""
    settings = {
        **TINY_EVAL,
        "features_dir": root / "features",
        "plots_dir": root / "plots",
        "metrics_file": root / "metrics.json",
        "transfer_shards_dir": shards,  # digits -> digits: the transfer path, without a 2nd set
        **eval_overrides,
    }
    overrides = [
        f"data.shards_dir={shards}",
        "data.min_shards=2",
        f"tracking.uri=sqlite:///{root}/m.db",
    ]
    overrides += [f"eval.{key}={value}" for key, value in settings.items()]
    return load_params(None, overrides)
