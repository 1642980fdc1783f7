"""The shard stage: bad input, normalisation, determinism, atomicity, incrementality."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_stage_helpers import (
    BOMB_LIMIT,
    CORPUS_DUPLICATES,
    CORPUS_GOOD,
    CORPUS_QUARANTINED,
    file_hashes,
    indexed_image,
    stored_pixels,
    stored_samples,
    write_indexed,
)
from PIL import Image

import pipeline.shard as shard_module
from pipeline.dataset import IMAGE_KEYS, data_version, read_manifest
from pipeline.shard import EmptySourceError, plan_shards, shard
from pipeline.sources import DECODED_MAX_PIXELS, SourceError


def test_bad_inputs_are_quarantined_counted_and_reported(corpus, make_params):
    summary = shard(make_params(max_pixels=BOMB_LIMIT), str(corpus))

    train = summary.splits["train"]
    assert train["samples"] == CORPUS_GOOD
    assert train["quarantined"] == len(CORPUS_QUARANTINED)
    assert train["duplicates"] == CORPUS_DUPLICATES
    assert not summary.skipped
    lines = (Path(summary.shards_dir) / "train/quarantine.jsonl").read_text().splitlines()
    reasons = {entry["path"]: entry["reason"] for entry in map(json.loads, lines)}
    assert set(reasons) == set(CORPUS_QUARANTINED)
    for path, word in CORPUS_QUARANTINED.items():
        assert word in reasons[path], (path, reasons[path])
    text = summary.render()
    assert all(path in text for path in CORPUS_QUARANTINED)
    manifest = read_manifest(summary.shards_dir, "train")
    assert manifest["duplicate_of"] == {
        "cat/rgb_copy.jpg": "cat/rgb.jpg",
        "dog/rgb_copy.png": "dog/rgb.png",
    }
    assert manifest["ignored"] == ["cat/.DS_Store", "dog/linked/", "dog/notes.txt"]
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["image_mode"] == "RGB"  # 9 colour images outvote 2 grayscale ones


def test_images_are_normalised_to_rgb(corpus, make_params):
    summary = shard(make_params(max_pixels=BOMB_LIMIT), str(corpus))
    stored = stored_samples(Path(summary.shards_dir) / "train")

    rotated = stored_pixels(stored["dog/exif.jpg"])
    assert rotated.shape == (40, 20, 3)  # EXIF orientation 6 applied: portrait now
    assert rotated[:15].mean() > 200 and rotated[25:].mean() < 50  # top white, bottom black
    red = stored_pixels(stored["cat/cmyk.jpg"])[8, 8].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    alpha = stored_pixels(stored["cat/alpha.png"])
    assert alpha.shape == (16, 16, 3)
    assert alpha[:, :8].min() == 255  # transparent composited on white
    assert tuple(alpha[0, 12]) == (0, 200, 0)
    assert tuple(stored_pixels(stored["cat/palette.png"])[0, 0]) == (0, 0, 255)
    assert tuple(stored_pixels(stored["cat/deep/nested/gray16.png"])[0, 0]) == (128, 128, 128)
    assert tuple(stored_pixels(stored["dog/gray.png"])[0, 0]) == (77, 77, 77)
    assert "jpg" in stored["cat/rgb.jpg"]  # already RGB: original bytes kept
    assert (corpus / "cat/rgb.jpg").read_bytes() == stored["cat/rgb.jpg"]["jpg"]
    assert "png" in stored["dog/plain.bmp"] and "png" in stored["cat/cmyk.jpg"]
    meta = json.loads(stored["dog/exif.jpg"]["json"])
    assert (meta["width"], meta["height"], meta["label"]) == (20, 40, "dog")
    assert stored["dog/exif.jpg"]["cls"] == b"1"


def test_grayscale_mode_keeps_one_channel(tmp_path, make_params):
    folder = write_indexed(tmp_path / "gray", range(20))
    summary = shard(make_params(), str(folder))
    assert read_manifest(summary.shards_dir, "train")["image_mode"] == "L"
    forced = shard(make_params(shards="rgb", image_mode="RGB"), str(folder))
    sample = next(iter(stored_samples(Path(forced.shards_dir) / "train").values()))
    assert stored_pixels(sample).shape == (8, 8, 3)


def _shard_images(tar_path: Path) -> list[np.ndarray]:
    """A shard's images in tar order, HWC, read with plain tarfile and PIL."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.name.rpartition(".")[2] in IMAGE_KEYS]
        return [
            stored_pixels({m.name.rpartition(".")[2]: tar.extractfile(m).read()}) for m in members
        ]


