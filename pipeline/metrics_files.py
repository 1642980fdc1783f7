"""The evaluation as DVC reads it: a few headline numbers per file, the full table beside them.

`dvc metrics show` prints one row per metrics file and one column per key, so the headline is
split by subject: `metrics.json` (the encoder: the gated metric, the guards, kNN, the linear
probe, RankMe and drift) and `metrics-pixels.json` / `metrics-random.json` (the references, same
keys), which line up as rows of one narrow table. `metrics-full.json` holds every metric and the
data versions (what `mocopipe promote` reads); `dvc metrics show metrics-full.json` shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.evaluation import keys

HEADLINE = ("knn_top1", "linear_top1", keys.RANKME)  # besides the gated metric and the guards
DRIFT = (keys.DRIFT_MMD, keys.DRIFT_P)  # the encoder's file only: drift is about the data
FULL_SUFFIX = "-full"


def full_path(metrics_file: str | Path) -> Path:
    """metrics.json -> metrics-full.json, beside it."""
    path = Path(metrics_file)
    return path.with_name(f"{path.stem}{FULL_SUFFIX}{path.suffix}")


def reference_path(metrics_file: str | Path, reference: str) -> Path:
    """metrics.json -> metrics-pixels.json, beside it."""
    path = Path(metrics_file)
    return path.with_name(f"{path.stem}-{reference}{path.suffix}")


def headline_keys(params: Params) -> list[str]:
    """The encoder metric names of the headline, gated ones first, without repeats."""
    r = params.registry
    return list(dict.fromkeys([r.primary_metric, *r.guards, *HEADLINE]))


def headline(params: Params, metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{file: its headline numbers}: the encoder's, then one file per reference."""
    names = headline_keys(params)
    files = {
        str(params.eval.metrics_file): {k: metrics[k] for k in [*names, *DRIFT] if k in metrics}
    }
    for reference in keys.REFERENCES:
        found = {k: metrics[f"{reference}_{k}"] for k in names if f"{reference}_{k}" in metrics}
        files[str(reference_path(params.eval.metrics_file, reference))] = found
    return files


def write(params: Params, versions: dict[str, str], metrics: dict[str, float]) -> None:
    """The headline files and the full one."""
    for path, values in headline(params, metrics).items():
        _dump(Path(path), values)
    _dump(full_path(params.eval.metrics_file), {**versions, **metrics})


def _dump(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
