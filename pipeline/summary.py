"""The end-of-run summary: what a person reads after a retrain (also a Prefect artifact)."""

from __future__ import annotations

from pipeline.evaluate import REFERENCES, EvalReport
from pipeline.pretrain import PretrainResult
from pipeline.promote import Decision
from pipeline.shard import ShardSummary


def retrain_summary(
    sharded: ShardSummary, trained: PretrainResult, report: EvalReport, decision: Decision
) -> str:
    """Markdown: data version, metrics next to references, the decision, where to look."""
    rows = [
        f"| {name} | {value:.4f} | "
        + " | ".join(
            f"{report.metrics.get(f'{ref}_{name}', float('nan')):.4f}" for ref in REFERENCES
        )
        + " |"
        for name, value in report.metrics.items()
        if not name.startswith(REFERENCES)
    ]
    verdict = "promoted to `@production`" if decision.promoted else "not promoted (`@challenger`)"
    return "\n".join(
        [
            "## moco-pipeline retrain",
            "",
            f"- data version: `{report.data_version}` ({sharded.render().splitlines()[0]})",
            f"- MLflow run: `{trained.run_id}`, model `{decision.model_name}` "
            f"v{decision.version}: {verdict}",
            f"- reason: {decision.reason}",
            "",
            "| metric | encoder | " + " | ".join(REFERENCES) + " |",
            "|---|---|" + "---|" * len(REFERENCES),
            *rows,
            "",
            "Look further: `mlflow ui --backend-store-uri sqlite:///mlflow.db` · "
            "`dvc metrics show` · `prefect server start`",
        ]
    )
