"""The history view against a real MLflow registry: versions registered and gated by promote,
each from a run of its own as a retrain makes them, read back row by row."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from registry_helpers import Store
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Params
from pipeline.history import history, markdown, write
from pipeline.promote import promote
from pipeline.registry import TRAIN_SAMPLES_TAG
from pipeline.tracking import setup_mlflow

DATA = {"data_version": "d1", "benchmark_version": "b1", "eval_version": "e1"}
# per retrain: its data, image count and evaluation (drift only once a production exists)
RETRAINS = [
    ("d1", 1000, {"knn_top1": 0.80, "linear_top1": 0.85}, None),
    ("d2", 1500, {"knn_top1": 0.84, "linear_top1": 0.86}, (0.0123, 0.40)),
    ("d2", 1500, {"knn_top1": 0.84, "linear_top1": 0.87}, (0.0001, 0.95)),  # a tie: rejected
    ("d3", 2100, {"knn_top1": 0.90, "linear_top1": 0.70}, (0.2500, 0.005)),  # guard fails
]
REFERENCES = {"pixels_knn_top1": 0.79, "random_knn_top1": 0.70}


@pytest.fixture(scope="module")
def model_files(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny logged model's files, to give each retrain's run a model of its own."""
    mlflow.set_tracking_uri(store.uri)
    return Path(
        mlflow.artifacts.download_artifacts(
            store.model_uri, dst_path=str(tmp_path_factory.mktemp("model"))
        )
    )


def _retrain_run(params: Params, model_files: Path, samples: int) -> str:
    """A run as pretrain leaves it: the model and the training-image count."""
    with mlflow.start_run(experiment_id=setup_mlflow(params)) as run:
        mlflow.log_artifacts(str(model_files), "encoder")
        mlflow.set_tag(TRAIN_SAMPLES_TAG, samples)
    return f"runs:/{run.info.run_id}/encoder"


def test_history_has_each_versions_record_in_order(
    make_params: Callable[..., Params], model_files: Path, tmp_path: Path
) -> None:
    params = make_params("registry.guards={linear_top1: 0.05}")
    decisions = []
    for data, samples, metrics, drift in RETRAINS:
        evaluation = {**metrics, **REFERENCES}
        if drift:
            evaluation |= {"drift_mmd2": drift[0], "drift_p_value": drift[1]}
        uri = _retrain_run(params, model_files, samples)
        decisions.append(promote(params, uri, evaluation, {**DATA, "data_version": data}))
    assert [d.promoted for d in decisions] == [True, True, False, False]

    found = history(params)
    assert [row.version for row in found.rows] == [int(d.version) for d in decisions]
    for row, decision, (data, samples, metrics, drift) in zip(
        found.rows, decisions, RETRAINS, strict=True
    ):
        assert (row.data_version, row.train_samples) == (data, samples)
        assert row.metric == metrics["knn_top1"]
        assert row.guards == {"linear_top1": metrics["linear_top1"]}
        assert row.references == {"pixels": 0.79, "random": 0.70}
        assert (row.drift_mmd2, row.drift_p_value) == (drift or (None, None))
        assert row.decision == ("promoted" if decision.promoted else "rejected")
        assert row.reason == decision.reason
    assert [row.aliases for row in found.rows] == [
        ("previous",),
        ("production",),
        (),
        ("challenger",),
    ]
    assert [row.version for row in history(params, last=2).rows] == [3, 4]

    text = markdown(found)
    assert len(re.findall(r"^\| v\d", text, flags=re.MULTILINE)) == 4
    assert "| v2 @production | " in text
    assert "guard linear_top1 fell 0.1600 > tolerance 0.05" in text
    table, image = write(found, tmp_path / "out")
    assert table.read_text() == text + "\n"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_command_prints_the_table_and_writes_the_plot(
    make_params: Callable[..., Params], store: Store, tmp_path: Path
) -> None:
    params = make_params()
    first = promote(params, store.model_uri, {"knn_top1": 0.8, **REFERENCES}, DATA)
    config = tmp_path / "params.yaml"  # a team's own file, naming its store and model
    t, r = params.tracking, params.registry
    config.write_text(
        f"tracking: {{uri: '{t.uri}', artifact_location: '{t.artifact_location}'}}\n"
        f"registry: {{model_name: {r.model_name}}}\n"
    )
    args = ["history", "--params", str(config), "--out", str(tmp_path / "h")]
    wide = {"COLUMNS": "300"}  # rich folds cells to the terminal's width
    result = CliRunner().invoke(app, args, env=wide)
    assert result.exit_code == 0, result.output
    assert f"v{first.version} @production" in result.output
    assert (tmp_path / "h/history.png").exists()
    assert f"| v{first.version} @production | " in (tmp_path / "h/history.md").read_text()
