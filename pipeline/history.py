"""The registry's history: one row per model version, read from MLflow (the registry and each
version's run), never from files a run left on one machine.

Per version: when it was registered, the data it was trained on (version and image count), the
gated metric and the guards (as the gate saw them: the version's tags), the references, the
drift of its new data from what the production of the day was trained on, and the gate's
decision with its reason. `mocopipe history` prints it; each retrain leaves it as a Prefect
artifact and on its MLflow run, with a plot of the gated metric and drift over time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from rich.table import Table

from pipeline.config import Params
from pipeline.evaluation import keys
from pipeline.registry import PREVIOUS, PRODUCTION, TRAIN_SAMPLES_TAG
from pipeline.tracking import EVAL_PREFIX, setup_mlflow

SERVED = ("promoted", "restored", "rolled back")  # decisions of a version that once served


@dataclass(frozen=True)
class Row:
    version: int
    registered: datetime
    aliases: tuple[str, ...]
    data_version: str
    train_samples: int | None  # None: its run did not record it
    metric: float | None  # the gated metric
    guards: dict[str, float | None]
    references: dict[str, float | None]  # pixels / random on the gated metric
    drift_mmd2: float | None  # None: no production to compare with, or no new images
    drift_p_value: float | None
    decision: str
    reason: str

    @property
    def served(self) -> bool:
        """Promoted by the gate, or holding production now or as the one before it (an alias
        set by hand counts too)."""
        return self.decision in SERVED or bool({PRODUCTION, PREVIOUS} & set(self.aliases))


@dataclass(frozen=True)
class History:
    model_name: str
    metric: str
    guards: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)


def _float(value: str | float | None) -> float | None:
    return None if value is None else float(value)


def _reason(description: str | None) -> str:
    """The gate's reason: the second paragraph of the description promote writes."""
    parts = (description or "").split("\n\n")
    return parts[1].strip() if len(parts) > 1 else (description or "").strip()


def _row(
    client: MlflowClient, version: ModelVersion, metric: str, guards: tuple[str, ...], aliases
) -> Row:
    run = client.get_run(version.run_id) if version.run_id else None
    logged = run.data.metrics if run else {}
    samples = run.data.tags.get(TRAIN_SAMPLES_TAG) if run else None
    tags = version.tags

    def measured(key: str) -> float | None:  # the gate's copy on the version, else the run's
        return _float(tags.get(key, logged.get(f"{EVAL_PREFIX}{key}")))

    return Row(
        version=int(version.version),
        registered=datetime.fromtimestamp(version.creation_timestamp / 1000, UTC),
        aliases=tuple(sorted(aliases.get(str(version.version), ()))),
        data_version=tags.get("data_version", ""),
        train_samples=None if samples is None else int(samples),
        metric=measured(metric),
        guards={g: measured(g) for g in guards},
        references={r: _float(logged.get(f"{EVAL_PREFIX}{r}_{metric}")) for r in keys.REFERENCES},
        drift_mmd2=_float(logged.get(f"{EVAL_PREFIX}{keys.DRIFT_MMD}")),
        drift_p_value=_float(logged.get(f"{EVAL_PREFIX}{keys.DRIFT_P}")),
        decision=tags.get("decision", "unknown"),
        reason=_reason(version.description),
    )


def history(params: Params, last: int = 30) -> History:
    """The newest `last` versions of the registered model, oldest first."""
    setup_mlflow(params)
    client, name = MlflowClient(), params.registry.model_name
    metric, guards = params.registry.primary_metric, tuple(params.registry.guards)
    found = client.search_model_versions(
        f"name='{name}'", max_results=last, order_by=["version_number DESC"]
    )
    if not found:
        return History(name, metric, guards)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = [_row(client, v, metric, guards, aliases) for v in found]
    return History(name, metric, guards, sorted(rows, key=lambda r: r.version))


# --- presentation -----------------------------------------------------------------------------


