"""Retention (pipeline/gc.py) on a real project layout: Ray Train run folders, feature cache
files, an MLflow SQLite registry with a promotion history, and a git + DVC repo with a local
remote. What is kept and what goes is written out by hand here, from the policy's words."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from moco.backbones import BackboneSpec
from pipeline.cli import app
from pipeline.config import ConfigError, load_params
from pipeline.encoder import EncoderSpec, load_encoder, save_encoder
from pipeline.evaluation.features import model_fingerprint
from pipeline.gc import ARCHIVED_TAG, collect
from pipeline.versioning import pin_lock, record_stages

DVC = str(Path(sys.executable).with_name("dvc"))
NAME = "moco-encoder"
SPEC = EncoderSpec(
    "mocov2", BackboneSpec("resnet10", 1, 8, (0.3,), (0.3,), width=4, small_stem=True)
)
POLICY = {"checkpoint_runs": 3, "feature_caches": 2, "unpromoted_versions": 2}
STAGE = {"stages": {"shard": {"cmd": "true", "outs": [{"data/shards": {"persist": True}}]}}}


def _run(folder: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _checkpoints(storage: Path) -> dict[str, list[str]]:
    """Five finished pretrain runs a..e (e the latest), two checkpoints each, as Ray names them."""
    runs = {}
    for day, run in enumerate("abcde", start=1):
        names = [f"checkpoint_2026-12-0{day}_03-0{n}-00.000000" for n in (1, 2)]
        for name in names:
            _write(storage / f"pretrain-{run}" / name / "checkpoint.pt", os.urandom(1000))
        _write(storage / f"pretrain-{run}" / "checkpoint_manager_snapshot.json", b"{}")
        runs[run] = names
    (storage / "latest-pretrain.json").write_text(json.dumps({"run_id": "c"}))  # resumed later
    return runs


def _version(client: MlflowClient, folder: Path, seed: int, tags: dict[str, str]) -> str:
    """A registered version whose logged model holds a tiny encoder's files."""
    import torch

    torch.manual_seed(seed)
    encoder_dir = save_encoder(SPEC.build()[0], SPEC, folder / f"encoder-{seed}")
    experiment = client.get_experiment_by_name("moco-pretrain").experiment_id
    model = client.create_logged_model(experiment, name="encoder")
    client.log_model_artifacts(model.model_id, str(encoder_dir))
    version = mlflow.register_model(f"models:/{model.model_id}", NAME).version
    for key, value in tags.items():
        client.set_model_version_tag(NAME, version, key, value)
    return str(version)


def _shards(project: Path, files: dict[str, bytes]) -> None:
    """The shards folder as a run leaves it, recorded in dvc.lock and pushed, as the flow does."""
    shutil.rmtree(project / "data/shards", ignore_errors=True)
    for name, data in files.items():
        _write(project / "data/shards" / name, data)
    record_stages("shard", root=str(project))
    _run(project, DVC, "push", "-q")


