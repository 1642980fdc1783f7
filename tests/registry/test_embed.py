"""`embed`: one row per valid image, the encoder's dimension, bad images quarantined."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from registry_helpers import (
    BAD_IMAGES,
    FEATURES,
    FIRST,
    GOOD_IMAGES,
    Store,
    read_rows,
    write_images,
)

from pipeline.config import Params
from pipeline.dataset import read_manifest
from pipeline.embed import embed, pick_device
from pipeline.encoder import load_encoder
from pipeline.promote import promote


def test_folder_rows_match_valid_images_and_bad_ones_are_quarantined(
    make_params: Callable[..., Params], store: Store, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "images")
    out = tmp_path / "out/emb.parquet"

    summary = embed(make_params(), str(store.encoder_dir), images, out, device="cpu", batch_size=3)

    rows = read_rows(out)
    assert sorted(row["key"] for row in rows) == sorted(GOOD_IMAGES)
    assert {len(row["embedding"]) for row in rows} == {FEATURES} and summary.dim == FEATURES
    quarantined = [json.loads(line) for line in summary.quarantine_file.read_text().splitlines()]
    assert {q["path"] for q in quarantined} == set(BAD_IMAGES)
    for entry in quarantined:
        assert BAD_IMAGES[entry["path"]] in entry["reason"]
    assert (summary.rows, summary.quarantined) == (len(GOOD_IMAGES), len(BAD_IMAGES))
    assert not list(out.parent.glob("*.partial"))


def test_any_layout_gives_a_row_per_valid_file_copies_included(
    make_params: Callable[..., Params], store: Store, tmp_path: Path
) -> None:
    """Images at the top level and at any depth, in any common format; a byte-identical copy
    is a file of its own with its own row (and the same embedding)."""
    images = write_images(tmp_path / "images")
    Image.new("L", (8, 8), 33).save(images / "top.png")
    Image.new("RGB", (9, 9), (1, 2, 3)).save(images / "top.gif")
    shutil.copyfile(images / "a/gray.png", images / "b/nested/gray_copy.png")
    out = tmp_path / "emb.parquet"

    summary = embed(make_params(), str(store.encoder_dir), images, out, device="cpu")

    rows = {row["key"]: row["embedding"] for row in read_rows(out)}
    assert sorted(rows) == sorted([*GOOD_IMAGES, "top.png", "top.gif", "b/nested/gray_copy.png"])
    assert rows["b/nested/gray_copy.png"] == rows["a/gray.png"]
    assert summary.quarantined == len(BAD_IMAGES)


def test_embedding_is_the_encoders_output_for_that_image(
    make_params: Callable[..., Params], store: Store, tmp_path: Path
) -> None:
    """Not just the right shape: the row holds what the encoder computes for the image."""
    images = write_images(tmp_path / "images")
    out = tmp_path / "emb.parquet"
    embed(make_params(), str(store.encoder_dir), images, out, device="cpu")
    row = next(row for row in read_rows(out) if row["key"] == "a/gray.png")
    encoder, _ = load_encoder(store.encoder_dir)
    with torch.inference_mode():
        expected = encoder(torch.full((1, 1, 8, 8), 90 / 255))[0]
    torch.testing.assert_close(torch.tensor(row["embedding"]), expected, atol=1e-5, rtol=1e-4)


def test_shards_from_the_production_alias(
    make_params: Callable[..., Params],
    store: Store,
    digits_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = make_params()
    promote(params, store.model_uri, FIRST, {"eval_version": "d1"})
    out = tmp_path / "digits.parquet"
    model = f"models:/{params.registry.model_name}@production"
    # Another store is current (as in a fresh process): embed must resolve through params.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it; a fresh one has not

    summary = embed(params, model, digits_shards, out, device="cpu")

    rows = read_rows(out)
    sizes = {split: read_manifest(digits_shards, split)["samples"] for split in ("train", "test")}
    assert len(rows) == sum(sizes.values()) == summary.rows
    assert {split: sum(r["split"] == split for r in rows) for split in sizes} == sizes
    assert len({(r["split"], r["key"]) for r in rows}) == len(rows)
    assert all(r["source"].startswith("sklearn-digits#") for r in rows)
    assert not summary.quarantine_file.exists()
    assert not (tmp_path / "elsewhere.db").exists()
    assert pq.read_schema(out).metadata[b"model"] == model.encode()


def test_missing_gpu_is_an_error_not_a_silent_cpu_run() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
