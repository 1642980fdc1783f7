"""`mocopipe`: one subcommand per stage, each a thin shell around the stage function.

Every command takes `--params FILE` and `--set key=value` overrides; the config is validated
before any work starts, and expected failures print one line and exit 2.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import ConfigError, Params, load_params
from pipeline.errors import StageError
from pipeline.preflight import check_endpoints

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = Annotated[Path, typer.Option("--params", help="The config file (params.yaml).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: --set method.temperature=0.2 (repeatable)."),
]


def _params(params: Path, overrides: list[str] | None) -> Params:
    return load_params(params, overrides or [])


def _checked(config: Params, *, ray: bool = False, address: str | None = None) -> Params:
    """Probe the remote endpoints before the stage's imports: a refusal then takes a second,
    not the ten that importing torch, Ray and MLflow takes."""
    check_endpoints(config, ray=ray, address=address)
    return config


def _clean_errors(command: Callable) -> Callable:
    """Bad input ends with one readable line, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ConfigError, ValueError, FileNotFoundError, StageError) as error:
            typer.secho(f"error: {error}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_clean_errors
def shard(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    source: Annotated[str | None, typer.Option(help="Override data.source.")] = None,
) -> None:
    """Write the source images as WebDataset shards with a manifest (incremental)."""
    from pipeline.shard import shard as run_shard

    typer.echo(run_shard(_params(params, overrides), source).render())


@app.command()
@_clean_errors
def benchmark(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Shard eval.benchmark, the fixed labelled set every model is scored on (idempotent)."""
    from pipeline.benchmark import benchmark as run_benchmark

    summary = run_benchmark(_params(params, overrides))
    typer.echo(summary.render() if summary else "benchmark: none configured (eval.benchmark)")


@app.command()
@_clean_errors
def pretrain(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the latest run.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster (or RAY_ADDRESS).")] = None,
    max_failures: Annotated[
        int | None, typer.Option(help="Worker losses to survive (default: train.max_failures).")
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(help="Warm start: an encoder folder or models:/moco-encoder@production."),
    ] = None,
) -> None:
    """MoCo pretraining on Ray Train; logs the run and the encoder to MLflow."""
    extra = [f"train.init_from={init_from}"] if init_from else []
    if max_failures is not None:
        extra.append(f"train.max_failures={max_failures}")
    config = _checked(_params(params, [*(overrides or []), *extra]), ray=True, address=address)
    from pipeline.pretrain import pretrain as run_pretrain

    typer.echo(run_pretrain(config, resume=resume, address=address).render())


@app.command()
@_clean_errors
def tune(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the latest (or tune.name) sweep.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster (or RAY_ADDRESS).")] = None,
) -> None:
    """Ray Tune sweep (ASHA) over params.yaml's tune.space; writes the best config."""
    config = _checked(_params(params, overrides), ray=True, address=address)
    from pipeline.tune import sweep

    typer.echo(sweep(config, resume=resume, address=address).render())


@app.command()
@_clean_errors
def evaluate(
    model: Annotated[str, typer.Option(help="Encoder folder, runs:/... or models:/name@alias.")] = (
        "models/encoder"
    ),
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Frozen-encoder metrics next to the raw-pixel and random-init references."""
    config = _checked(_params(params, overrides))
    from pipeline.evaluate import evaluate as run_evaluate

    typer.echo(run_evaluate(config, model).render())


@app.command()
@_clean_errors
def promote(
    model: Annotated[
        str, typer.Option(help="The candidate: an exported encoder folder or its MLflow URI.")
    ] = "models/encoder",
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    metrics: Annotated[
        Path, typer.Option(help="Its evaluation, the full table (metrics-full.json).")
    ] = Path("metrics-full.json"),
) -> None:
    """Register the candidate; move @production only if it passes the gate."""
    config = _checked(_params(params, overrides))
    from pipeline.promote import VERSION_KEYS
    from pipeline.promote import promote as run_promote
    from pipeline.tracking import exported_run

    if not metrics.exists():
        raise FileNotFoundError(f"{metrics}: no evaluation found; run `mocopipe evaluate` first")
    values = json.loads(metrics.read_text())
    if "eval_version" not in values:
        raise ValueError(
            f"--metrics {metrics}: a headline file (no data versions); pass the full table, "
            "metrics-full.json"
        )
    versions = {key: str(values.pop(key, "")) for key in VERSION_KEYS}
    for key in [k for k, v in values.items() if not isinstance(v, int | float)]:
        values.pop(key)  # other versions (heldout_version): not metrics
    model_uri = exported_run(model).get("model_uri", model)
    from pipeline.events import announce

    decision = run_promote(config, model_uri, values, versions)
    typer.echo(decision.render())
    announce(config, decision, values)


@app.command()
@_clean_errors
def rollback(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    reason: Annotated[str, typer.Option(help="Why; recorded on the versions.")] = "",
) -> None:
    """Move @production back to @previous (the version it replaced); writes promotion.json."""
    config = _checked(_params(params, overrides))
    from pipeline.events import announce
    from pipeline.promote import rollback as run_rollback

    decision = run_rollback(config, reason=reason)
    typer.echo(decision.render())
    announce(config, decision)


@app.command()
@_clean_errors
def embed(
    source: Annotated[Path, typer.Option(help="A folder of images or a shards dir.")],
    out: Annotated[Path, typer.Option(help="The Parquet file to write.")] = Path(
        "embeddings/embeddings.parquet"
    ),
    model: Annotated[
        str | None, typer.Option(help="Default: models:/<registry.model_name>@production.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Default: eval.batch_size.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """One embedding row per valid image (Parquet); bad images are quarantined beside it."""
    config = _params(params, overrides)
    model = model or f"models:/{config.registry.model_name}@production"
    if model.startswith(("models:/", "runs:/")):  # an encoder folder needs no tracking store
        _checked(config)
    from pipeline.embed import embed as run_embed

    summary = run_embed(config, model, source, out, device=device, batch_size=batch_size)
    typer.echo(summary.render())


@app.command()
@_clean_errors
def gc(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Only list what would go.")] = False,
) -> None:
    """Delete what params.yaml's retention policy lets go: old checkpoints, feature caches,
    never-promoted model files, DVC objects no promoted version uses (path, size and why)."""
    config = _checked(_params(params, overrides))
    from pipeline.gc import collect

    typer.echo(collect(config, dry_run=dry_run).render())


@app.command()
@_clean_errors
def history(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    last: Annotated[int, typer.Option(help="How many of the newest versions.", min=1)] = 30,
    out: Annotated[Path, typer.Option(help="Folder for history.md and history.png.")] = Path(
        "runs/history"
    ),
) -> None:
    """Per model version: date, data, gated metric, guards, references, drift, decision."""
    config = _checked(_params(params, overrides))
    from rich.console import Console

    from pipeline.history import history as read_history
    from pipeline.history import rich_table, write

    found = read_history(config, last)
    Console().print(rich_table(found))
    table, image = write(found, out)
    typer.echo(f"history: {table}, plot {image}")


@app.command()
@_clean_errors
def schedule(
    cron: Annotated[str, typer.Option(help='When to run, e.g. "0 3 * * *" (03:00 daily).')],
    flow: Annotated[str, typer.Option(help="retrain or sweep.")] = "retrain",
    params: ParamsOpt = Path("params.yaml"),
    timezone: Annotated[str, typer.Option(help="The cron's time zone.")] = "UTC",
) -> None:
    """Serve a flow as a Prefect deployment on a cron schedule (runs until stopped).

    Needs a Prefect server (`prefect server start`, then PREFECT_API_URL); for a work pool on a
    shared server, deploy prefect.yaml instead (`prefect deploy --all`)."""
    from pipeline.scheduling import serve_on_schedule

    config = _params(params, [])  # a bad config is refused now, not at 3 a.m.
    serve_on_schedule(flow, cron, str(params), config, timezone)


@app.command()
@_clean_errors
def automations(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Create or update the Prefect automations (zombie runs -> Crashed; alerts to `alerts.*`)
    and the MLflow registry webhook, on PREFECT_API_URL's server: after `prefect deploy`."""
    from pipeline.automations import ensure_automations

    for line in ensure_automations(_params(params, overrides)):
        typer.echo(line)


if __name__ == "__main__":
    app()
