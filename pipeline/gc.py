"""Retention: what a scheduled pipeline may delete, by the policy in `params.retention`.

Every retrain leaves a Ray Train run folder, a feature cache, a registered model's files and new
DVC objects behind; a daily schedule would keep all of them for ever. `collect` lists what the
policy lets go (path or URI, bytes, why) and, unless asked for a dry run, deletes exactly that:

- Ray Train runs under `train.storage_path` (local or s3://): the latest run, the one
  `pretrain --resume` continues, keeps every checkpoint; the `checkpoint_runs - 1` runs before
  it keep their final checkpoint; older runs go whole. The encoder a run produced was exported
  and logged to MLflow, so no model lives only in a checkpoint.
- Feature caches under `eval.features_dir`: production's (its encoder's fingerprint, as the
  evaluate stage keys them) and the `feature_caches` most recently used stay.
- MLflow: a model version that never held `@production` or `@previous` (no alias now, decision
  never "promoted", "restored" or "rolled back", never a `replaced_version`) loses its logged
  model files once `unpromoted_versions` newer versions exist, and is tagged `archived`. Its
  run, metrics, tags and description stay, so the history still reads.
- DVC cache and default remote: objects used neither by the workspace nor by the dvc.lock of a
  promoted version (pinned as a git commit when it was promoted: `versioning.pin_lock`) go.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Params
from pipeline.storage import filesystem, join, read_text, resolved

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's default names: checkpoint_<date>_<time>.<us>
RUN_PREFIX = "pretrain-"  # pretrain's Ray Train run folders: pretrain-<MLflow run id>
ARCHIVED_TAG = "archived"  # on a model version whose files retention deleted: when
SHOWN = 25  # items listed per kind (DVC objects can be many)
PROMOTED_DECISIONS = {"promoted", "restored", "rolled back"}  # promote.py's decision tags


@dataclass(frozen=True)
class Item:
    """One thing the policy lets go."""

    kind: str  # checkpoint | features | model | dvc-cache | dvc-remote
    what: str  # a path, a URI or a model version
    size: int  # bytes
    why: str
    delete: Callable[[], None] = field(repr=False, compare=False)


@dataclass
class Report:
    items: list[Item]
    kept: list[str]  # what the policy protects, one line each
    applied: bool = False
    finish: list[Callable[[], None]] = field(default_factory=list)  # after the deletes

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    def render(self) -> str:
        verb = "deleted" if self.applied else "would delete (dry run)"
        lines = [f"gc: {verb} {len(self.items)} item(s), {_human(self.size)}"]
        for kind in dict.fromkeys(item.kind for item in self.items):
            group = [item for item in self.items if item.kind == kind]
            lines.append(f"  {kind}: {len(group)}, {_human(sum(i.size for i in group))}")
            lines += [f"    {i.what}  {_human(i.size)}  ({i.why})" for i in group[:SHOWN]]
            if len(group) > SHOWN:
                lines.append(f"    ... and {len(group) - SHOWN} more")
        lines += [f"  kept: {line}" for line in self.kept]
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def collect(params: Params, *, dry_run: bool = False, root: str | Path = ".") -> Report:
    """Plan what `params.retention` lets go and, unless `dry_run`, delete exactly that.
    `root` is the DVC project (the flows and the CLI run in it)."""
    r = params.retention
    report = Report([], [])
    for part in (_checkpoints, _feature_caches, _model_versions):
        part(params, report)
    if r.dvc_cache or r.dvc_remote:
        _dvc(params, report, Path(root))
    if not dry_run:
        for item in report.items:
            item.delete()
        for step in report.finish:
            step()
        report.applied = True
    return report


def after_retrain(params: Params, promoted_version: str | None, root: str | Path = ".") -> Report:
    """The end of a retrain: pin the dvc.lock of a newly promoted version (its data then
    survives every later gc), then apply the policy unless `retention.enabled` is off."""
    from pipeline.versioning import pin_lock

    if promoted_version is not None:
        pin_lock(params.registry.model_name, promoted_version, root)
    if not params.retention.enabled:
        return Report([], ["everything: retention.enabled is false"])
    return collect(params, root=root)


# --- Ray Train checkpoints --------------------------------------------------------------------


def _checkpoints(params: Params, report: Report) -> None:
    from pipeline.pretrain import LATEST_RUN_FILE

    storage = resolved(params.train.storage_path)
    fs, base = filesystem(storage)
    if not fs.isdir(base):
        return
    record = read_text(join(storage, LATEST_RUN_FILE))
    latest = f"{RUN_PREFIX}{json.loads(record)['run_id']}" if record else None
    runs: dict[str, list[str]] = {}
    for entry in fs.ls(base, detail=True):
        if entry["type"] == "directory" and _leaf(entry["name"]).startswith(RUN_PREFIX):
            runs[entry["name"]] = sorted(
                child["name"]
                for child in fs.ls(entry["name"], detail=True)
                if child["type"] == "directory"
                and _leaf(child["name"]).startswith(CHECKPOINT_PREFIX)
            )
    # newest first, by the newest checkpoint's timestamped name (a run without one is oldest)
    order = sorted(runs, key=lambda run: _leaf(runs[run][-1]) if runs[run] else "", reverse=True)
    if latest is not None and any(_leaf(run) == latest for run in order):
        order.sort(key=lambda run: _leaf(run) != latest)  # stable: the latest run first
        report.kept.append(f"{latest}: every checkpoint (the latest run; pretrain --resume)")
        order = order[1:]
        keep_final = params.retention.checkpoint_runs - 1
    else:
        keep_final = params.retention.checkpoint_runs
    for rank, run in enumerate(order):
        if rank >= keep_final:
            why = f"run older than the last {params.retention.checkpoint_runs}"
            report.items.append(_fs_item("checkpoint", fs, run, why))
            continue
        for checkpoint in runs[run][:-1]:
            why = "not the final checkpoint of a finished run"
            report.items.append(_fs_item("checkpoint", fs, checkpoint, why))
    kept_final = [_leaf(run) for run in order[:keep_final] if runs[run]]
    if kept_final:
        report.kept.append(f"final checkpoint of {', '.join(kept_final)}")


def _leaf(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _fs_item(kind: str, fs, path: str, why: str) -> Item:
    shown = path if "://" in path or path.startswith("/") else f"{fs.protocol[0]}://{path}"
    return Item(kind, shown, int(fs.du(path)), why, lambda: fs.rm(path, recursive=True))


# --- feature caches ---------------------------------------------------------------------------


def _feature_caches(params: Params, report: Report) -> None:
    from pipeline.storage import is_remote

    folder = params.eval.features_dir
    if not folder or is_remote(folder) or not Path(folder).is_dir():
        return
    caches = sorted(
        (path for path in Path(folder).iterdir() if path.is_dir()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    keep = params.retention.feature_caches
    if len(caches) <= keep:
        return
    fingerprint = _production_fingerprint(params)
    protected = [p for p in caches if fingerprint and p.name.startswith(f"{fingerprint}-")]
    if protected:
        report.kept.append(f"production's feature cache(s): {', '.join(p.name for p in protected)}")
    rest = [path for path in caches if path not in protected]
    report.kept.append(f"{min(keep, len(rest))} most recently used feature cache(s)")
    fs, _ = filesystem(folder)
    for path in rest[keep:]:
        why = f"not production's, not among the {keep} most recently used"
        report.items.append(_fs_item("features", fs, str(path.resolve()), why))


def _production_fingerprint(params: Params) -> str | None:
    """The key the evaluate stage gives production's encoder features (None: no production)."""

    from mlflow.tracking import MlflowClient

    from pipeline.encoder import load_encoder
    from pipeline.evaluation.features import model_fingerprint
    from pipeline.registry import PRODUCTION, version_by_alias
    from pipeline.tracking import setup_mlflow

    setup_mlflow(params)
    name = params.registry.model_name
    if version_by_alias(MlflowClient(), name, PRODUCTION) is None:
        return None
    encoder, spec = load_encoder(f"models:/{name}@{PRODUCTION}")
    return model_fingerprint(encoder, spec=spec.to_dict(), bf16=params.train.precision == "bf16")


