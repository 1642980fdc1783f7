"""Registry mechanics: aliases are the truth about which version serves, and moving them is
serialised.

MLflow has no compare-and-set on aliases. Two promotions that both read `@production = v3` and
then each move it would leave one winner and one version that is neither production nor
previous. So every alias move runs under `registry_lock` (the promoter re-reads production
inside it), and is read back afterwards: a mismatch means a writer bypassed the lock and is
reported, never ignored.

Limitation: the lock is a file lock. For a SQLite store it sits next to the database, so it
covers every process that can open that store. For a tracking server (http://, postgresql://)
it is a per-URI file under `~/.cache/mocopipe/locks`: it serialises promotions started on this
machine only. Promotions from several machines against one server must be run one at a time
(e.g. by the scheduler: one Prefect work queue with concurrency 1); the read-back still detects
a lost race after the fact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import StageError

PRODUCTION, PREVIOUS, CHALLENGER = "production", "previous", "challenger"
SQLITE_PREFIX = "sqlite:///"
REMOTE_LOCKS = Path.home() / ".cache" / "mocopipe" / "locks"


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or None (no such alias or no such registered model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_number(version: ModelVersion | None) -> str | None:
    return None if version is None else str(version.version)


def lock_path(tracking_uri: str) -> Path:
    """Where the registry lock for this store lives (see the module docstring for remotes)."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
        return database.with_name(database.name + ".registry.lock")
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return REMOTE_LOCKS / f"{digest}.lock"


@contextmanager
def registry_lock(tracking_uri: str, timeout_s: float) -> Iterator[None]:
    """Hold the store's registry lock; the OS frees it if the holder dies."""
    path = lock_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise StageError(
            f"registry lock {path} still held after {timeout_s:.0f} s by another promote or "
            "rollback; wait for it or raise registry.lock_timeout_s"
        ) from None
    try:
        yield
    finally:
        lock.release()


def move_aliases(client: MlflowClient, name: str, moves: dict[str, str | None]) -> None:
    """Point each alias at its version (None removes it), then read every one back."""
    for alias, version in moves.items():
        if version is not None:
            client.set_registered_model_alias(name, alias, version)
        elif version_by_alias(client, name, alias) is not None:
            client.delete_registered_model_alias(name, alias)
    for alias, version in moves.items():
        found = version_number(version_by_alias(client, name, alias))
        if found != version:
            raise StageError(
                f"{name}@{alias} is v{found} right after setting it to v{version}: another "
                "writer moved it without the registry lock (a second machine on a tracking "
                "server?); check the aliases before promoting again"
            )


def set_version_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


TRAIN_SAMPLES_TAG = "train_samples"  # on a pretrain run: images in the train split it read


def production_model(client: MlflowClient, name: str) -> tuple[str, int] | None:
    """(models:/ URI of the version holding @production, how many training images its run
    read; 0 when not recorded), or None when nothing serves yet."""
    version = version_by_alias(client, name, PRODUCTION)
    if version is None:
        return None
    tags = client.get_run(version.run_id).data.tags if version.run_id else {}
    return f"models:/{name}/{version.version}", int(tags.get(TRAIN_SAMPLES_TAG, 0))
