"""Whether a retrain has anything new to learn, judged from what the real MLflow registry
recorded on each version (promote's tags), and the code version it compares."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient
from registry_helpers import FIRST, Store

from pipeline.config import Params
from pipeline.evaluation.data import versions
from pipeline.fingerprint import CODE_PACKAGES, code_version
from pipeline.freshness import nothing_new
from pipeline.promote import promote

ROOT = Path(__file__).resolve().parents[2]


def test_production_inputs_again_is_nothing_new_and_any_change_is_something(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params()
    name = f"registry.model_name={params.registry.model_name}"
    assert nothing_new(params) is None  # nothing registered yet
    current = versions(params)
    production = promote(params, store.model_uri, FIRST, current)

    unchanged = nothing_new(params)
    assert unchanged is not None and unchanged.version == production.version
    line = unchanged.render()
    assert line.startswith(f"nothing new since production v{production.version} of ")
    recorded = MlflowClient().get_model_version(params.registry.model_name, production.version)
    for tag in ("data_version", "settings_hash", "code_version"):
        assert recorded.tags[tag] in line, tag
    assert recorded.tags["data_version"] == current["data_version"]
    assert recorded.tags["code_version"] == code_version(ROOT)
    # where checkpoints go and how the evaluation is batched do not change the model
    moved = make_params(name, "train.storage_path=elsewhere", "eval.batch_size=64")
    assert nothing_new(moved) is not None

    # a setting that changes training is something new ...
    warmer = make_params(name, "method.temperature=0.2")
    assert nothing_new(warmer) is None
    # ... until a retrain on it is registered, even one kept as challenger (a tie)
    kept = promote(warmer, store.model_uri, FIRST, current)
    assert not kept.promoted
    again = nothing_new(warmer)
    assert again is not None and again.version == kept.version
    assert f"nothing new since the last retrain, v{kept.version} (rejected)" in again.render()

    # production trained on other data: something new
    other = make_params()
    promote(other, store.model_uri, FIRST, {**current, "data_version": "older-data"})
    assert nothing_new(other) is None


def test_code_version_follows_the_sources_and_nothing_else(tmp_path: Path) -> None:
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    before = code_version(tmp_path)
    assert before == code_version(ROOT)
    (tmp_path / "README.md").write_text("a README edit\n")
    assert code_version(tmp_path) == before
    source = sorted((tmp_path / "moco").rglob("*.py"))[-1]
    source.write_text(source.read_text() + "\n# an edit not committed anywhere\n")
    assert code_version(tmp_path) != before
