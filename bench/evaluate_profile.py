"""Where the evaluate stage's minutes go: cumulative seconds per protocol for one encoder.

Why: on a 2-CPU box every minute the stage spends is a minute the flow's budget cannot give to
training, so the suite is trimmed where a protocol costs much and tells little. Runs
`pipeline.evaluate.score` (the stage's metrics, every reference included, nothing recorded)
under cProfile with the feature cache off, so every feature pass is paid as on a model's first
evaluation, and sums the cumulative time of the functions each protocol runs in. Functions nest
(`robustness` runs inside the per-subject protocols, `features` inside `transfer`), so the rows
overlap and do not add up to the total. Ends with ONE JSON line. Example:

    .venv/bin/python bench/evaluate_profile.py --params params.yaml --model models/encoder
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
from datetime import UTC, datetime

import torch
from train_step import matmul_peak_gflops

from pipeline.config import load_params, with_overrides
from pipeline.evaluate import score
from pipeline.precision import cpu_model

# row -> (module file suffix, function name): where each protocol's time is spent
PHASES = {
    "decode images": ("evaluation/features.py", "load_split"),
    "feature passes": ("evaluation/features.py", "extract"),
    "kNN": ("moco/knn.py", "knn_top1"),
    "linear probes (all fits)": ("evaluation/probes.py", "fit_probe"),
    "few-shot": ("evaluation/fewshot.py", "fewshot_accuracy"),
    "transfer (features + probe)": ("pipeline/evaluate.py", "_transfer_top1"),
    "robustness (corruptions + attacks)": ("evaluation/robustness.py", "robustness_metrics"),
    "supervised baseline (training)": ("evaluation/supervised.py", "train_supervised"),
    "label-free": ("pipeline/evaluate.py", "_label_free"),
}


def _cumulative(stats: dict, file_suffix: str, function: str) -> float:
    """Seconds spent in `function` of the file ending `file_suffix`, callees included."""
    return sum(
        ct
        for (file, _, name), (_, _, _, ct, _) in stats.items()
        if file.endswith(file_suffix) and name == function
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/encoder")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as mocopipe's")
    args = parser.parse_args()
    params = with_overrides(load_params(args.params, args.set), {"eval.features_dir": ""})
    peak = matmul_peak_gflops(torch.float32)

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    metrics = score(params, args.model)
    profiler.disable()
    total = time.perf_counter() - start

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    seconds = {row: round(_cumulative(stats, *where), 1) for row, where in PHASES.items()}
    for row, value in seconds.items():
        print(f"{row:40s} {value:7.1f} s  {value / total:6.1%}")
    print(f"{'total':40s} {total:7.1f} s")
    result = {
        "model": args.model,
        "set": args.set,
        "total_s": round(total, 1),
        "phases_s": seconds,
        "metrics": len(metrics),
        "knn_top1": metrics.get("knn_top1"),
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "matmul_fp32_gflops_per_s": round(peak, 1),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