# --- MLflow model versions --------------------------------------------------------------------


def _model_versions(params: Params, report: Report) -> None:
    from mlflow.tracking import MlflowClient

    versions, served, aliased = _registry(params)  # points MLflow at the store first
    client, name = MlflowClient(), params.registry.model_name
    protected = [str(v.version) for v in versions if str(v.version) in served | aliased]
    if protected:
        shown = ", ".join(f"v{v}" for v in protected)
        report.kept.append(f"{name} {shown}: hold or held an alias (model files kept)")
    keep = params.retention.unpromoted_versions
    for version in versions:
        if str(version.version) in protected or ARCHIVED_TAG in version.tags:
            continue
        newer = sum(int(v.version) > int(version.version) for v in versions)
        location = _artifact_location(client, version) if newer >= keep else None
        if location is not None:
            why = f"never promoted; {newer} newer versions (keep {keep})"
            report.items.append(_model_item(client, name, version, location, why))


def _registry(params: Params) -> tuple[list, set[str], set[str]]:
    """The model's versions, oldest first; the numbers of those that hold or held @production
    or @previous (that alias now, a promoting decision, or replaced by a promotion); and of
    those holding any alias now (search results carry no aliases: the model's own list does)."""
    from mlflow.tracking import MlflowClient

    from pipeline.promote import REPLACED_TAG
    from pipeline.registry import PREVIOUS, PRODUCTION
    from pipeline.tracking import setup_mlflow

    setup_mlflow(params)
    client, name = MlflowClient(), params.registry.model_name
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    if not versions:
        return [], set(), set()
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    replaced = {v.tags[REPLACED_TAG] for v in versions if REPLACED_TAG in v.tags}
    served = {
        str(v.version)
        for v in versions
        if v.tags.get("decision") in PROMOTED_DECISIONS or str(v.version) in replaced
    } | {aliases[a] for a in (PRODUCTION, PREVIOUS) if a in aliases}
    return versions, served, set(aliases.values())


