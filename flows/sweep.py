"""The `sweep` flow: tune -> pretrain the best config -> evaluate -> promote.

The sweep's outputs live under its own folder (<tune.storage_path>/<sweep>/best), not in the
DVC-tracked models/encoder, metrics.json and promotion.json: those record what params.yaml
produced. With `tune.storage_path` on an object store the best run's Ray checkpoints go there and
its local files (encoder, metrics, plots, decision) to runs/tune/<sweep>/best. To make the sweep's
config the project's, copy tune/best.yaml into params.yaml and retrain.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.lock import project_lock
from flows.tasks import benchmark_task, pretrain_and_evaluate, promote_task, tune_task
from pipeline import storage
from pipeline.config import load_params, with_overrides
from pipeline.evaluation.data import require_evaluable
from pipeline.events import announce
from pipeline.summary import sweep_summary


@flow(name="sweep", log_prints=True)
def sweep(
    params_file: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False
) -> str:
    """Sweep MoCo's hyperparameters, retrain the best config, and let the gate decide."""
    params = load_params(params_file, overrides)
    with project_lock():
        benchmark_task(params)
        require_evaluable(params)
        swept = tune_task(params, resume=resume)
        print(swept.render())
        remote = storage.join(params.tune.storage_path, swept.name, "best")
        out = Path("runs/tune", swept.name, "best") if storage.is_remote(remote) else Path(remote)
        best = with_overrides(
            load_params(swept.best_params_file),
            {
                "train.output_dir": str(out / "encoder"),
                "train.storage_path": storage.join(remote, "ray"),
                "eval.metrics_file": str(out / "metrics.json"),
                "eval.plots_dir": str(out / "eval_plots"),
            },
            keep_space=True,
        )
        trained, report = pretrain_and_evaluate(best, f"sweep-{swept.name}-best")
        decision = promote_task(
            best,
            trained.model_uri,
            report.metrics,
            report.versions,
            decision_file=str(out / "promotion.json"),
        )
    announce(best, decision, report.metrics)
    summary = sweep_summary(swept, trained, report, decision)
    create_markdown_artifact(key="sweep-summary", markdown=summary, description="sweep")
    print(summary)
    return summary
