"""`python -m flows {retrain,sweep} [--params FILE] [--set key=value ...] [--force]`: run a flow
once, here (`make run` runs retrain). The settings are checked before the flow starts."""

from __future__ import annotations

import argparse
import sys

from flows.retrain import retrain
from flows.sweep import sweep
from pipeline.automations import ensure_if_server, heartbeats
from pipeline.config import ConfigError, load_params
from pipeline.errors import StageError
from pipeline.evaluation.data import NoEvaluationData, require_evaluable
from pipeline.preflight import check_endpoints


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    parser.add_argument("flow", choices=["retrain", "sweep"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, as mocopipe takes it (repeatable)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="retrain even when nothing changed since production (retrain only)",
    )
    args = parser.parse_args()
    if args.force and args.flow != "retrain":
        sys.exit("error: --force applies to retrain only (a sweep always trains)")
    try:
        params = load_params(args.params, args.overrides)
        check_endpoints(params, ray=True)  # MLflow, S3, RAY_ADDRESS: refused in seconds
        require_evaluable(params, sharded=False)
        for line in ensure_if_server(params):  # a run started by hand is covered too
            print(line)
    except (ConfigError, NoEvaluationData, StageError, ValueError) as error:
        sys.exit(f"error: {error}")
    run = retrain if args.flow == "retrain" else sweep
    extra = {"force": True} if args.force else {}
    try:
        with heartbeats(params):  # a run whose process dies turns Crashed (zombie automation)
            run(params_file=args.params, overrides=args.overrides, **extra)
    except (NoEvaluationData, StageError) as error:  # a refusal, already one line
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
