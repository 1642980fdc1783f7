"""`python -m flows {retrain,sweep} [--params FILE]`: run a flow once, here (`make run` runs
retrain)."""

from __future__ import annotations

import argparse

from flows.retrain import retrain
from flows.sweep import sweep


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    parser.add_argument("flow", choices=["retrain", "sweep"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    {"retrain": retrain, "sweep": sweep}[args.flow](params_file=args.params)


if __name__ == "__main__":
    main()
