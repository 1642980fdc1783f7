"""The tune stage: a Ray Tune sweep over MoCo's temperature, momentum, queue size and lr.

Each trial fits its own TorchTrainer (a distributed Ray Train run of pipeline/train_worker.py)
on the same shards; ASHA stops weak trials on the per-epoch metric. MLflow gets one parent run
per sweep and one nested child run per trial; the best config is written in params.yaml's shape.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipeline.config import (
    Choice,
    Params,
    Range,
    TuneParams,
    applicable,
    dump_params,
    with_overrides,
)
from pipeline.dataset import data_version
from pipeline.epoch_reports import EpochReporter, EpochTuneReport
from pipeline.errors import StageError
from pipeline.plots import plot_parallel_coordinates
from pipeline.preflight import check_endpoints
from pipeline.pretrain import build_trainer, fit, plan
from pipeline.ray_cluster import ensure_ray
from pipeline.storage import join, read_text, resolved, write_text
from pipeline.tracking import end_run_failed, git_commit, setup_mlflow, tracking_uri

LATEST_SWEEP_FILE = "latest-sweep.json"  # under tune.storage_path: what --resume continues
PARENT_FILE = "mlflow-parent.json"  # in the sweep's folder: its MLflow parent run
TRIAL_TAG = "tune_trial_id"
# ASHA's clock is the worker's epoch count: Tune's training_iteration restarts at 1 when a
# resumed sweep restarts a trial, while the trial's Ray Train run continues from its checkpoint.
EPOCH_CLOCK = "epochs_done"


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled values (shipped once via the object store)."""

    params: dict[str, Any]  # the base config; each trial overrides the sampled keys
    tracking: str
    experiment_id: str
    parent_run_id: str
    train_storage: str  # absolute or s3://: Tune trials run in their own working folders


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    best_params_file: str
    best_values: dict[str, Any]
    best_metric: float
    trials: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        stopped = sum(t["stop_reason"] == "early_stopped" for t in self.trials)
        values = ", ".join(f"{k}={show(v)}" for k, v in self.best_values.items())
        return (
            f"tune: {len(self.trials)} trials ({stopped} stopped early by ASHA), "
            f"MLflow parent run {self.parent_run_id}\n"
            f"  best: {values} -> {self.best_metric:.4f}\n"
            f"  retrain it: mocopipe pretrain --params {self.best_params_file}"
        )


def show(value: Any) -> str:
    """A sampled value for people: numbers to 4 significant digits, anything else as is."""
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


def search_space(space: dict[str, Choice | Range]) -> dict[str, Any]:
    """params.yaml's distributions as Tune domains."""
    domains = {
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": lambda low, high: tune.randint(int(low), int(high)),
        "lograndint": lambda low, high: tune.lograndint(int(low), int(high)),
    }
    return {
        key: tune.choice(d.values) if isinstance(d, Choice) else domains[d.type](d.low, d.high)
        for key, d in space.items()
    }


def trial_values(space: dict[str, Any], config: dict[str, Any], base_method: str) -> dict[str, Any]:
    """What a trial ran with, per swept key: its sampled value, or None where the key is a
    setting of another method than the trial's (a sweep over methods samples every method's
    keys; the trial's config drops the others). `method.name` is always there."""
    method = config.get("method.name", base_method)
    kept = applicable(config, method)
    return {"method.name": method} | {k: kept.get(k) for k in space}


def _searcher(tp: TuneParams):
    """Random (seeded) or Optuna TPE, either holding at most max_concurrent_trials at once:
    more would queue worker groups the cluster cannot place (a deadlock, not an error)."""
    if tp.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=tp.seed), tp.max_concurrent_trials)
    # Tune ignores TuneConfig.max_concurrent_trials for a generator: it takes its own limit
    return BasicVariantGenerator(random_state=tp.seed, max_concurrent=tp.max_concurrent_trials)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One trial (run by Tune): a Ray Train run of the sampled config, reporting each epoch to
    Tune (for ASHA) and to its own nested MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    base = Params.model_validate(setup.params)
    params = with_overrides(base, base.tune.trial_overrides() | config)
    values = trial_values(base.tune.space, config, base.method.name)
    run_id = _child_run(setup, trial_id, {k: v for k, v in values.items() if v is not None})
    trainer = build_trainer(
        params,
        replace(plan(params), run_id=run_id),  # the trial's nodes log system metrics there
        name=f"trial-{trial_id}",
        storage=setup.train_storage,
        # MLflow first: once Tune hears the epoch, ASHA may stop (kill) this trial at once
        callbacks=[
            EpochReporter(setup.tracking, run_id, params.train.epochs, label=trial_id),
            EpochTuneReport(),
        ],
    )
    fit(trainer)