def _cell(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def columns(h: History) -> list[str]:
    return [
        "version",
        "registered (UTC)",
        "data",
        "images",
        h.metric,
        *(f"guard {g}" for g in h.guards),
        *(f"{r}" for r in keys.REFERENCES),
        "drift MMD²",
        "drift p",
        "decision",
        "reason",
    ]


def cells(h: History, row: Row) -> list[str]:
    served = f" @{', @'.join(row.aliases)}" if row.aliases else ""
    return [
        f"v{row.version}{served}",
        f"{row.registered:%Y-%m-%d %H:%M}",
        row.data_version,
        "–" if row.train_samples is None else str(row.train_samples),
        _cell(row.metric),
        *(_cell(row.guards[g]) for g in h.guards),
        *(_cell(row.references[r]) for r in keys.REFERENCES),
        _cell(row.drift_mmd2),
        _cell(row.drift_p_value, 3),
        row.decision,
        row.reason,
    ]


def rich_table(h: History) -> Table:
    """The table for a terminal (`mocopipe history`)."""
    table = Table(title=f"{h.model_name}: the last {len(h.rows)} version(s), gated on {h.metric}")
    for name in columns(h):
        table.add_column(name, overflow="fold")
    for row in h.rows:
        table.add_row(*cells(h, row), style="bold" if PRODUCTION in row.aliases else None)
    return table


def markdown(h: History) -> str:
    """The table as markdown (the Prefect artifact and the MLflow copy)."""
    if not h.rows:
        return f"## {h.model_name}: history\n\nNo model version registered yet."
    header = columns(h)
    lines = [
        f"## {h.model_name}: history of the last {len(h.rows)} version(s)",
        "",
        f"Gated on `{h.metric}`; drift is of each version's new images from what the "
        "production of the day was trained on (MMD², permutation p).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in h.rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(h, row)) + " |")
    return "\n".join(lines)


def plot(h: History) -> Figure:
    """The gated metric (with the references) and drift per version over time; filled markers
    are versions that served as production."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    when = [r.registered for r in h.rows]
    top.plot(when, [r.metric for r in h.rows], "-", color="tab:blue", label="encoder")
    for reference, style in zip(keys.REFERENCES, (":", "--"), strict=True):
        values = [r.references[reference] for r in h.rows]
        if any(v is not None for v in values):
            top.plot(when, values, style, color="grey", label=reference)
    for served, marker in ((True, "o"), (False, "x")):
        chosen = [r for r in h.rows if r.served == served and r.metric is not None]
        label = "served as production" if served else "not promoted"
        top.scatter([r.registered for r in chosen], [r.metric for r in chosen], marker=marker,
                    color="tab:blue", s=50, zorder=3, label=label)  # fmt: skip
    for r in (r for r in h.rows if r.metric is not None):
        top.annotate(f"v{r.version}", (r.registered, r.metric), fontsize=7,
                     textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
    top.set_ylabel(h.metric)
    top.set_title(f"{h.model_name}: {h.metric} per version (filled: served as production)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    drifted = [r for r in h.rows if r.drift_mmd2 is not None]
    bottom.plot([r.registered for r in drifted], [r.drift_mmd2 for r in drifted], "o-",
                color="tab:orange")  # fmt: skip
    for r in (r for r in drifted if r.drift_p_value is not None):
        bottom.annotate(f"p={r.drift_p_value:.3f}", (r.registered, r.drift_mmd2), fontsize=7,
                        textcoords="offset points", xytext=(0, 5), ha="center")  # fmt: skip
    bottom.set_ylabel("drift MMD²")
    bottom.set_xlabel("registered (UTC)")
    bottom.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def write(h: History, folder: Path) -> tuple[Path, Path]:
    """history.md and history.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    table, image = folder / "history.md", folder / "history.png"
    table.write_text(markdown(h) + "\n")
    figure = plot(h)
    figure.savefig(image, dpi=100)
    plt.close(figure)
    return table, image


def record(params: Params, run_id: str, folder: Path) -> History:
    """After a retrain: the history as files in `folder` and under `history/` on `run_id`."""
    h = history(params)
    table, image = write(h, folder)
    client = MlflowClient()
    for path in (table, image):
        client.log_artifact(run_id, str(path), artifact_path="history")
    return h