@pytest.mark.parametrize(("min_shards", "with_arrays"), [(12, 11), (6, 1)])
def test_small_images_of_one_size_are_also_stored_decoded(
    corpus, make_params, min_shards, with_arrays
):
    """A shard gets a uint8 [N, C, H, W] array beside it, equal to decoding its tar's images
    (tarfile and PIL here), exactly when they share one size and are small: with one image
    per shard, all but the large one; with two, only the pair of 16-px images."""
    Image.new("RGB", (100, 100), (9, 9, 9)).save(corpus / "dog/zlarge.png")  # 10,000 pixels
    summary = shard(make_params(max_pixels=BOMB_LIMIT, min_shards=min_shards), str(corpus))
    split = Path(summary.shards_dir) / "train"
    stored = []
    for record in read_manifest(summary.shards_dir, "train")["shards"]:
        images = _shard_images(split / record["file"])
        small = images[0].shape[0] * images[0].shape[1] <= DECODED_MAX_PIXELS
        assert ("decoded" in record) == (small and len({i.shape for i in images}) == 1)
        if "decoded" in record:
            path = split / record["decoded"]["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == record["decoded"]["sha256"]
            array = np.load(path, allow_pickle=False)
            np.testing.assert_array_equal(array, np.stack([i.transpose(2, 0, 1) for i in images]))
            assert record["decoded"]["shape"] == list(array.shape)
            stored.append(path.name)
    assert len(stored) == with_arrays
    assert sorted(p.name for p in split.glob("*.npy")) == sorted(stored)


def test_a_source_without_valid_images_fails_with_one_clear_line(tmp_path, make_params):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("nope")
    with pytest.raises(EmptySourceError, match=r"no valid image.*fix:") as error:
        shard(make_params(), str(folder))
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    with pytest.raises(SourceError, match="neither"):
        shard(make_params(), str(tmp_path / "missing"))


def test_same_input_gives_byte_identical_shards(corpus, make_params):
    first = shard(make_params(shards="one", max_pixels=BOMB_LIMIT), str(corpus))
    second = shard(make_params(shards="two", max_pixels=BOMB_LIMIT), str(corpus))
    hashes = file_hashes(Path(first.shards_dir))
    assert hashes == file_hashes(Path(second.shards_dir))
    assert first.data_version == second.data_version
    assert len([name for name in hashes if name.endswith(".tar")]) == 8


def test_an_interrupted_run_leaves_the_previous_version_intact(tmp_path, make_params, monkeypatch):
    folder = write_indexed(tmp_path / "src", range(40))
    params = make_params()
    shard(params, str(folder))
    root = Path(params.data.shards_dir)
    before = file_hashes(root)
    write_indexed(folder, range(40, 60))
    original = shard_module.ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full (simulated)")
        return original(self, sample)

    monkeypatch.setattr(shard_module.ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        shard(params, str(folder))  # an append
    assert file_hashes(root) == before
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        shard(make_params(min_shards=3), str(folder))  # a full rebuild
    assert file_hashes(root) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_new_files_go_to_new_shards_and_old_shards_stay(tmp_path, make_params):
    folder = write_indexed(tmp_path / "src", range(40))
    params = make_params()
    first = shard(params, str(folder))
    root = Path(params.data.shards_dir)
    old_manifest = read_manifest(root, "train")
    old_files = file_hashes(root / "train")

    write_indexed(folder, range(40, 52))
    indexed_image(3).save(folder / "c1" / "copy-of-3.png")  # same bytes as c1/img00003.png
    (folder / "c0" / "broken.png").write_bytes(b"\x89PNG broken")
    second = shard(params, str(folder))

    manifest = read_manifest(root, "train")
    assert second.splits["train"]["new_samples"] == 12
    assert manifest["samples"] == 52
    assert (manifest["duplicates"], manifest["quarantined"]) == (1, 1)
    assert manifest["shards"][: len(old_manifest["shards"])] == old_manifest["shards"]
    new_names = [s["file"] for s in manifest["shards"][len(old_manifest["shards"]) :]]
    assert new_names[0] == "shard-000008.tar" and len(new_names) == 8
    for name, digest in old_files.items():
        if name.endswith(".tar"):
            assert file_hashes(root / "train")[name] == digest
    assert second.data_version != first.data_version
    assert manifest["label_counts"] == {"c0": 26, "c1": 26}

    (folder / "c0" / "broken.png").unlink()
    indexed_image(999).save(folder / "c0" / "broken.png")  # fixed: replaces its quarantine entry
    fourth = shard(params, str(folder))
    assert fourth.splits["train"]["quarantined"] == 0 and fourth.splits["train"]["samples"] == 53

    before = {p.name: p.stat().st_mtime_ns for p in (root / "train").iterdir()}
    third = shard(params, str(folder))
    assert third.skipped and third.data_version == fourth.data_version
    assert third.splits["train"]["new_samples"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (root / "train").iterdir()} == before


def test_changing_a_layout_param_rebuilds_the_split(tmp_path, make_params):
    folder = write_indexed(tmp_path / "src", range(30))
    shard(make_params(), str(folder))
    summary = shard(make_params(min_shards=3), str(folder))
    manifest = read_manifest(summary.shards_dir, "train")
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 10]
    assert summary.splits["train"]["new_samples"] == 30


def test_static_source_rerun_is_a_no_op(make_params):
    params = make_params(source="digits", train_limit=300, test_limit=100)
    first = shard(params)
    root = Path(params.data.shards_dir)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = shard(params)
    assert again.skipped and again.data_version == first.data_version == data_version(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert first.splits["train"]["samples"] == 300 and first.splits["test"]["samples"] == 100
    counts = read_manifest(root, "train")["label_counts"]
    assert set(counts.values()) == {30}


def test_train_and_test_folders_become_splits_with_shared_classes(tmp_path, make_params):
    write_indexed(tmp_path / "src/train", range(16))
    write_indexed(tmp_path / "src/test", range(100, 106), classes=3)
    summary = shard(make_params(), str(tmp_path / "src"))
    assert set(summary.splits) == {"train", "test"}
    assert read_manifest(summary.shards_dir, "test")["classes"] == ["c0", "c1", "c2"]
    assert read_manifest(summary.shards_dir, "train")["label_counts"] == {"c0": 8, "c1": 8}


def test_parallel_and_in_process_decoding_agree(tmp_path, make_params, monkeypatch):
    folder = write_indexed(tmp_path / "src", range(64))
    serial = shard(make_params(shards="serial"), str(folder))
    monkeypatch.setattr(shard_module, "PARALLEL_MIN", 1)
    monkeypatch.setattr(shard_module, "WINDOW", 10)
    parallel = shard(make_params(shards="parallel"), str(folder))
    assert file_hashes(Path(serial.shards_dir)) == file_hashes(Path(parallel.shards_dir))


@pytest.mark.parametrize(
    ("n", "limits", "expected"),
    [
        (20, {"max_count": 100, "max_bytes": 10**9, "min_shards": 8}, [3, 3, 3, 3, 2, 2, 2, 2]),
        (5, {"max_count": 100, "max_bytes": 10**9, "min_shards": 8}, [1] * 5),
        (30, {"max_count": 4, "max_bytes": 10**9, "min_shards": 1}, [4] * 6 + [3] * 2),
        (12, {"max_count": 100, "max_bytes": 250, "min_shards": 1}, [2] * 6),
        (0, {"max_count": 4, "max_bytes": 10**9, "min_shards": 8}, []),
    ],
)
def test_plan_shards_is_near_equal_and_within_limits(n, limits, expected):
    sizes = [100] * n
    counts = plan_shards(sizes, **limits)
    assert counts == expected
    assert sum(counts) == n and (not counts or max(counts) - min(counts) <= 1)


def test_label_subset_of_an_unbalanced_list_is_round_robin():
    from pipeline.sources import _stratified_pick

    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    picked = _stratified_pick(labels, 9)
    assert np.bincount(labels[picked]).tolist() == [4, 2, 3]
    assert picked.tolist() == sorted(picked.tolist())


def test_leftover_temp_folders_are_removed(tmp_path, make_params):
    folder = write_indexed(tmp_path / "src", range(10))
    params = make_params()
    root = Path(params.data.shards_dir)
    (root / ".tmp-train-dead").mkdir(parents=True)
    (root / ".tmp-train-dead" / "shard-000000.tar").write_bytes(b"partial")
    shard(params, str(folder))
    orphan = root / "train" / "shard-000099.tar"
    shutil.copyfile(root / "train" / "shard-000000.tar", orphan)
    shard(params, str(folder))
    assert not (root / ".tmp-train-dead").exists() and not orphan.exists()


def test_switching_source_removes_splits_the_new_source_lacks(tmp_path, make_params):
    params = make_params(source="digits", train_limit=100, test_limit=40)
    shard(params)
    folder = write_indexed(tmp_path / "src", range(12))
    summary = shard(params, str(folder))
    root = Path(params.data.shards_dir)
    assert sorted(p.name for p in root.iterdir()) == ["train"]
    assert set(summary.splits) == {"train"} and summary.splits["train"]["samples"] == 12
