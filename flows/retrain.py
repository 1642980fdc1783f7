"""The `retrain` flow: shard -> pretrain -> evaluate -> promote -> version, with a summary.

Scheduled retraining runs this: only new images are sharded (and an unchanged source skips
sharding altogether), the encoder is warm-started from `@production` when `train.init_from`
says so, and the gate decides whether it serves. A failed run leaves `@production` and
dvc.lock as they were (the DVC remote may hold extra, unreferenced blobs).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.lock import project_lock, restored_on_failure
from flows.tasks import (
    benchmark_task,
    pretrain_and_evaluate,
    promote_task,
    push_task,
    retention_task,
    shard_task,
    version_task,
)
from pipeline.config import Params, load_params
from pipeline.dataset import data_version
from pipeline.evaluation.data import require_evaluable
from pipeline.events import announce
from pipeline.preflight import check_endpoints
from pipeline.pretrain import warm_start_or_scratch
from pipeline.shard import ShardSummary
from pipeline.summary import retrain_summary


def _shard(params: Params) -> tuple[ShardSummary, bool]:
    """Shard, or reuse the cached result when the inputs are unchanged and the shards on disk
    are still the version it produced (else they were changed or removed: shard again)."""
    state = shard_task(params, return_state=True)
    sharded = state.result()
    if state.name != "Cached":
        return sharded, False
    try:
        if data_version(params.data.shards_dir) == sharded.data_version:
            return sharded, True
    except FileNotFoundError:
        pass
    return shard_task.with_options(refresh_cache=True)(params), False


@flow(name="retrain", log_prints=True)
def retrain(params_file: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """Retrain the encoder on the current data and promote it if it beats production.

    `overrides` are `key=value` settings, as `mocopipe --set` takes them."""
    params = load_params(params_file, overrides)
    check_endpoints(params, ray=True)  # a dead server is refused now, not after the sharding
    with project_lock(), restored_on_failure(Path("dvc.lock")):
        sharded, cached = _shard(params)
        print("shard: skipped, inputs unchanged (cached)" if cached else sharded.render())
        benchmarked = benchmark_task(params)
        if benchmarked is not None:
            print(benchmarked.render())
        require_evaluable(params)  # a refusal now, not a traceback after minutes of training
        params, init = warm_start_or_scratch(params)
        print(init)
        run_name = f"retrain-{datetime.now(UTC):%Y%m%d-%H%M}-{data_version(params.data.shards_dir)}"
        trained, report = pretrain_and_evaluate(params, run_name)
        # everything that can fail runs before promote, the one step that acts outside the
        # project: a failure until then leaves @production as it was and dvc.lock is restored
        version_task("shard", "benchmark", "pretrain", "evaluate")
        push_task()
        decision = promote_task(params, trained.model_uri, report.metrics, report.versions)
        version_task("promote")
        print(retention_task(params, decision))  # bounded storage: params.yaml's retention
    announce(params, decision, report.metrics)  # promoted / challenger / drift alarm
    summary = retrain_summary(sharded, trained, report, decision, cached=cached, init=init)
    create_markdown_artifact(key="retrain-summary", markdown=summary, description="retrain")
    print(summary)
    return summary
