"""DVC bookkeeping for stages run outside `dvc repro` (by the Prefect flows).

The flows call the stage functions directly, then record each stage's deps, params and outs in
dvc.lock with `dvc commit`, and push the data to the configured remote, so `dvc status` is clean
and dvc.lock says what produced the model.
"""

from __future__ import annotations

from dvc.repo import Repo


def record_stages(*stages: str, root: str = ".") -> None:
    """Write the current hashes of these dvc.yaml stages into dvc.lock (and the cache)."""
    repo = Repo(root)
    for stage in stages:
        repo.commit(stage, force=True)


def push(root: str = ".") -> int:
    """Upload cached outputs to the default DVC remote; returns how many files moved."""
    return Repo(root).push()


def pipeline_status(root: str = ".") -> dict:
    """`dvc status` as a dict: empty when data and pipelines are up to date."""
    return Repo(root).status()
