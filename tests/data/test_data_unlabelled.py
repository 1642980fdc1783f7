"""Unlabelled folders, the main path: images arrive in date or camera folders at any depth and
folder names are never taken for classes."""

from __future__ import annotations

import json
from pathlib import Path

from data_stage_helpers import (
    BOMB_LIMIT,
    CORPUS_DUPLICATES,
    CORPUS_GOOD,
    CORPUS_QUARANTINED,
    _save,
    write_corpus,
)
from PIL import Image

from pipeline.dataset import read_manifest
from pipeline.shard import shard
from pipeline.sources import HOLDOUT, image_folder

# write_corpus's broken files, less the one that only a labelled layout refuses
BROKEN = {path: word for path, word in CORPUS_QUARANTINED.items() if word != "class folder"}


def _mixed_depth_corpus(root: Path) -> Path:
    """write_corpus (two folders, bad files, copies) plus images at the top level and two
    levels down, in the formats write_corpus lacks (GIF, PPM, JFIF)."""
    write_corpus(root / "2026-11-30" / "cam1")
    _save(Image.new("RGB", (12, 12), (40, 80, 160)), root / "top.gif", "GIF")
    _save(Image.new("RGB", (8, 6), (9, 99, 199)), root / "a/b/deep.ppm", "PPM")
    _save(Image.new("L", (5, 9), 200), root / "a/photo.jfif", "JPEG")
    (root / "a/b/zero.gif").write_bytes(b"")
    return root


EXTRA_GOOD = 1 + 3  # write_corpus's stray.png is valid here, plus the three above


def test_an_unlabelled_folder_keeps_every_valid_image_at_any_depth(tmp_path, make_params):
    root = _mixed_depth_corpus(tmp_path / "incoming")
    params = make_params(labels="none", max_pixels=BOMB_LIMIT)

    summary = shard(params, str(root))

    train = summary.splits["train"]
    assert train["samples"] == CORPUS_GOOD + EXTRA_GOOD
    assert train["duplicates"] == CORPUS_DUPLICATES
    manifest = read_manifest(summary.shards_dir, "train")
    assert manifest["classes"] == [] and manifest["label_counts"] == {}
    reasons = {q["path"]: q["reason"] for q in manifest["quarantine"]}
    prefix = "2026-11-30/cam1/"
    expected = {prefix + path: word for path, word in BROKEN.items()} | {"a/b/zero.gif": "empty"}
    assert set(reasons) == set(expected)
    for path, word in expected.items():
        assert word in reasons[path], (path, reasons[path])
    listed = {
        json.loads(line)["path"]
        for line in (Path(summary.shards_dir) / "train/quarantine.jsonl").open()
    }
    assert listed == set(expected)


def test_labels_folders_is_the_class_per_folder_layout(tmp_path, make_params):
    root = write_corpus(tmp_path / "corpus")
    summary = shard(make_params(labels="folders", max_pixels=BOMB_LIMIT), str(root))
    manifest = read_manifest(summary.shards_dir, "train")
    assert manifest["classes"] == ["cat", "dog"]
    assert {q["path"]: q["reason"] for q in manifest["quarantine"]}["stray.png"].startswith(
        "not in a class folder"
    )


def test_the_holdout_is_stable_as_new_drops_arrive(tmp_path, make_params):
    root = tmp_path / "incoming"
    day1 = [root / "d1" / f"{i:03d}.png" for i in range(200)]
    day2 = [root / "d2" / f"{i:03d}.png" for i in range(200)]
    for i, path in enumerate(day1 + day2):
        _save(Image.new("L", (6, 6), i % 251), path, "PNG")
    first = image_folder(root, "incoming", holdout_percent=10)
    for path in day2:
        path.unlink()
    before = image_folder(root, "incoming", holdout_percent=10)

    held_now = {c.ref for c in first.splits[HOLDOUT]}
    held_before = {c.ref for c in before.splits[HOLDOUT]}
    assert held_before == {ref for ref in held_now if ref.startswith("d1/")}
    assert 20 <= len(held_now) <= 60  # ~10% of 400
    assert not held_now & {c.ref for c in first.splits["train"]}
    assert len(held_now) + len(first.splits["train"]) == 400
