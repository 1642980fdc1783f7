"""Guards around a flow run: one run at a time per project (a second fails at once instead of
racing the first over the same shards, model folder and aliases), and undo of its records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import StageError

LOCK_FILE = Path("runs/flow.lock")


@contextmanager
def project_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the project's flow lock (an OS file lock: freed even if the holder is killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(path, timeout=0), path.with_suffix(".owner")
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "another process"
        raise StageError(
            f"{path.resolve()}: another flow run ({holder}) holds this project's lock; runs "
            "never overlap: wait for it to finish"
        ) from None
    try:
        owner.write_text(f"pid {os.getpid()}\n")
        yield
    finally:
        lock.release()


@contextmanager
def restored_on_failure(path: Path) -> Iterator[None]:
    """Put `path` back as it was if the block fails (a run's dvc.lock: a failed run must not
    record data or models it did not finish with)."""
    before = path.read_bytes() if path.exists() else None
    try:
        yield
    except BaseException:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)
        raise
