"""Prefect tasks: the pipeline's stage functions with retries, timeouts and caching.

Retries go where a second try can succeed (the tracking server, storage, the Ray cluster);
a diverged or refused run fails at once. Sharding is cached on its inputs (data settings,
source files, shards on disk), so a run on unchanged data skips it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task

from pipeline import evaluate, pretrain, promote, shard, tune, versioning
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
version_task = task(versioning.record_stages, name="dvc-commit", retries=2, retry_delay_seconds=5)
push_task = task(versioning.push, name="dvc-push", retries=3, retry_delay_seconds=[10, 30, 90])
pretrain_task = task(pretrain.pretrain, name="pretrain", timeout_seconds=12 * 3600)
evaluate_task = task(
    evaluate.evaluate, name="evaluate", retries=1, retry_delay_seconds=10, timeout_seconds=3600
)
promote_task = task(
    promote.promote, name="promote", retries=2, retry_delay_seconds=[10, 60], timeout_seconds=900
)
tune_task = task(tune.sweep, name="tune", timeout_seconds=48 * 3600)


def pretrain_evaluate_promote(params: Params, decision_file: str = promote.DECISION_FILE):
    """The shared tail of both flows: train, measure, and let the gate decide."""
    trained = pretrain_task(params)
    report = evaluate_task(params, trained.encoder_dir)
    decision = promote_task(
        params, trained.model_uri, report.metrics, report.data_version, decision_file=decision_file
    )
    return trained, report, decision
