"""The `retrain` flow: shard -> version -> pretrain -> evaluate -> promote, with a summary."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.tasks import (
    evaluate_task,
    pretrain_task,
    promote_task,
    push_task,
    shard_task,
    version_task,
)
from pipeline.config import load_params
from pipeline.summary import retrain_summary


@flow(name="retrain", log_prints=True)
def retrain(params_file: str = "params.yaml") -> str:
    """Retrain the encoder on the current data and promote it if it beats production."""
    params = load_params(params_file)
    sharded = shard_task(params)
    version_task("shard")
    push_task()
    trained = pretrain_task(params)
    report = evaluate_task(params, trained.encoder_dir)
    decision = promote_task(params, trained.model_uri, report.metrics, report.data_version)
    version_task("pretrain", "evaluate", "promote")
    push_task()
    summary = retrain_summary(sharded, trained, report, decision)
    create_markdown_artifact(key="retrain-summary", markdown=summary, description="retrain")
    print(summary)
    return summary
