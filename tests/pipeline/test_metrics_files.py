"""The metrics files DVC reads: a narrow headline per subject and the full table beside it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_params
from pipeline.metrics_files import write

VERSIONS = {"data_version": "d1", "benchmark_version": "b1", "eval_version": "e1"}


def test_headline_has_the_gate_first_drift_on_the_encoder_and_full_has_everything(
    tmp_path: Path,
) -> None:
    params = load_params(
        None,
        [
            f"eval.metrics_file={tmp_path / 'metrics.json'}",
            "registry.primary_metric=alignment",
            "registry.guards={linear_1pct_top1: 0.01}",
        ],
    )
    shared = ["alignment", "linear_1pct_top1", "knn_top1", "linear_top1", "rankme"]
    metrics = {name: 0.5 + i / 100 for i, name in enumerate([*shared, "fewshot_5w5s"])}
    for reference in ("pixels", "random"):
        metrics |= {f"{reference}_{k}": v + 0.1 for k, v in list(metrics.items())[:6]}
    metrics |= {"drift_mmd2": 0.02, "drift_p_value": 0.3, "agreement_production": 0.6}

    write(params, VERSIONS, metrics)

    encoder = json.loads((tmp_path / "metrics.json").read_text())
    assert list(encoder) == [*shared, "drift_mmd2", "drift_p_value"]
    assert encoder == {k: metrics[k] for k in encoder}
    for reference in ("pixels", "random"):
        row = json.loads((tmp_path / f"metrics-{reference}.json").read_text())
        assert row == {k: metrics[f"{reference}_{k}"] for k in shared}
    full = json.loads((tmp_path / "metrics-full.json").read_text())
    assert full == {**VERSIONS, **metrics}
