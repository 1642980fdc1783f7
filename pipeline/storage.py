"""Paths that may be local folders or object-store URLs (s3://bucket/prefix).

One place decides what is remote, so every stage resolves `data.shards_dir`,
`train.storage_path` and `tune.storage_path` the same way: a local path becomes absolute (Ray
workers and Tune trials run in other folders), a URL is kept as given. S3 goes through fsspec's
s3fs, which reads the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), as boto3, pyarrow and DVC do.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem

LOCAL_SCHEMES = ("", "file")


def is_remote(path: str | Path) -> bool:
    """True for an fsspec URL other than file:// (s3://, gs://, memory://...)."""
    text = str(path)
    return "://" in text and text.split("://", 1)[0] not in LOCAL_SCHEMES


def resolved(path: str | Path) -> str:
    """A URL as given (without a trailing slash), a local path made absolute."""
    return str(path).rstrip("/") if is_remote(path) else str(Path(path).resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URL or a local path."""
    return "/".join([str(base).rstrip("/"), *parts])


def filesystem(path: str | Path) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system and the path inside it."""
    return fsspec.core.url_to_fs(str(path))


def read_text(path: str | Path) -> str | None:
    """A small file's text, or None when it does not exist."""
    fs, inner = filesystem(path)
    try:
        with fs.open(inner, "rt", encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def write_text(path: str | Path, text: str) -> None:
    """Write a small file whole (an S3 object appears only when its upload completes)."""
    fs, inner = filesystem(path)
    if not is_remote(path):
        fs.makedirs(fs._parent(inner), exist_ok=True)
    with fs.open(inner, "wt", encoding="utf-8") as stream:
        stream.write(text)