def _objects(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file() and len(p.parent.name) == 2}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    _run(folder, "git", "init", "-q")
    _run(folder, DVC, "init", "-q")
    _run(folder, DVC, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    (folder / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    (folder / "params.yaml").write_text(yaml.safe_dump({"retention": POLICY}))
    return folder


def test_policy_keeps_what_serves_or_resumes_and_deletes_exactly_the_rest(project: Path) -> None:
    params = load_params("params.yaml")
    runs = _checkpoints(project / "runs/ray")

    # the registry's history: v1 promoted, v2 rejected, v3 promoted (replaced v1), v4 and v5
    # rejected, v6 the current challenger. Pins are taken at each promotion, as the flow does.
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    from pipeline.tracking import setup_mlflow

    setup_mlflow(params)
    client = MlflowClient()
    shards_a = {"train/shard-0.tar": b"a" * 4000, "train/manifest.json": b'{"v": "a"}'}
    _shards(project, shards_a)
    v1 = _version(client, project, 1, {"decision": "promoted"})
    pin_lock(NAME, v1, project)
    _shards(project, {**shards_a, "train/shard-1.tar": b"b" * 3000, "train/manifest.json": b"b"})
    v2 = _version(client, project, 2, {"decision": "rejected"})
    shards_c = {"train/shard-0.tar": b"c" * 2000, "train/manifest.json": b'{"v": "c"}'}
    _shards(project, shards_c)  # a full rebuild: nothing of a or b is in the workspace now
    v3 = _version(client, project, 3, {"decision": "promoted", "replaced_version": v1})
    pin_lock(NAME, v3, project)
    v4, v5, v6 = (_version(client, project, s, {"decision": "rejected"}) for s in (4, 5, 6))
    client.set_registered_model_alias(NAME, "previous", v1)
    client.set_registered_model_alias(NAME, "production", v3)
    client.set_registered_model_alias(NAME, "challenger", v6)
    client.set_registered_model_alias(NAME, "canary", v2)  # set by hand: an alias is an alias
    cache_before = _objects(project / ".dvc/cache")
    remote_before = _objects(project.parent / "remote")

    # feature caches: production's (the oldest), the random-init reference's, three others
    production_print = model_fingerprint(
        load_encoder(project / "encoder-3")[0], spec=asdict(SPEC), bf16=False
    )
    caches = [f"{production_print}-eval1", "0000random0000aa-eval1", "1111-eval1", "2222-eval1"]
    caches.append("3333-eval1")
    for age, name in enumerate(reversed(caches)):  # the first is the oldest
        _write(project / "runs/features" / name / "train.npy", os.urandom(500))
        os.utime(project / "runs/features" / name, (1e9 - age * 1000, 1e9 - age * 1000))

    planned = collect(params, dry_run=True)
    assert not planned.applied and (project / "runs/ray/pretrain-a").exists()
    shown = CliRunner().invoke(app, ["gc", "--dry-run"])
    assert shown.exit_code == 0, shown.output
    for item in planned.items:
        if item.kind in ("checkpoint", "features", "model"):
            assert item.what in shown.output

    report = collect(params)
    assert report.applied
    assert [i.what for i in report.items] == [i.what for i in planned.items]
    assert report.size == sum(i.size for i in planned.items) > 0

    # Ray: c (latest) keeps both checkpoints; e and d (the two newest others) their final one;
    # a and b go whole
    storage = project / "runs/ray"
    assert sorted(p.name for p in storage.iterdir()) == [
        "latest-pretrain.json",
        "pretrain-c",
        "pretrain-d",
        "pretrain-e",
    ]
    assert sorted(p.name for p in (storage / "pretrain-c").glob("checkpoint_2*")) == runs["c"]
    for run in "de":
        assert [p.name for p in (storage / f"pretrain-{run}").glob("checkpoint_2*")] == runs[run][
            1:
        ]

    # features: production's and the two most recently used
    assert sorted(p.name for p in (project / "runs/features").iterdir()) == sorted(
        [caches[0], caches[3], caches[4]]
    )

    # MLflow: v4 never served, holds no alias and has 2 newer versions: files gone, tagged
    # archived; v1 (@previous), v2 (@canary), v3 (@production), v5 (one newer), v6 (@challenger)
    # untouched
    for version in (v1, v2, v3, v4, v5, v6):
        entry = client.get_model_version(NAME, version)
        model_id = entry.source.removeprefix("models:/")
        folder = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
        files = os.listdir(folder) if folder.exists() else []
        if version == v4:
            assert ARCHIVED_TAG in entry.tags and files == [], version
        else:
            assert ARCHIVED_TAG not in entry.tags and "encoder.safetensors" in files, version
    served = load_encoder(f"models:/{NAME}@production")[0]
    assert model_fingerprint(served, spec=asdict(SPEC), bf16=False) == production_print

    # DVC: the objects only b used (its shard, its manifest, its .dir) left cache and remote
    cache_after = _objects(project / ".dvc/cache")
    remote_after = _objects(project.parent / "remote")
    assert len(cache_before - cache_after) == 3 and cache_before - cache_after == (
        remote_before - remote_after
    )
    gone = [i for i in report.items if i.kind == "dvc-cache"]
    assert len(gone) == 3 and sum(i.size for i in gone) > 3000

    # ... and v1's data, which the workspace no longer has, still pulls from the remote
    ref = f"refs/mocopipe/{NAME}/v{v1}"
    (project / "dvc.lock").write_text(_run(project, "git", "show", f"{ref}:dvc.lock"))
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "data/shards")
    _run(project, DVC, "pull", "-q")
    for name, data in shards_a.items():
        assert (project / "data/shards" / name).read_bytes() == data


def test_the_project_links_workspace_files_to_the_dvc_cache(project: Path) -> None:
    """The project's .dvc/config: hardlinks here (ext4 has no reflink), so data/ and the cache
    share blocks: `du` of both together counts the shards once."""
    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / ".dvc/config", project / ".dvc/config")
    _run(project, DVC, "remote", "add", "-d", "-f", "local", str(project.parent / "remote"))
    _shards(project, {f"train/shard-{n}.tar": os.urandom(1_000_000) for n in range(4)})
    shard = project / "data/shards/train/shard-0.tar"
    assert shard.stat().st_nlink == 2  # the workspace file is the cache object
    total = _run(project, "du", "-sk", "--total", "data", ".dvc/cache").splitlines()[-1]
    assert 3900 <= int(total.split()[0]) < 4400  # KiB: 3,906 of shards, once, not twice


def test_retention_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"retention.checkpoint_runs: .*greater than or equal"):
        load_params(None, ["retention.checkpoint_runs=0"])
