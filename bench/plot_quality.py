"""Plot kNN top-1 against training minutes from bench/quality_budget.py's JSON lines.

One curve per line (its label, images/s and precision in the legend), the raw-pixel kNN of the
same protocol as a dashed line, and the machine and date the runs give in the title. Example:

    .venv/bin/python bench/plot_quality.py bench/plots/quality.jsonl \
        --out bench/plots/knn_vs_minutes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", help="quality_budget.py output, one JSON line per run")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    runs = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line]
    if not runs:
        raise SystemExit(f"{args.jsonl}: no runs")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = run["curve"]
        speed = f"{run['images_per_s']:.0f} img/s, {run['precision']}"
        label = f"{run['label'] or run['set']} ({speed})"
        ax.plot(
            [p["minutes"] for p in points],
            [p["knn_top1"] for p in points],
            marker="o",
            label=label,
        )
    pixels = runs[0]["pixels"]["knn_top1"]
    ax.axhline(pixels, color="grey", linestyle="--", label=f"raw pixels ({pixels:.4f})")
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['threads']} threads" for r in runs})
    dates = sorted({r["machine"]["date"][:10] for r in runs})
    ax.set_title(f"kNN top-1 vs training minutes\n{'; '.join(machines)}, {', '.join(dates)}")
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel(f"kNN top-1 ({runs[0]['protocol'].split(';')[0]})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
