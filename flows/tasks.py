"""Prefect tasks: the pipeline's stage functions with retries and timeouts where they help.

Retries go where a second try can succeed (the tracking server, storage, the Ray cluster);
a diverged or refused run fails at once.
"""

from __future__ import annotations

from prefect import task

from pipeline import evaluate, pretrain, promote, shard, versioning

shard_task = task(shard.shard, name="shard", retries=1, retry_delay_seconds=10)
version_task = task(versioning.record_stages, name="dvc-commit", retries=2, retry_delay_seconds=5)
push_task = task(versioning.push, name="dvc-push", retries=2, retry_delay_seconds=10)
pretrain_task = task(pretrain.pretrain, name="pretrain", timeout_seconds=6 * 3600)
evaluate_task = task(evaluate.evaluate, name="evaluate", retries=1, retry_delay_seconds=10)
promote_task = task(promote.promote, name="promote", retries=2, retry_delay_seconds=10)
