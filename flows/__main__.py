"""`python -m flows retrain [--params FILE]`: run a flow once, here (what `make run` does)."""

from __future__ import annotations

import argparse

from flows.retrain import retrain


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    parser.add_argument("flow", choices=["retrain"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    retrain(params_file=args.params)


if __name__ == "__main__":
    main()
