"""The gate, the aliases and rollback, against a real MLflow SQLite registry."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from registry_helpers import FIRST, SPEC, Store

from pipeline.config import Params
from pipeline.errors import StageError
from pipeline.evaluate import score
from pipeline.evaluation.data import versions
from pipeline.promote import Decision, promote, rollback
from pipeline.registry import version_by_alias


def on(version: str) -> dict[str, str]:
    """The versions an evaluation on data `version` reports (metrics.json)."""
    return {"data_version": version, "benchmark_version": "", "eval_version": version}


DATA = on("data-v1")


def alias(params: Params, name: str) -> str | None:
    found = version_by_alias(MlflowClient(), params.registry.model_name, name)
    return None if found is None else str(found.version)


def tags(params: Params, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(params.registry.model_name, version).tags


def description(params: Params, version: str) -> str:
    return MlflowClient().get_model_version(params.registry.model_name, version).description


def recorded() -> dict:
    return json.loads(Path("promotion.json").read_text())


def test_first_model_only_has_to_beat_random_init(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params()
    # below raw pixels, above random init: promoted, and the pixel gap is reported
    decision = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.75}, DATA)
    assert decision.promoted and alias(params, "production") == decision.version
    assert "random-init 0.7000" in decision.reason
    assert "pixels 0.7900 (gap -0.0400)" in decision.reason

    other = make_params()
    rejected = promote(other, store.model_uri, {**FIRST, "knn_top1": 0.65}, DATA)
    assert not rejected.promoted and "does not beat random-init" in rejected.reason
    assert alias(other, "production") is None
    assert alias(other, "challenger") == rejected.version


def test_better_is_promoted_worse_is_not_and_rollback_restores(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params("registry.min_gain=0.01")
    first = promote(params, store.model_uri, FIRST, DATA)
    better = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.85}, DATA)
    assert better.promoted and better.previous_production == first.version
    assert alias(params, "production") == better.version
    assert alias(params, "previous") == first.version
    assert "recorded metrics reused" in better.reason  # same data, same protocol: no re-scoring
    on_version = tags(params, better.version)
    assert on_version["method"] == SPEC.method  # read from the registered encoder's encoder.json
    assert on_version["knn_top1"] == "0.85" and on_version["data_version"] == DATA["data_version"]
    assert on_version["replaced_version"] == first.version
    assert len(on_version["config_hash"]) == 12 and on_version["git_commit"]
    assert on_version["decision"] == "promoted"

    worse = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.855}, DATA)
    assert not worse.promoted
    assert "knn_top1 0.8550 vs 0.8500: not higher by more than min_gain 0.01" in worse.reason
    assert alias(params, "production") == better.version
    assert alias(params, "challenger") == worse.version
    assert worse.reason in description(params, worse.version)
    assert set(tags(params, worse.version)) >= {"knn_top1", "data_version", "eval_version"}
    assert "linear_top1" not in tags(params, worse.version)  # not gated: on the run only
    assert (recorded()["version"], recorded()["reason"]) == (worse.version, worse.reason)

    back = rollback(params, reason="bad embeddings downstream")
    assert back.action == "rollback" and back.version == first.version
    assert alias(params, "production") == first.version
    assert alias(params, "previous") is None  # the first version replaced nothing
    assert tags(params, better.version)["decision"] == "rolled back"
    assert "bad embeddings downstream" in description(params, first.version)
    assert recorded()["action"] == "rollback"
    with pytest.raises(StageError, match="no @previous"):
        rollback(params)


@pytest.mark.parametrize(("min_gain", "value"), [(0.0, 0.80), (0.01, 0.81)])
def test_a_tie_with_production_is_kept_as_challenger(
    make_params: Callable[..., Params], store: Store, min_gain: float, value: float
) -> None:
    """Identical metrics (a retrain on unchanged data) or a gain of exactly min_gain: the
    candidate has not beaten production by more than min_gain, so production stays."""
    params = make_params(f"registry.min_gain={min_gain}")
    production = promote(params, store.model_uri, FIRST, DATA)
    tie = promote(params, store.model_uri, {**FIRST, "knn_top1": value}, DATA)
    assert not tie.promoted
    assert f"not higher by more than min_gain {min_gain}" in tie.reason
    assert alias(params, "production") == production.version
    assert alias(params, "challenger") == tie.version
    assert tags(params, tie.version)["decision"] == "rejected"


def test_rollback_walks_back_through_history(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params()
    versions = [
        promote(params, store.model_uri, {**FIRST, "knn_top1": value}, DATA).version
        for value in (0.80, 0.81, 0.82)
    ]
    rollback(params)
    assert (alias(params, "production"), alias(params, "previous")) == tuple(versions[1::-1])
    rollback(params)
    assert (alias(params, "production"), alias(params, "previous")) == (versions[0], None)


def test_guard_metric_that_falls_too_far_blocks_promotion(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params("registry.guards={linear_top1: 0.01}")
    promote(params, store.model_uri, {**FIRST, "linear_top1": 0.95}, DATA)
    blocked = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.9, "linear_top1": 0.9}, DATA)
    assert not blocked.promoted
    assert "guard linear_top1 fell 0.0500 > tolerance 0.01" in blocked.reason
    # every version here shares one run, whose eval_ metrics the blocked candidate overwrote:
    # production now reads knn 0.9, so the candidate must beat that, not only v1's 0.8
    held = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.95, "linear_top1": 0.945}, DATA)
    assert held.promoted and "guards held" in held.reason


@pytest.mark.parametrize("metric", ["alignment", "uniformity"])
def test_lower_is_better_metric_gates_downwards(
    make_params: Callable[..., Params], store: Store, metric: str
) -> None:
    """A label-free gate on a metric that falls as the encoder improves: below random init is
    the first bar, then only a drop of at least min_gain counts. Each case gets a registered
    model of its own (the versions share one run, whose metrics the next gate reads)."""
    first = {"uniformity": -2.0, metric: 0.60, f"random_{metric}": 0.80}  # (-2.0: a guard's)

    def gate(candidate: float) -> Decision:
        params = make_params(f"registry.primary_metric={metric}", "registry.min_gain=0.05")
        assert promote(params, store.model_uri, first, DATA).promoted  # below random: the bar
        return promote(params, store.model_uri, {**first, metric: candidate}, DATA)

    alone = make_params(f"registry.primary_metric={metric}")
    above_random = promote(alone, store.model_uri, {**first, metric: 0.90}, DATA)
    assert not above_random.promoted and "does not beat random-init 0.8000" in above_random.reason
    rose = gate(0.70)
    assert not rose.promoted and f"{metric} 0.7000 vs 0.6000: not lower by" in rose.reason
    fell = gate(0.50)
    assert fell.promoted and f"{metric} 0.5000 vs 0.6000: lower by" in fell.reason
    if metric == "alignment":  # by too little; and uniformity rising past its guard is a fall
        assert not gate(0.58).promoted
        spread_less = make_params(
            "registry.primary_metric=alignment", "registry.guards={uniformity: 0.1}"
        )
        promote(spread_less, store.model_uri, first, DATA)
        blocked = {**first, metric: 0.40, "uniformity": -1.8}
        decision = promote(spread_less, store.model_uri, blocked, DATA)
        assert not decision.promoted and "guard uniformity fell 0.2000" in decision.reason


def test_production_is_rescored_on_the_candidates_data(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params()
    production = promote(params, store.model_uri, FIRST, on("older-data"))
    current = versions(params)

    decision = promote(params, store.model_uri, {**FIRST, "knn_top1": 0.99}, current)

    expected = score(params, str(store.encoder_dir), references=False)["knn_top1"]
    assert (
        f"vs production v{production.version} (re-evaluated on eval data "
        f"{current['eval_version']})" in decision.reason
    )
    assert decision.baseline == pytest.approx(expected)
    assert decision.promoted == (expected <= 0.99)


def test_candidate_scored_on_other_data_than_the_shards_is_refused(
    make_params: Callable[..., Params], store: Store
) -> None:
    params = make_params()
    promote(params, store.model_uri, FIRST, on("older-data"))
    with pytest.raises(StageError, match="re-run `mocopipe evaluate`"):
        promote(params, store.model_uri, FIRST, on("not-what-is-on-disk"))
    name = params.registry.model_name
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1  # nothing registered


def test_racing_promotions_leave_one_production_and_keep_previous(
    make_params: Callable[..., Params], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read @production = v1 and register before either moves an alias (the barrier), so
    without the lock and re-check both would be promoted and one of them lost."""
    params = make_params("registry.min_gain=0.01")
    old = promote(params, store.model_uri, FIRST, DATA)
    both_registered = threading.Barrier(2, timeout=60)
    register = mlflow.register_model

    def register_then_wait(*args, **kwargs):
        version = register(*args, **kwargs)
        both_registered.wait()
        return version

    monkeypatch.setattr(mlflow, "register_model", register_then_wait)
    decisions: list[Decision] = []
    errors: list[BaseException] = []

    def run(index: int) -> None:
        metrics = {**FIRST, "knn_top1": 0.9}
        try:
            decisions.append(
                promote(params, store.model_uri, metrics, DATA, decision_file=f"{index}.json")
            )
        except BaseException as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors

    winner, loser = sorted(decisions, key=lambda d: not d.promoted)
    assert winner.promoted and not loser.promoted
    assert alias(params, "production") == winner.version
    assert alias(params, "previous") == old.version
    assert alias(params, "challenger") == loser.version
    assert f"vs production v{winner.version}" in loser.reason  # re-gated against the winner
    assert winner.previous_production == old.version