def _child_run(setup: TrialSetup, trial_id: str, config: dict[str, Any]) -> str:
    """The trial's nested MLflow run; a resumed trial continues the run it started."""
    client = MlflowClient(setup.tracking)
    existing = client.search_runs(
        [setup.experiment_id],
        filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' "
        f"and tags.mlflow.parentRunId = '{setup.parent_run_id}'",
    )
    if existing:
        return existing[0].info.run_id
    run = client.create_run(
        setup.experiment_id,
        run_name=f"trial-{trial_id}",
        tags={"mlflow.parentRunId": setup.parent_run_id, TRIAL_TAG: trial_id, "stage": "tune"},
    )
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, str(v)) for k, v in config.items()],
    )
    return run.info.run_id


def check_fits(tp: TuneParams, resources: dict[str, float]) -> None:
    """Refuse a sweep whose concurrent trials the cluster cannot place: a started trial whose
    workers never get slots fails on the worker-group timeout (or, without one, waits forever)."""
    cpus = tp.trial_cpus + tp.workers_per_trial * tp.cpus_per_worker
    gpus = tp.workers_per_trial * tp.gpus_per_worker
    for kind, need, unit in (("CPU", cpus, "CPUs"), ("GPU", gpus, "GPUs")):
        have = resources.get(kind, 0)
        if need and have < need:
            raise ValueError(
                f"tune: one trial needs {need:g} {unit} (tune.trial_cpus + tune.workers_per_trial"
                f" x tune.{kind.lower()}s_per_worker) but the Ray cluster has {have:g}; lower "
                "them or point RAY_ADDRESS at a bigger cluster"
            )
        if need and have < need * tp.max_concurrent_trials:
            raise ValueError(
                f"tune.max_concurrent_trials={tp.max_concurrent_trials}: trials need "
                f"{need * tp.max_concurrent_trials:g} {unit} at once but the Ray cluster has "
                f"{have:g}; lower tune.max_concurrent_trials to {int(have // need)}"
            )


def _experiment(params: Params, storage: str, resume: bool) -> tuple[str, str]:
    """The sweep's name and folder (a path or an s3:// URL): a new (timestamped) one, or the
    latest one to resume."""
    if resume:
        name = params.tune.name
        if not name and (record := read_text(join(storage, LATEST_SWEEP_FILE))):
            name = json.loads(record)["name"]
        if not name or not tune.Tuner.can_restore(join(storage, name)):
            raise ValueError(
                f"{join(storage, name or '<latest>')}: no sweep to resume; run without --resume"
            )
        return name, join(storage, name)
    name = params.tune.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    if tune.Tuner.can_restore(join(storage, name)):
        raise ValueError(
            f"{join(storage, name)}: a sweep of that name exists; pass --resume to continue it "
            "or set tune.name to a new name"
        )
    return name, join(storage, name)


