"""DVC bookkeeping for stages run outside `dvc repro` (by the Prefect flows).

The flows call the stage functions directly, then record each stage's deps, params and outs in
dvc.lock with `dvc commit`, and push the data to the configured remote, so `dvc status` is clean
and dvc.lock says what produced the model.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from dvc.repo import Repo

from pipeline.errors import StageError


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


PIN_REFS = "refs/mocopipe"  # refs/mocopipe/<model>/v<N>: the dvc.lock that produced version N
PINNED_FILES = ("dvc.yaml", "dvc.lock", "params.yaml")


def pin_lock(model_name: str, version: str, root: str | Path = ".") -> str:
    """Keep the workspace's dvc.lock as the record of what produced `version`: a git commit
    (HEAD's tree with this dvc.yaml, dvc.lock and params.yaml) under a ref of its own, so `dvc gc
    --rev` and `git checkout <ref> -- dvc.lock && dvc pull` find its data after later runs. The
    flows write dvc.lock without committing it; the branch and the index stay untouched."""
    prefix = _git(root, "rev-parse", "--show-prefix")
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD", check=False)
    with tempfile.TemporaryDirectory() as tmp:
        index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", *([head] if head else ["--empty"]), env=index)
        for name in PINNED_FILES:
            if (Path(root) / name).exists():
                blob = _git(root, "hash-object", "-w", name)
                entry = f"100644,{blob},{prefix}{name}"
                _git(root, "update-index", "--add", "--cacheinfo", entry, env=index)
        tree = _git(root, "write-tree", env=index)
    who = []  # the committer: git's own settings, else a name that says what wrote it
    for key, default in (("user.name", "mocopipe"), ("user.email", "mocopipe@localhost")):
        who += ["-c", f"{key}={_git(root, 'config', key, check=False) or default}"]
    message = f"dvc.lock of {model_name} v{version}"
    parent = ["-p", head] if head else []
    commit = _git(root, *who, "commit-tree", tree, *parent, "-m", message)
    _git(root, "update-ref", f"{PIN_REFS}/{model_name}/v{version}", commit)
    return commit


def pinned_locks(
    model_name: str, versions: list[str], root: str | Path = "."
) -> dict[str, str] | None:
    """{version: pinned commit} for those of `versions` that have a pin; None without git."""
    if _git(root, "rev-parse", "--git-dir", check=False) is None:
        return None
    found = {
        version: _git(
            root, "rev-parse", "--verify", "-q", f"{PIN_REFS}/{model_name}/v{version}", check=False
        )
        for version in versions
    }
    return {version: sha for version, sha in found.items() if sha}


def _git(
    root: str | Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> str | None:
    """git's stripped output; None when it fails and `check` is False."""
    done = subprocess.run(
        ["git", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        if check:
            where = Path(root).resolve()
            raise StageError(f"git {' '.join(args)} in {where}: {done.stderr.strip()}")
        return None
    return done.stdout.strip()
