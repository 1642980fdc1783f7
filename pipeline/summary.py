"""The end-of-run summaries: what a person reads after a retrain or a sweep (also Prefect
artifacts)."""

from __future__ import annotations

from pipeline.evaluate import REFERENCES, EvalReport
from pipeline.evaluation import keys
from pipeline.pretrain import PretrainResult
from pipeline.promote import Decision
from pipeline.shard import ShardSummary
from pipeline.tune import SweepResult, show


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def retrain_summary(
    sharded: ShardSummary,
    trained: PretrainResult,
    report: EvalReport,
    decision: Decision,
    *,
    cached: bool = False,
    init: str = "",
) -> str:
    """Markdown: data version, metrics next to production's and the references, the
    decision and its reason, and where to look further."""
    production = decision.production_metrics
    columns = (
        ["encoder", f"production v{decision.previous_production}"] if production else ["encoder"]
    )
    columns += list(REFERENCES)
    rows = []
    for name, value in report.metrics.items():
        if name.startswith(REFERENCES) or name in keys.NOT_GATEABLE:
            continue
        cells = [value, *([production.get(name)] if production else [])]
        cells += [report.metrics.get(f"{ref}_{name}") for ref in REFERENCES]
        rows.append(f"| {name} | " + " | ".join(map(_cell, cells)) + " |")
    verdict = "promoted to `@production`" if decision.promoted else "not promoted (`@challenger`)"
    new = ", ".join(f"{split} +{r['new_samples']} new" for split, r in sharded.splits.items())
    shards = "sharding skipped: inputs unchanged" if cached else f"sharded: {new}"
    benchmark = report.versions.get("benchmark_version")
    measured = f"benchmark `{benchmark}`" if benchmark else "no labelled benchmark"
    if benchmark and benchmark == report.data_version:
        measured = f"the source's own labelled splits `{benchmark}`"
    return "\n".join(
        [
            "## moco-pipeline retrain",
            "",
            f"- data version: `{report.data_version}` ({shards}{_quarantined(sharded)})",
            f"- scored on: {measured}, eval data `{report.eval_version}`",
            f"- change: {_change(report.metrics)}",
            f"- MLflow run: `{trained.run_id}` ({init or 'from scratch'})",
            f"- model `{decision.model_name}` v{decision.version} (`{trained.model_uri}`): "
            f"{verdict}",
            f"- reason: {decision.reason}",
            "",
            "| metric | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
            *rows,
            *_baseline_note(report.metrics),
            "",
            "Look further: `mlflow ui --backend-store-uri sqlite:///mlflow.db` · "
            "`dvc metrics show` · `prefect server start`",
        ]
    )


def _baseline_note(metrics: dict[str, float]) -> list[str]:
    """Says what the supervised rows are, so nobody reads a cheap floor as a tuned result."""
    epochs = metrics.get(keys.SUPERVISED_EPOCHS)
    if epochs is None:
        return []
    return [
        "",
        f"The supervised rows are a floor, not a tuned result: the same backbone trained from "
        f"scratch on the labels for {epochs:.2f} epochs (eval.supervised_steps x "
        "eval.supervised_batch_size).",
    ]


def _quarantined(sharded: ShardSummary) -> str:
    new = sum(len(entries) for entries in sharded.new_quarantine.values())
    return f"; {new} new file(s) quarantined" if new else ""


def _change(metrics: dict[str, float]) -> str:
    """ "The data changed this much, and the model moved this much", or why not measured."""
    if keys.AGREEMENT not in metrics:
        return "no production model to compare with yet"
    moved = (
        f"the model shares {metrics[keys.AGREEMENT]:.0%} of production's nearest neighbours "
        "on the held-out slice"
    )
    if keys.DRIFT_MMD not in metrics:
        return f"no new training images since production's data; {moved}"
    verdict = "differ from" if metrics[keys.DRIFT_P] < 0.05 else "look like"
    return (
        f"the {int(metrics['drift_new_samples'])} new images sampled {verdict} the "
        f"{int(metrics['drift_old_samples'])} production was trained on (MMD^2 "
        f"{metrics[keys.DRIFT_MMD]:.4f}, p={metrics[keys.DRIFT_P]:.3f}, in production's "
        f"embedding space); {moved}"
    )


def sweep_summary(
    swept: SweepResult, trained: PretrainResult, report: EvalReport, decision: Decision
) -> str:
    """Markdown: the sweep's MLflow run, the best config, its retrained score, the decision."""
    metric = decision.metric
    verdict = "promoted to `@production`" if decision.promoted else "not promoted"
    return "\n".join(
        [
            "## moco-pipeline sweep",
            "",
            f"- MLflow sweep run: `{swept.parent_run_id}` ({len(swept.trials)} trials)",
            f"- best config: `{swept.best_params_file}` "
            + ", ".join(f"{k}={show(v)}" for k, v in swept.best_values.items()),
            f"- retrained: run `{trained.run_id}`, {metric} {report.metrics[metric]:.4f}",
            f"- model `{decision.model_name}` v{decision.version}: {verdict} ({decision.reason})",
        ]
    )