def sweep(params: Params, *, resume: bool = False, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep in `params.tune`; returns the best config and every trial."""
    check_endpoints(params)  # and ensure_ray checks the Ray address, before Ray starts
    tp = params.tune
    if not tp.space:
        raise ValueError("tune.space is empty: name at least one setting to sweep")
    trial_config = plan(with_overrides(params, tp.trial_overrides()))  # refuse before Ray starts
    if tp.metric == "knn_top1" and not trial_config.monitor_bank_urls:
        raise ValueError(
            "tune.metric knn_top1 needs labelled train and test shards and eval.monitor_bank > 0;"
            " set tune.metric: loss for unlabelled data"
        )
    storage = resolved(tp.storage_path)
    name, folder = _experiment(params, storage, resume)
    check_fits(tp, ensure_ray(address))
    write_text(join(storage, LATEST_SWEEP_FILE), json.dumps({"name": name}))
    experiment_id = setup_mlflow(params)
    parent_run_id = _parent_run(params, experiment_id, storage, name, resume)
    shards = resolved(params.data.shards_dir)  # trials run in their own folders
    setup = TrialSetup(
        params=with_overrides(params, {"data.shards_dir": shards}, keep_space=True).model_dump(),
        tracking=tracking_uri(params),
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        train_storage=join(folder, "train"),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": tp.trial_cpus, "gpu": 0}
    )
    try:
        if resume:
            tuner = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(tp.space),
                tune_config=tune.TuneConfig(
                    metric=tp.metric,
                    mode=tp.mode,
                    num_samples=tp.num_samples,
                    search_alg=_searcher(tp),
                    scheduler=ASHAScheduler(
                        time_attr=EPOCH_CLOCK,
                        max_t=tp.epochs,
                        grace_period=tp.grace_period,
                        reduction_factor=tp.reduction_factor,
                    ),
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
            )
        trials = _record_trials(tuner.fit(), setup, tp)
        result = _record_best(params, trials, folder)
    except BaseException as error:
        end_run_failed(error)
        raise
    mlflow.end_run()
    return result


def _parent_run(params: Params, experiment_id: str, storage: str, name: str, resume: bool) -> str:
    """Start (or reopen, on --resume) the sweep's parent run, recording the search space."""
    record = join(storage, f"{name}.{PARENT_FILE}")  # beside Tune's folder, not inside
    if resume and (text := read_text(record)) is not None:
        return mlflow.start_run(run_id=json.loads(text)["run_id"]).info.run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name)
    tp = params.tune
    mlflow.log_params({f"tune.{k}": v for k, v in tp.model_dump(exclude={"space"}).items()})
    mlflow.log_dict({k: d.model_dump() for k, d in tp.space.items()}, "search_space.json")
    mlflow.set_tags(
        {
            "stage": "tune",
            "git_commit": git_commit(),
            "data_version": data_version(params.data.shards_dir),
        }
    )
    write_text(record, json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


def _epochs_done(result) -> int:
    return int((result.metrics or {}).get(EPOCH_CLOCK, 0))


def _stop_reason(result, epochs: int) -> str:
    if result.error is not None:
        return "failed"
    return "completed" if _epochs_done(result) >= epochs else "early_stopped"


def _record_trials(grid, setup: TrialSetup, tp: TuneParams) -> list[dict[str, Any]]:
    """One row per trial; each child run gets its stop reason and a final status."""
    setup_method = Params.model_validate(setup.params).method.name
    client = MlflowClient(setup.tracking)
    children = {
        run.data.tags[TRIAL_TAG]: run.info.run_id
        for run in client.search_runs(
            [setup.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{setup.parent_run_id}'",
        )
    }
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        reason = _stop_reason(result, tp.epochs)
        config = result.config or {}  # None for a trial that died before its first report
        row = {"trial_id": trial_id, **trial_values(tp.space, config, setup_method)}
        row |= {
            tp.metric: metrics.get(tp.metric),
            "loss": metrics.get("loss"),
            "epochs": _epochs_done(result),
            "stop_reason": reason,
            "run_id": children.get(trial_id, ""),
        }
        if row["run_id"]:
            client.set_tag(row["run_id"], "stop_reason", reason)
            if result.error is not None:
                client.set_tag(row["run_id"], "failure", str(result.error)[:5000])
            client.set_terminated(row["run_id"], "FAILED" if result.error else "FINISHED")
        rows.append(row)
    return rows


def _plot_keys(tp: TuneParams) -> list[str]:
    """The plot's axes: the method first (whether swept or not), then the swept settings."""
    return ["method.name", *(k for k in tp.space if k != "method.name")]


def _record_best(params: Params, trials: list[dict[str, Any]], folder: str) -> SweepResult:
    """Pick the best trial among those that ran the full schedule; write and log its config."""
    tp = params.tune
    scored = [t for t in trials if t["stop_reason"] != "failed" and t[tp.metric] is not None]
    if not scored:
        raise StageError(f"tune: every trial failed; see {folder} and the MLflow child runs")
    completed = [t for t in scored if t["stop_reason"] == "completed"] or scored
    pick = max if tp.mode == "max" else min
    best = pick(completed, key=lambda t: t[tp.metric])
    values = {k: best[k] for k in ("method.name", *tp.space) if best[k] is not None}
    dump_params(with_overrides(params, values, keep_space=True), tp.best_params_file)

    trials = sorted(scored, key=lambda t: t[tp.metric], reverse=tp.mode == "max") + [
        t for t in trials if t not in scored
    ]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(trials[0]))
    writer.writeheader()
    writer.writerows(trials)
    write_text(join(folder, "trials.csv"), table.getvalue())
    mlflow.log_text(table.getvalue(), "trials.csv")
    mlflow.log_artifact(tp.best_params_file)
    log_axes = [k for k, d in tp.space.items() if d.type.startswith("log")]
    mlflow.log_figure(
        plot_parallel_coordinates(scored, _plot_keys(tp), tp.metric, log_axes),
        "parallel_coordinates.png",
    )
    mlflow.log_metric(f"best_{tp.metric}", best[tp.metric])
    mlflow.set_tags({"best_trial": best["trial_id"], "best_run_id": best["run_id"]})
    return SweepResult(
        name=folder.rsplit("/", 1)[-1],
        parent_run_id=mlflow.active_run().info.run_id,
        best_params_file=tp.best_params_file,
        best_values=values,
        best_metric=best[tp.metric],
        trials=trials,
    )
