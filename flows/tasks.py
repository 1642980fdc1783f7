"""Prefect tasks: the pipeline's stage functions with retries, timeouts and caching.

Retries go where a second try can succeed and is safe (the DVC cache and remote, the
evaluation's reads); a diverged or refused run fails at once, and promotion never repeats.
Sharding is cached on its inputs (data settings and source files), so a run on unchanged data
skips it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from pipeline import (
    benchmark,
    evaluate,
    freshness,
    gc,
    history,
    pretrain,
    promote,
    shard,
    tune,
    versioning,
)
from pipeline.config import Params


def _shard_inputs(context: Any, arguments: dict[str, Any]) -> str:
    return shard.input_key(arguments["params"], arguments.get("source"))


shard_task = task(
    shard.shard,
    name="shard",
    retries=1,
    retry_delay_seconds=10,
    cache_key_fn=_shard_inputs,
    cache_expiration=timedelta(days=90),
    persist_result=True,  # the cached summary outlives the run (stack notes: Prefect caching)
)
freshness_task = task(freshness.nothing_new, name="anything-new", retries=1, retry_delay_seconds=10)
benchmark_task = task(benchmark.benchmark, name="benchmark", retries=1, retry_delay_seconds=10)
version_task = task(versioning.record_stages, name="dvc-commit", retries=2, retry_delay_seconds=5)
push_task = task(versioning.push, name="dvc-push", retries=3, retry_delay_seconds=[10, 30, 90])
pretrain_task = task(pretrain.pretrain, name="pretrain", timeout_seconds=12 * 3600)
evaluate_task = task(
    evaluate.evaluate, name="evaluate", retries=1, retry_delay_seconds=10, timeout_seconds=3600
)
# No retries: a promotion that failed after moving an alias must not register a second version
# and judge it against itself. Re-scoring production can take as long as an evaluation.
promote_task = task(promote.promote, name="promote", timeout_seconds=3600)
history_task = task(history.record, name="history", retries=1, retry_delay_seconds=10)
tune_task = task(tune.sweep, name="tune", timeout_seconds=48 * 3600)


def pretrain_and_evaluate(params: Params, run_name: str):
    """The shared middle of both flows: train (an MLflow run called `run_name`), then measure
    next to the references."""
    trained = pretrain_task(params, run_name=run_name)
    return trained, evaluate_task(params, trained.encoder_dir)


@task(name="retention")
def retention_task(params: Params, decision: promote.Decision) -> str:
    """Pin a promoted version's dvc.lock, then apply the retention policy. Housekeeping after
    the promotion: a failure is reported as a warning and never fails the run (nor undoes its
    dvc.lock); the next run, or `mocopipe gc`, tries again."""
    try:
        version = decision.version if decision.promoted else None
        return gc.after_retrain(params, version).render()
    except Exception as error:  # reported; the promotion already stands
        get_run_logger().warning("retention failed: %s: %s", type(error).__name__, error)
        return f"gc: failed ({type(error).__name__}: {error}); storage not reclaimed this run"
