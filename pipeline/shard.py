"""The data stage: a source becomes WebDataset shards plus a manifest per split.

Why it is built this way:
- Deterministic: samples sorted by source reference, tar headers fixed (mtime 0, no owner
  names, mode 0444), PNG re-encoding without metadata, no timestamps in the manifest. Same input,
  byte-identical shards, so DVC hashes change only when the data does.
- Atomic: everything is written into a hidden temp folder beside the split and moved into place
  afterwards, the manifest last; a crash leaves the previous version intact and readable. On an
  object store (s3://) the split is staged in a local folder and uploaded, new shards first and
  the manifest last, so readers see the old manifest and its untouched shards until then.
- Incremental for folders: a re-run shards only files whose content is new, into new shards
  numbered after the existing ones; old shards are never rewritten. Changing anything that shapes
  the output (image mode, shard sizes, class folders, max_pixels) rebuilds the split.
- Small images are stored twice: in the tar (the shard every reader reads) and, when all of a
  shard's images are small and one size, as one uint8 [N, C, H, W] array beside it
  (`shard-000000.npy`, listed in the manifest with its sha256). Training reads the array instead
  of decoding each PNG (pipeline/dataset.py); it derives from the tar, so the data version is
  the same with or without it.
- Nothing silent: bad inputs are quarantined with a reason, byte-identical duplicates are stored
  once and counted, files without an image suffix are listed as ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, pairwise, starmap
from multiprocessing.pool import Pool
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from rich.console import Console
from rich.progress import track
from webdataset import ShardWriter

from pipeline.config import DataParams, Params
from pipeline.dataset import data_version, manifest_version
from pipeline.errors import StageError
from pipeline.sources import (
    Candidate,
    Examined,
    Source,
    SourceError,
    examine,
    open_source,
    vote_mode,
)
from pipeline.storage import filesystem, is_remote, join, resolved

log = logging.getLogger(__name__)

FORMAT = 2  # 2: decoded arrays beside the shards of small images
SHARD_PATTERN = "shard-%06d.tar"
DECODED_PATTERN = "shard-%06d.npy"
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
TAR_BLOCK = 512
# Fixed tar metadata: webdataset's TarWriter takes these (uid/gid are 0 by default). mtime must be
# an int: a float adds a PAX header to every member (bigger, and ~2x slower to write).
TAR_FIXED: dict[str, Any] = {"mtime": 0, "user": "", "group": "", "mode": 0o444}
_TEMP_PREFIXES = (".tmp-", ".old-")
WINDOW = 512  # candidates examined per step: bounds memory, keeps the progress bar moving
PARALLEL_MIN = 2000  # fewer candidates than this are decoded in-process
MAX_PROCESSES = 8
T = TypeVar("T")


class EmptySourceError(SourceError):
    """A split of a source holds no valid image."""


@dataclass
class ShardSummary:
    """What `shard` did, per split: {samples, new_samples, shards, quarantined, duplicates}."""

    splits: dict[str, dict[str, int]]
    data_version: str
    skipped: bool  # nothing new anywhere: no file was written
    shards_dir: str = ""
    new_quarantine: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def render(self, max_listed: int = 10) -> str:
        """A few readable lines; quarantined files of this run are named with their reason."""
        head = "nothing new, shards unchanged" if self.skipped else "shards written"
        lines = [f"data version {self.data_version} ({head}) in {self.shards_dir}"]
        for split, r in self.splits.items():
            lines.append(
                f"  {split}: {r['samples']} samples (+{r['new_samples']} new) in {r['shards']} "
                f"shards; {r['quarantined']} quarantined, {r['duplicates']} duplicates"
            )
        for split, entries in self.new_quarantine.items():
            if entries:
                where = join(self.shards_dir, split, QUARANTINE)
                lines.append(f"  quarantined in {split} this run: {len(entries)} (see {where})")
                lines += [f"    {e['path']}: {e['reason']}" for e in entries[:max_listed]]
                if len(entries) > max_listed:
                    lines.append(f"    ... and {len(entries) - max_listed} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    """A sample ready to write; its bytes wait in the spool file (memory stays flat)."""

    ref: str
    label: int | None
    ext: str
    sha256: str
    width: int
    height: int
    offset: int
    length: int
    pixels_length: int  # decoded pixels, right after the stored bytes in the spool (0: none)


@dataclass
class _Scan:
    """What pass 1 found in a split: new samples, and every decision made about a file."""

    entries: list[_Entry] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    duplicate_of: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # ref -> sha256 ("" when unreadable)
    changed: list[str] = field(default_factory=list)

    @property
    def anything_new(self) -> bool:
        return bool(self.entries or self.quarantine or self.duplicate_of)


@dataclass
class _Staged:
    """A split written into its temp folder, waiting to be committed."""

    split: str
    tmp: Path
    manifest: dict[str, Any]
    new_files: list[str]
    replace_all: bool
    new_samples: int
    new_quarantine: list[dict[str, str]]


@dataclass(frozen=True)
class _Job:
    """What every split of one run shares."""

    root: Path
    src: Source
    cfg: DataParams
    mode: str
    build: dict[str, Any]
    pool: Pool | None


def shard(params: Params, source: str | None = None) -> ShardSummary:
    """Write `<shards_dir>/<split>/shard-NNNNNN.tar` + manifest.json + quarantine.jsonl."""
    cfg = params.data
    if is_remote(cfg.shards_dir):
        return _shard_to_object_store(params, source)
    src = open_source(source or cfg.source, cfg)
    root = Path(cfg.shards_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    previous = {split: _previous_manifest(root / split) for split in src.splits}
    mode = _image_mode(cfg, src, previous)
    build = _build_config(cfg, src, mode)
    todo = {s: c for s, c in src.splits.items() if not _is_current(previous[s], build, src)}
    staged: list[_Staged] = []
    try:
        with _decoders(sum(map(len, todo.values()))) as pool:
            job = _Job(root, src, cfg, mode, build, pool)
            for split, candidates in todo.items():
                item = _stage_split(job, split, candidates, previous[split])
                if item is not None:
                    staged.append(item)
        for item in staged:
            _commit(root / item.split, item)
    finally:
        for item in staged:
            shutil.rmtree(item.tmp, ignore_errors=True)
    removed = _remove_stale_splits(root, src)
    return _summary(root, src, staged, skipped=not (staged or removed))


def input_key(params: Params, source: str | None = None) -> str:
    """A cheap key of what `shard` reads: the data settings and the source (its fingerprint, or
    for a folder each file's path, size and mtime). Same key, same shards: a flow may skip the
    stage (Prefect caches on this), after checking the shards on disk are still that version."""
    cfg = params.data
    spec = source or cfg.source
    settings = cfg.model_dump() | {"shards_dir": resolved(cfg.shards_dir)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(spec.encode())
    if Path(spec).is_dir():
        for path in sorted(p for p in Path(spec).rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(open_source(spec, cfg).fingerprint.encode())
    return digest.hexdigest()


# --- object stores ---------------------------------------------------------------------------


def _shard_to_object_store(params: Params, source: str | None) -> ShardSummary:
    """An object store cannot rename a folder: shard into a local staging folder that starts
    with the current manifests only (an append needs nothing else), then upload what changed."""
    url = resolved(params.data.shards_dir)
    fs, root = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="moco-shards-") as staging:
        before: dict[str, dict[str, Any]] = {}
        for path in fs.glob(f"{root}/*/{MANIFEST}"):
            split = path.rstrip("/").split("/")[-2]
            (Path(staging) / split).mkdir()
            fs.get_file(path, str(Path(staging) / split / MANIFEST))
            before[split] = json.loads((Path(staging) / split / MANIFEST).read_text())
        data = params.data.model_copy(update={"shards_dir": staging})
        summary = shard(params.model_copy(update={"data": data}), source)
        _upload(url, Path(staging), before)
    summary.shards_dir = url
    return summary


def _upload(url: str, staging: Path, before: dict[str, dict[str, Any]]) -> None:
    """New shards of every split first, then quarantine lists, then manifests: a manifest is
    only ever written after every shard it names. Splits the source no longer has lose their
    manifest first, then their shards."""
    fs, root = filesystem(url)
    changed = {}
    for split_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
        manifest = json.loads((split_dir / MANIFEST).read_text())
        if manifest != before.get(split_dir.name):
            changed[split_dir.name] = (manifest, before.get(split_dir.name))
    for split, (manifest, old) in changed.items():
        _refuse_rebuild(url, split, manifest, old)
    for split, (manifest, old) in changed.items():
        known = {name for s in old["shards"] for name in shard_files(s)} if old else set()
        for name in (name for s in manifest["shards"] for name in shard_files(s)):
            if name not in known:
                fs.put_file(str(staging / split / name), f"{root}/{split}/{name}")
    for name in (QUARANTINE, MANIFEST):
        for split in changed:
            fs.put_file(str(staging / split / name), f"{root}/{split}/{name}")
    for split in sorted(set(before) - {p.name for p in staging.iterdir()}):
        log.warning("%s/%s: not a split of this source; removing it", url, split)
        fs.rm_file(f"{root}/{split}/{MANIFEST}")
        fs.rm(f"{root}/{split}", recursive=True)


def _refuse_rebuild(
    url: str, split: str, manifest: dict[str, Any], old: dict[str, Any] | None
) -> None:
    """A rebuild would overwrite shards the current manifest names while readers use them."""
    if old is None:
        return
    kept = {s["file"]: s["sha256"] for s in old["shards"]}
    if any(kept.get(s["file"], s["sha256"]) != s["sha256"] for s in manifest["shards"]):
        raise StageError(
            f"data.shards_dir={url}: split '{split}' must be rebuilt (the source or a setting "
            "that shapes the shards changed) and an object store cannot swap it atomically; "
            f"delete {url}/{split} or set data.shards_dir to a new prefix"
        )


# --- per split ------------------------------------------------------------------------------


def _is_current(old: dict[str, Any] | None, build: dict[str, Any], src: Source) -> bool:
    """A static source with the same fingerprint and build needs no look at its images."""
    return (
        old is not None
        and old["build"] == build
        and bool(src.fingerprint)
        and old["source_fingerprint"] == src.fingerprint
    )


def _stage_split(
    job: _Job, split: str, candidates: list[Candidate], old: dict[str, Any] | None
) -> _Staged | None:
    """Scan and write one split into a temp folder; None when nothing changed."""
    append = old is not None and old["build"] == job.build and job.src.appendable
    base = old if append else None
    tmp = job.root / f".tmp-{split}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / "spool.bin", "w+b") as spool:
            scan = _scan(job, split, candidates, base, spool)
            if append and not scan.anything_new:
                shutil.rmtree(tmp)
                return None
            _refuse_empty(split, job.src, scan, base)
            start = len(base["shards"]) if base else 0
            shards = _write_shards(scan.entries, spool, tmp, start, base, job)
        (tmp / "spool.bin").unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = _manifest(split, job, base, scan, shards)
    new_files = [name for record in shards for name in shard_files(record)]
    return _Staged(split, tmp, manifest, new_files, not append, len(scan.entries), scan.quarantine)


def _scan(
    job: _Job,
    split: str,
    candidates: list[Candidate],
    base: dict[str, Any] | None,
    spool: IO[bytes],
) -> _Scan:
    """Pass 1: read, hash and fully decode every new input once (in a process pool when there
    are many), then de-duplicate in source order and park what to store in the spool."""
    known: dict[str, str] = base["files"] if base else {}
    kept_by_sha = _kept_by_sha(base) if base else {}
    scan = _Scan()
    windows = [candidates[i : i + WINDOW] for i in range(0, len(candidates), WINDOW)]
    for window in _progress(windows, f"decoding {split} ({WINDOW} per step)"):
        args = [(c, known.get(c.ref), job.mode, job.cfg.max_pixels) for c in window]
        pool = job.pool
        results = pool.starmap(examine, args, chunksize=16) if pool else starmap(examine, args)
        for candidate, result in zip(window, results, strict=True):
            _record(scan, candidate, result, known, kept_by_sha, spool)
    _warn_about_history(split, candidates, known, scan)
    return scan


def _record(
    scan: _Scan,
    candidate: Candidate,
    result: Examined,
    known: dict[str, str],
    kept_by_sha: dict[str, str],
    spool: IO[bytes],
) -> None:
    """One decision per new file: quarantined, duplicate or kept (in source order, so the
    first copy of some content is the one kept)."""
    if result.unchanged:
        return
    if candidate.ref in known:
        scan.changed.append(candidate.ref)
    scan.files[candidate.ref] = result.sha256
    if result.prepared is None:
        scan.quarantine.append({"path": candidate.ref, "reason": str(result.problem)})
        return
    if result.sha256 in kept_by_sha:
        scan.duplicate_of[candidate.ref] = kept_by_sha[result.sha256]
        return
    kept_by_sha[result.sha256] = candidate.ref
    prepared = result.prepared
    offset = spool.tell()
    spool.write(prepared.data)
    spool.write(prepared.pixels)
    scan.entries.append(
        _Entry(
            candidate.ref,
            candidate.label,
            prepared.ext,
            result.sha256,
            prepared.width,
            prepared.height,
            offset,
            len(prepared.data),
            len(prepared.pixels),
        )
    )


def _kept_by_sha(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 -> ref of every sample already stored (for duplicates arriving later)."""
    skipped = set(manifest["duplicate_of"]) | {q["path"] for q in manifest["quarantine"]}
    return {sha: ref for ref, sha in manifest["files"].items() if ref not in skipped and sha}


def _warn_about_history(
    split: str, candidates: list[Candidate], known: dict[str, str], scan: _Scan
) -> None:
    if scan.changed:
        log.warning(
            "%s: %d file(s) changed since the last build (e.g. %s); the new content is added, the "
            "old stays in earlier shards until a rebuild (delete the split folder)",
            split,
            len(scan.changed),
            scan.changed[0],
        )
    removed = set(known) - {c.ref for c in candidates}
    if removed:
        log.warning(
            "%s: %d file(s) removed since the last build (e.g. %s); their samples stay until a "
            "rebuild (delete the split folder)",
            split,
            len(removed),
            min(removed),
        )


def _refuse_empty(split: str, src: Source, scan: _Scan, base: dict[str, Any] | None) -> None:
    if scan.entries or (base and base["samples"]):
        return
    example = f"; e.g. {scan.quarantine[0]['path']}: {scan.quarantine[0]['reason']}"
    raise EmptySourceError(
        f"data.source={src.name!r}: no valid image in split '{split}' "
        f"({len(scan.quarantine)} quarantined, {len(scan.duplicate_of)} duplicates, "
        f"{len(src.ignored.get(split, []))} files without an image suffix"
        f"{example if scan.quarantine else ''}); fix: point data.source at a folder of "
        "jpg/png/webp/gif/bmp/tiff images (with data.labels=folders: one folder per class)"
    )


# --- writing --------------------------------------------------------------------------------


def plan_shards(
    sizes: Sequence[int], *, max_count: int, max_bytes: int, min_shards: int
) -> list[int]:
    """Samples per shard: counts differ by at most one (so DDP ranks and loader workers get
    near-equal work), at least `min_shards` shards when there are that many samples, at most
    `max_count` samples and (as far as single samples allow) `max_bytes` bytes per shard."""
    n = len(sizes)
    if n == 0:
        return []
    prefix = [0, *accumulate(sizes)]
    k = min(n, max(min_shards, math.ceil(n / max_count), math.ceil(prefix[-1] / max_bytes)))
    while True:
        counts = [n // k + 1] * (n % k) + [n // k] * (k - n % k)
        bounds = [0, *accumulate(counts)]
        biggest = max(prefix[b] - prefix[a] for a, b in pairwise(bounds))
        if biggest <= max_bytes or k == n:
            return counts
        k = min(n, max(k + 1, math.ceil(k * biggest / max_bytes)))


def _write_shards(
    entries: list[_Entry],
    spool: IO[bytes],
    tmp: Path,
    start: int,
    base: dict[str, Any] | None,
    job: _Job,
) -> list[dict[str, Any]]:
    """Pass 2: spool -> tar shards with webdataset's ShardWriter, boundaries as planned."""
    sizes = [_tar_bytes(e.length) for e in entries]
    cfg = job.cfg
    counts = plan_shards(
        sizes,
        max_count=cfg.shard_max_count,
        max_bytes=cfg.shard_max_bytes,
        min_shards=cfg.min_shards,
    )
    if not counts:
        return []
    first_index = base["samples"] if base else 0
    boundaries = set(accumulate(counts[:-1]))
    pattern = str(tmp / SHARD_PATTERN)
    # maxcount/maxsize are never reached: next_stream() is called at the planned boundaries.
    limits = {"maxcount": max(counts) + 1, "maxsize": float("inf")}
    with ShardWriter(
        pattern, start_shard=start, verbose=0, encoder=False, **limits, **TAR_FIXED
    ) as writer:
        for i, entry in enumerate(_progress(entries, "writing shards")):
            if i in boundaries:
                writer.next_stream()
            spool.seek(entry.offset)
            data = spool.read(entry.length)
            writer.write(_sample(entry, data, first_index + i, job.src.classes))
    bounds = [0, *accumulate(counts)]
    return [
        _shard_record(tmp, start + j, entries[a:b], spool)
        for j, (a, b) in enumerate(pairwise(bounds))
    ]


def _tar_bytes(length: int) -> int:
    """A sample's size in a tar: 3 members (image, json, cls), each a header + padded data."""
    return TAR_BLOCK * (5 + math.ceil(length / TAR_BLOCK))


def _sample(entry: _Entry, data: bytes, index: int, classes: list[str]) -> dict[str, Any]:
    meta = {
        "index": index,
        "source": entry.ref,
        "sha256": entry.sha256,
        "width": entry.width,
        "height": entry.height,
        "label": None if entry.label is None else classes[entry.label],
    }
    sample = {
        "__key__": f"{index:08d}",
        entry.ext: data,
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }
    if entry.label is not None:
        sample["cls"] = str(entry.label).encode()
    return sample


def _shard_record(
    folder: Path, number: int, entries: list[_Entry], spool: IO[bytes]
) -> dict[str, Any]:
    name = SHARD_PATTERN % number
    path = folder / name
    record = {
        "file": name,
        "sha256": _file_sha256(path),
        "samples": len(entries),
        "bytes": path.stat().st_size,
    }
    decoded = _write_decoded(folder / (DECODED_PATTERN % number), entries, spool)
    return record if decoded is None else {**record, "decoded": decoded}


def _write_decoded(path: Path, entries: list[_Entry], spool: IO[bytes]) -> dict[str, Any] | None:
    """The shard's images as one uint8 [N, C, H, W] .npy, in the tar's order, when they are all
    small (they carry pixels) and of one size; None otherwise (the tar alone serves)."""
    sizes = {(e.height, e.width) for e in entries}
    if len(sizes) != 1 or not all(e.pixels_length for e in entries):
        return None
    ((height, width),) = sizes
    channels = entries[0].pixels_length // (height * width)  # 1 (L) or 3 (RGB), the split's mode
    images = np.empty((len(entries), channels, height, width), dtype=np.uint8)
    for k, entry in enumerate(entries):
        spool.seek(entry.offset + entry.length)
        pixels = np.frombuffer(spool.read(entry.pixels_length), dtype=np.uint8)
        images[k] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    np.save(path, images, allow_pickle=False)
    return {"file": path.name, "sha256": _file_sha256(path), "shape": list(images.shape)}


def shard_files(record: dict[str, Any]) -> list[str]:
    """A manifest shard record's files: the tar and, for small images, its decoded array."""
    return [record["file"], *([record["decoded"]["file"]] if "decoded" in record else [])]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- manifest and commit ----------------------------------------------------------------------


def _build_config(cfg: DataParams, src: Source, mode: str) -> dict[str, Any]:
    """Everything that shapes the stored bytes; a difference means a rebuild, not an append."""
    return {
        "format": FORMAT,
        "source": src.name,
        "classes": src.classes,
        "image_mode": mode,
        "max_pixels": cfg.max_pixels,
        "min_shards": cfg.min_shards,
        "shard_max_count": cfg.shard_max_count,
        "shard_max_bytes": cfg.shard_max_bytes,
    }


def _manifest(
    split: str,
    job: _Job,
    base: dict[str, Any] | None,
    scan: _Scan,
    new_shards: list[dict[str, Any]],
) -> dict[str, Any]:
    """The split's record; with `base` (an append) the old lists grow, nothing is dropped."""
    src = job.src
    shards = [*(base["shards"] if base else []), *new_shards]
    labels = Counter(src.classes[e.label] for e in scan.entries if e.label is not None)
    label_counts = Counter(base["label_counts"] if base else {}) + labels
    files = {**(base["files"] if base else {}), **(scan.files if src.appendable else {})}
    # A file looked at again (its content changed) replaces its old quarantine/duplicate entry.
    old_quarantine = [q for q in base["quarantine"] if q["path"] not in scan.files] if base else []
    quarantine = [*old_quarantine, *scan.quarantine]
    old_duplicates = base["duplicate_of"].items() if base else []
    duplicate_of = {ref: kept for ref, kept in old_duplicates if ref not in scan.files}
    duplicate_of.update(scan.duplicate_of)
    fingerprint = src.fingerprint or _content_fingerprint(files)
    manifest = {
        "format": FORMAT,
        "split": split,
        "source": src.name,
        "source_fingerprint": fingerprint,
        "build": job.build,
        "image_mode": job.mode,
        "samples": sum(s["samples"] for s in shards),
        "classes": src.classes,
        "label_counts": {name: label_counts[name] for name in src.classes if label_counts[name]},
        "shards": shards,
        "quarantined": len(quarantine),
        "quarantine": quarantine,
        "duplicates": len(duplicate_of),
        "duplicate_of": dict(sorted(duplicate_of.items())),
        "ignored": src.ignored.get(split, []),
        "files": dict(sorted(files.items())),
    }
    manifest["data_version"] = manifest_version(manifest)
    return manifest


def _content_fingerprint(files: dict[str, str]) -> str:
    lines = "".join(f"{ref}\t{sha}\n" for ref, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _commit(split_dir: Path, staged: _Staged) -> None:
    """Move the staged split into place. The manifest is what readers trust, so it moves last;
    a full rebuild swaps whole folders so no mix of old and new shards is ever listed."""
    tmp = staged.tmp
    _write_text(
        tmp / QUARANTINE, "".join(json.dumps(q) + "\n" for q in staged.manifest["quarantine"])
    )
    _write_text(tmp / MANIFEST, json.dumps(staged.manifest, indent=1) + "\n")
    if staged.replace_all:
        old = split_dir.with_name(f".old-{staged.split}-{uuid.uuid4().hex[:8]}")
        if split_dir.exists():
            os.replace(split_dir, old)
        os.replace(tmp, split_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    for name in [*staged.new_files, QUARANTINE, MANIFEST]:
        os.replace(tmp / name, split_dir / name)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def _previous_manifest(split_dir: Path) -> dict[str, Any] | None:
    """The committed manifest, with unlisted (orphaned) shards of a crashed commit removed."""
    try:
        manifest = json.loads((split_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable manifest (%s); rebuilding the split", split_dir, error)
        return None
    if manifest.get("format") != FORMAT:
        return None
    listed = {name for s in manifest["shards"] for name in shard_files(s)}
    for orphan in [*split_dir.glob("shard-*.tar"), *split_dir.glob("shard-*.npy")]:
        if orphan.name not in listed:
            orphan.unlink()
    return manifest


def _remove_stale_splits(root: Path, src: Source) -> list[str]:
    """Splits built from an earlier source that this one lacks (e.g. its old test split):
    left in place they would be read, and counted in the data version, as current data."""
    stale = [
        path
        for path in root.iterdir()
        if path.is_dir() and path.name not in src.splits and (path / MANIFEST).exists()
    ]
    for path in stale:
        log.warning("%s: not a split of %s; removing it", path, src.name)
        shutil.rmtree(path)
    return [path.name for path in stale]


def _remove_leftovers(root: Path) -> None:
    """Temp folders of an interrupted run (never visible to readers, but DVC would track them)."""
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_TEMP_PREFIXES):
            shutil.rmtree(path, ignore_errors=True)


# --- helpers --------------------------------------------------------------------------------


def _image_mode(cfg: DataParams, src: Source, previous: dict[str, dict[str, Any] | None]) -> str:
    """Explicit param > the source's own mode > the mode already built > a vote of the images."""
    if cfg.image_mode != "auto":
        return cfg.image_mode
    if src.image_mode:
        return src.image_mode
    for manifest in previous.values():
        if manifest and manifest["source"] == src.name:
            return str(manifest["image_mode"])
    return vote_mode(c for candidates in src.splits.values() for c in candidates)


@contextmanager
def _decoders(total: int) -> Iterator[Pool | None]:
    """A process pool for big sources (decoding photos is CPU-bound); none for small ones,
    where starting it costs more than it saves. forkserver: this process has imported torch,
    and forking a process with torch's threads is not safe."""
    processes = min(os.cpu_count() or 1, MAX_PROCESSES)
    if total < PARALLEL_MIN or processes < 2:
        yield None
        return
    with multiprocessing.get_context("forkserver").Pool(processes) as pool:
        yield pool


def _progress(items: Sequence[T], description: str) -> Iterable[T]:
    """A progress bar on a terminal; silent when stderr is a log file or a test."""
    return track(
        items,
        description=description,
        total=len(items),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def _summary(root: Path, src: Source, staged: list[_Staged], skipped: bool) -> ShardSummary:
    by_split = {item.split: item for item in staged}
    splits = {}
    for split in src.splits:
        manifest = json.loads((root / split / MANIFEST).read_text())
        item = by_split.get(split)
        splits[split] = {
            "samples": manifest["samples"],
            "new_samples": item.new_samples if item else 0,
            "shards": len(manifest["shards"]),
            "quarantined": manifest["quarantined"],
            "duplicates": manifest["duplicates"],
        }
    return ShardSummary(
        splits=splits,
        data_version=data_version(root),
        skipped=skipped,
        shards_dir=str(root),
        new_quarantine={item.split: item.new_quarantine for item in staged},
    )
