"""Helpers for the data-stage tests: generated corpora, indexed images, stand-in transforms.

A plain module (not conftest) so tests and spawned worker processes can import it by name."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CORPUS_GOOD = 11  # decodable, distinct images in class folders
CORPUS_DUPLICATES = 2
CORPUS_QUARANTINED = {  # path -> a word its reason must contain
    "cat/truncated.jpg": "truncated",
    "cat/empty.png": "empty",
    "dog/text.jpg": "not an image",
    "dog/bomb.png": "bomb",
    "dog/broken.png": "unreadable",
    "stray.png": "class folder",
}
BOMB_LIMIT = 1_000_000  # data.max_pixels for the corpus; bomb.png has 2,000,000 pixels


def _save(image: Image.Image, path: Path, fmt: str, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **options)
    return path


def _exif_rotated(path: Path) -> None:
    """Stored 40 wide x 20 high, left half white; orientation 6 means: display rotated 90° CW,
    so the displayed image is 20 wide x 40 high with its top half white."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    _save(image, path, "JPEG", quality=95, exif=exif.tobytes())


def _alpha(path: Path) -> None:
    """Left half fully transparent red (shows as white), right half opaque green."""
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    image.paste((0, 200, 0, 255), (8, 0, 16, 16))
    _save(image, path, "PNG")


def write_corpus(root: Path) -> Path:
    """Every kind of good and bad input the stage must handle, in class folders cat/ and dog/."""
    _save(Image.new("RGB", (24, 16), (200, 30, 30)), root / "cat/rgb.jpg", "JPEG", quality=90)
    _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), root / "cat/cmyk.jpg", "JPEG")
    _save(Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"), root / "cat/palette.png", "PNG")
    _alpha(root / "cat/alpha.png")
    wide = np.full((12, 12), 128 * 257, dtype=np.uint16)
    _save(Image.fromarray(wide), root / "cat/deep/nested/gray16.png", "PNG")
    _save(Image.new("L", (10, 10), 77), root / "dog/gray.png", "PNG")
    _exif_rotated(root / "dog/exif.jpg")
    webp = Image.new("RGB", (9, 9), (10, 120, 10))
    _save(webp, root / "dog/lossless.webp", "WEBP", lossless=True)
    _save(Image.new("RGB", (7, 7), (90, 90, 10)), root / "dog/plain.bmp", "BMP")
    _save(Image.new("RGB", (6, 6), (5, 5, 150)), root / "dog/scan.tiff", "TIFF")
    _save(Image.new("RGB", (5, 5), (1, 2, 3)), root / "dog/rgb.png", "PNG")
    shutil.copyfile(root / "dog/rgb.png", root / "dog/rgb_copy.png")  # sorts after the original
    shutil.copyfile(root / "cat/rgb.jpg", root / "cat/rgb_copy.jpg")
    full = (root / "cat/rgb.jpg").read_bytes()
    (root / "cat/truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/text.jpg").write_text("this is not a JPEG\n")
    _save(Image.new("L", (2000, 1000), 0), root / "dog/bomb.png", "PNG")
    (root / "dog/broken.png").symlink_to(root / "dog/missing-target.png")
    _save(Image.new("RGB", (4, 4), (3, 3, 3)), root / "stray.png", "PNG")
    (root / "dog/notes.txt").write_text("not an image suffix: ignored, and listed\n")
    (root / "cat/.DS_Store").write_bytes(b"\0\1")
    (root / "dog/linked").symlink_to(root / "cat", target_is_directory=True)  # not followed
    return root


def indexed_image(index: int) -> Image.Image:
    """An 8x8 grayscale image whose first two pixels spell its index (see `decode_index`)."""
    pixels = np.full((8, 8), (index * 7) % 256, dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = divmod(index, 256)
    return Image.fromarray(pixels)


def decode_index(batch: torch.Tensor) -> list[int]:
    """Indices of a [B, 1, H, W] batch of `indexed_image`s (as uint8 or float 0-255)."""
    pixels = batch[:, 0, 0, :2].round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def write_indexed(root: Path, indices: range | list[int], classes: int = 2) -> Path:
    for i in indices:
        _save(indexed_image(i), root / f"c{i % classes}" / f"img{i:05d}.png", "PNG")
    return root


def identity_pair(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for TwoCropsTransform: both views are the image, as float."""
    return image.float(), image.float()


def as_float(image: torch.Tensor) -> torch.Tensor:
    return image.float()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stored_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """Source ref -> {member extension: bytes} for every sample in a split's shards, read with
    plain tarfile (independent of the reader under test)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split_dir.glob("shard-*.tar")):
        grouped: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                extracted = tar.extractfile(member)
                assert extracted is not None
                grouped.setdefault(key, {})[ext] = extracted.read()
        for members in grouped.values():
            samples[json.loads(members["json"])["source"]] = members
    return samples


def stored_pixels(members: dict[str, bytes]) -> np.ndarray:
    image_ext = next(ext for ext in ("png", "jpg", "webp") if ext in members)
    return np.asarray(Image.open(io.BytesIO(members[image_ext])))


def file_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (hidden temp folders included)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def top_left_crop(image: torch.Tensor) -> torch.Tensor:
    """A stand-in eval transform that makes differently sized images stackable."""
    return image[:, :4, :4].float()


def ddp_rank_main(rank: int, world_size: int, urls: list[str], out_dir: str, batch: int) -> None:
    """One simulated DDP rank (torch.multiprocessing.spawn target): gloo process group, stale
    RANK/WORLD_SIZE in the environment on purpose (torch.distributed must win), 2 loader
    workers; writes the indices of the batches it saw to rank<N>.json."""
    from pipeline.dataset import training_loader

    os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        batches = training_loader(
            urls,
            transform=identity_pair,
            batch_size=batch,
            shuffle_buffer=8,
            seed=0,
            epoch=0,
            loader_workers=2,
        )
        seen = [decode_index(view_q) for view_q, _ in batches]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()