def _artifact_location(client, version) -> str | None:
    """Where the version's model files are: its logged model's folder (MLflow 3), or the
    run artifact path of an older runs:/ registration."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    source = version.source or ""
    model_id = version.model_id or (
        source[len("models:/") :] if source.startswith("models:/m-") else None
    )
    try:
        if model_id:
            return client.get_logged_model(model_id).artifact_location
        if source.startswith("runs:/"):
            return RunsArtifactRepository.get_underlying_uri(source)
    except MlflowException:
        return None  # its logged model or run is gone already
    return None


def _model_item(client, name: str, version, location: str, why: str) -> Item:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(location)

    def delete() -> None:
        repository.delete_artifacts()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        client.set_model_version_tag(name, str(version.version), ARCHIVED_TAG, stamp)
        client.set_model_version_tag(
            name, str(version.version), "archived_reason", f"retention: model files deleted; {why}"
        )

    size = _artifact_bytes(repository)
    return Item("model", f"{name} v{version.version} ({location})", size, why, delete)


def _artifact_bytes(repository, path: str | None = None) -> int:
    total = 0
    for entry in repository.list_artifacts(path):
        total += _artifact_bytes(repository, entry.path) if entry.is_dir else entry.file_size or 0
    return total


# --- DVC cache and remote ---------------------------------------------------------------------


def _dvc(params: Params, report: Report, root: Path) -> None:
    from dvc.repo import Repo
    from dvc_data.hashfile.db import get_index

    from pipeline.versioning import pinned_locks

    if not (root / ".dvc").is_dir():
        return
    served = sorted(_registry(params)[1], key=int)
    pins = pinned_locks(params.registry.model_name, served, root)
    if pins is None:  # no git: a promoted version's dvc.lock cannot be kept, so nothing goes
        report.kept.append("DVC: not a git repository, so dvc gc is skipped")
        return
    if unpinned := [v for v in served if v not in pins]:
        name = params.registry.model_name
        report.kept.append(
            f"DVC: {', '.join(f'v{v}' for v in unpinned)} served without a pinned dvc.lock, so "
            f"dvc gc is skipped (their data stays); pin each with `git update-ref "
            f"refs/mocopipe/{name}/v<N> <commit with its dvc.lock>`"
        )
        return
    repo = Repo(str(root))
    used = set()  # what `dvc gc --workspace --rev <pin> ...` keeps: the workspace and the pins
    for objects in repo.used_objs(revs=list(pins.values()) or None).values():
        used.update(o.value for o in objects if o.name == "md5")
    shown = ", ".join(f"v{v}" for v in pins) or "none yet"
    report.kept.append(f"DVC: the workspace and the dvc.lock of promoted versions ({shown})")
    databases = []
    if params.retention.dvc_cache:
        databases.append(("dvc-cache", repo.cache.local))
    if params.retention.dvc_remote and repo.config["core"].get("remote"):
        databases.append(("dvc-remote", repo.cloud.get_remote_odb(None, "gc -c")))
    why = "used by neither the workspace nor a promoted version's dvc.lock"
    for kind, odb in databases:
        for oid in sorted(set(odb.all()) - used):
            path = odb.oid_to_path(oid)
            report.items.append(Item(kind, path, int(odb.fs.size(path)), why, _remover(odb, path)))
        report.finish.append(get_index(odb).clear)  # its index of known objects forgets them
    repo.close()


def _remover(odb, path: str) -> Callable[[], None]:
    return lambda: odb.fs.remove(path)
