"""DVC round trip of the shard stage: repro -> push -> delete cache and shards -> pull gives
byte-identical shards, and DVC sees nothing to rerun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_stage_helpers import file_hashes

from pipeline.dataset import data_version

REPO_ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
STAGE_CMD = (
    f'{sys.executable} -c "from pipeline.config import load_params; '
    "from pipeline.shard import shard; print(shard(load_params('params.yaml')).render())\""
)


def _dvc(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "ITERATIVE_DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [DVC, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _make_repo(repo: Path, remote: Path) -> None:
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    data = {"source": "digits", "shards_dir": "data/shards", "train_limit": 200, "test_limit": 50}
    (repo / "params.yaml").write_text(yaml.safe_dump({"data": {**data, "min_shards": 4}}))
    stage = {
        "cmd": STAGE_CMD,
        "params": ["data"],
        "outs": [{"data/shards": {"persist": True}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"shard": stage}}))
    _dvc(repo, "remote", "add", "-d", "local", str(remote))


@pytest.mark.integration
def test_push_clear_pull_restores_byte_identical_shards(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    _make_repo(repo, remote)
    shards = repo / "data" / "shards"

    _dvc(repo, "repro")
    written = file_hashes(shards)
    assert len([name for name in written if name.endswith(".tar")]) == 8
    version = data_version(shards)
    _dvc(repo, "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(shards)
    _dvc(repo, "pull")

    assert file_hashes(shards) == written
    assert data_version(shards) == version
    assert "up to date" in _dvc(repo, "status")
    assert "didn't change" in _dvc(repo, "repro")
