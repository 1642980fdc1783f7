"""The CLI refuses bad input with one line and exit code 2, before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return CliRunner()


@pytest.mark.parametrize("command", ["shard", "pretrain", "tune", "evaluate", "promote"])
def test_bad_override_is_refused_before_work(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--set", "method.temperature=0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "method.temperature" in lines[0]
    assert not Path("data").exists() and not Path("mlflow.db").exists()


def test_pretrain_without_shards_says_what_to_run(runner: CliRunner) -> None:
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 2
    assert "run `mocopipe shard` first" in result.output


def test_global_batch_larger_than_the_data_is_refused(runner: CliRunner) -> None:
    assert runner.invoke(app, ["shard", "--source", "digits"]).exit_code == 0
    result = runner.invoke(
        app, ["pretrain", "--set", "train.batch_size=4096", "--set", "method.queue_size=16384"]
    )
    assert result.exit_code == 2
    assert "train.batch_size" in result.output


def test_evaluate_of_a_missing_model_names_it(runner: CliRunner) -> None:
    result = runner.invoke(app, ["evaluate", "--model", "nowhere"])
    assert result.exit_code == 2
    assert "nowhere" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cron", "61 * * * *"], "--cron '61 * * * *'"),
        (["--cron", "0 3 * * *", "--timezone", "Mars/Base"], "Invalid timezone"),
        (["--cron", "0 3 * * *", "--flow", "nightly"], "--flow 'nightly'"),
    ],
)
def test_a_bad_schedule_is_refused_with_one_line(
    runner: CliRunner, args: list[str], needle: str
) -> None:
    result = runner.invoke(app, ["schedule", *args])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert needle in result.output


def test_tune_refuses_a_space_bound_that_makes_an_invalid_trial(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["tune", "--set", "tune.space.method.queue_size={type: choice, values: [16, 4096]}"]
    )
    assert result.exit_code == 2
    assert "tune.space.method.queue_size: the bound 16 makes an invalid trial" in result.output


def test_resume_without_a_sweep_says_so(runner: CliRunner) -> None:
    assert runner.invoke(app, ["shard", "--source", "digits"]).exit_code == 0
    result = runner.invoke(app, ["tune", "--resume"])
    assert result.exit_code == 2
    assert "no sweep to resume" in result.output


def test_warm_start_from_a_model_that_is_not_registered_is_refused(runner: CliRunner) -> None:
    assert runner.invoke(app, ["shard", "--source", "digits"]).exit_code == 0
    result = runner.invoke(app, ["pretrain", "--init-from", "models:/moco-encoder@production"])
    assert result.exit_code == 2
    assert "train.init_from: models:/moco-encoder@production is not in the registry" in (
        result.output
    )


def test_warm_start_from_a_folder_without_an_encoder_is_refused(runner: CliRunner) -> None:
    assert runner.invoke(app, ["shard", "--source", "digits"]).exit_code == 0
    result = runner.invoke(app, ["pretrain", "--init-from", "nowhere"])
    assert result.exit_code == 2
    assert "holds no encoder.safetensors" in result.output
