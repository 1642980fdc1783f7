"""The `retrain` flow: shard -> pretrain -> evaluate -> promote -> version, with a summary.

Scheduled retraining runs this: only new images are sharded (and an unchanged source skips
sharding altogether), the encoder is warm-started from `@production` when `train.init_from`
says so, and the gate decides whether it serves. A run whose data, benchmark, settings and code
are those of production (or of the last candidate) ends before training: nothing new to learn
(pipeline/freshness.py). A failed run leaves `@production` and dvc.lock as they were (the DVC
remote may hold extra, unreferenced blobs).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.lock import project_lock, restored_on_failure
from flows.tasks import (
    benchmark_task,
    freshness_task,
    history_task,
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
from pipeline.history import markdown
from pipeline.preflight import check_endpoints
from pipeline.pretrain import warm_start_or_scratch
from pipeline.shard import ShardSummary
from pipeline.summary import retrain_summary

HISTORY_DIR = Path("runs/history")  # history.md and history.png, also on the run's artifacts


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


def _report(summary: str) -> str:
    create_markdown_artifact(key="retrain-summary", markdown=summary, description="retrain")
    print(summary)
    return summary


@flow(name="retrain", log_prints=True)
def retrain(
    params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False
) -> str:
    """Retrain the encoder on the current data and promote it if it beats production.

    `overrides` are `key=value` settings, as `mocopipe --set` takes them. When the data,
    benchmark, settings and code are those production (or the last candidate) was made from,
    the run ends before training, unless `force` or `registry.retrain_unchanged`."""
    params = load_params(params_file, overrides)
    check_endpoints(params, ray=True)  # a dead server is refused now, not after the sharding
    with project_lock(), restored_on_failure(Path("dvc.lock")):
        sharded, cached = _shard(params)
        print("shard: skipped, inputs unchanged (cached)" if cached else sharded.render())
        benchmarked = benchmark_task(params)
        if benchmarked is not None:
            print(benchmarked.render())
        require_evaluable(params)  # a refusal now, not a traceback after minutes of training
        if not (force or params.registry.retrain_unchanged):
            unchanged = freshness_task(params)
            if unchanged is not None:
                return _report(unchanged.summary())
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
    _history(params, trained.run_id)
    return _report(retrain_summary(sharded, trained, report, decision, cached=cached, init=init))


def _history(params: Params, run_id: str) -> None:
    """The registry's history as the `retrain-history` artifact and on the run; a report, so a
    failure to write it is said, not a failed retrain (the promotion has happened)."""
    state = history_task(params, run_id, HISTORY_DIR, return_state=True)
    if not state.is_completed():
        print(f"history: not recorded ({state.message})")
        return
    create_markdown_artifact(
        key="retrain-history", markdown=markdown(state.result()), description="history"
    )
