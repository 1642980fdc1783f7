"""Reading the data stage's inputs: Fashion-MNIST, scikit-learn digits, or a folder of images.

Every source becomes the same thing, a `Source` of per-split `Candidate`s (a stable reference, an
optional label, and a way to read the encoded bytes), so the shard stage has one code path for
validation, de-duplication and writing. Untrusted image bytes are decoded here, once, by
`prepare`, which either returns what to store or raises `BadImage` with a one-line reason.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.config import DataParams

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    | {".pbm", ".pgm", ".ppm", ".pnm", ".tga"}
)
SPLIT_FOLDERS = ("train", "val", "test")
HOLDOUT = "holdout"  # a folder source's held-out split (label-free metrics, drift)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Formats whose original bytes are kept as-is when no normalisation is needed (compact, and what
# the reader decodes); anything else is re-encoded as PNG.
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PNG_LEVEL = 6
# Images this small are also kept decoded, one uint8 array per shard beside it: reading those
# costs nothing, decoding a 28-px PNG ~160 us per image per epoch (pipeline/dataset.py).
DECODED_MAX_PIXELS = 96 * 96


class SourceError(ValueError):
    """A source that cannot give a dataset; the message names the source and the fix."""


class BadImage(Exception):
    """An input that is not a usable image; `str()` is the reason written to quarantine.jsonl."""


@dataclass(frozen=True)
class Candidate:
    """One input: `ref` is its stable id and sort key (relative path, or `file#index`)."""

    ref: str
    label: int | None
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Source:
    """What a source offers. `fingerprint` is set when it is cheap and complete (static sets);
    folders leave it empty and the shard stage fingerprints their content."""

    name: str
    splits: dict[str, list[Candidate]]
    classes: list[str]
    appendable: bool  # folders grow; static sets are rebuilt when they change
    fingerprint: str = ""
    image_mode: str = ""  # "" = decide from the images (data.image_mode=auto)
    ignored: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A validated, normalised image ready to store."""

    data: bytes
    ext: str
    width: int
    height: int
    pixels: bytes = b""  # a small image's decoded uint8 pixels (H, W, C order), else empty


@dataclass(frozen=True)
class Examined:
    """A candidate after its one read: content hash, and what to store or why not."""

    sha256: str  # "" when the file could not be read
    unchanged: bool  # same content as in the last build, so not decoded again
    prepared: Prepared | None = None
    problem: str | None = None


def open_source(spec: str, params: DataParams) -> Source:
    """Resolve `data.source` (or a CLI override) to a `Source`; a folder is unlabelled unless
    `data.labels` is `folders`."""
    if spec == "fashion-mnist":
        return fashion_mnist(Path(params.fashion_mnist_dir), _limits(params))
    if spec == "digits":
        return digits(_limits(params))
    folder = Path(spec)
    if not folder.is_dir():
        raise SourceError(
            f"data.source={spec!r} is neither 'fashion-mnist', 'digits' nor an existing folder; "
            "fix data.source (or pass a folder of images)"
        )
    if params.train_limit or params.test_limit:
        log.warning("data.train_limit/test_limit apply to built-in sets only; ignored for %s", spec)
    return image_folder(
        folder, name=spec, labels=params.labels, holdout_percent=params.holdout_percent
    )


def _limits(params: DataParams) -> dict[str, int]:
    return {"train": params.train_limit, "test": params.test_limit}


# --- static array sources -------------------------------------------------------------------


def fashion_mnist(root: Path, limits: dict[str, int]) -> Source:
    """The IDX files as shipped; `limits` pick a class-balanced, deterministic subset."""
    files = {"train": "train", "test": "t10k"}
    splits: dict[str, list[Candidate]] = {}
    digest = hashlib.sha256(b"fashion-mnist/1")
    for split, stem in files.items():
        images_path = root / f"{stem}-images-idx3-ubyte.gz"
        labels_path = root / f"{stem}-labels-idx1-ubyte.gz"
        raw_images, raw_labels = _read_idx_file(images_path), _read_idx_file(labels_path)
        digest.update(hashlib.sha256(raw_images + raw_labels).digest())
        images = _parse_idx(raw_images, images_path, magic=2051)
        labels = _parse_idx(raw_labels, labels_path, magic=2049)
        if len(images) != len(labels):
            raise SourceError(f"{images_path}: {len(images)} images but {len(labels)} labels")
        picked = _stratified_pick(labels, limits[split])
        splits[split] = _array_candidates(images, labels, images_path.name, picked)
    digest.update(repr(sorted(limits.items())).encode())
    return Source(
        name="fashion-mnist",
        splits=splits,
        classes=list(FASHION_MNIST_CLASSES),
        appendable=False,
        fingerprint=digest.hexdigest(),
        image_mode="L",
    )


def digits(limits: dict[str, int], seed: int = 0) -> Source:
    """scikit-learn's bundled 8x8 digits, 0-16 scaled to 0-255, stratified 80/20 split.

    Read from the CSV that scikit-learn ships (what load_digits reads) without importing
    scikit-learn: its import pulls in scipy and costs seconds per stage run."""
    path = _sklearn_digits_csv()
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = np.rint(table[:, :-1] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = images.reshape(-1, 8, 8)
    labels = table[:, -1].astype(np.int64)
    splits = {}
    for split, members in _stratified_split(labels, test_fraction=0.2, seed=seed).items():
        picked = members[_stratified_pick(labels[members], limits[split])]
        splits[split] = _array_candidates(images, labels, "sklearn-digits", picked)
    digest = hashlib.sha256(b"digits/1" + images.tobytes() + labels.tobytes())
    digest.update(repr((seed, sorted(limits.items()))).encode())
    return Source(
        name="digits",
        splits=splits,
        classes=[str(d) for d in range(10)],
        appendable=False,
        fingerprint=digest.hexdigest(),
        image_mode="L",
    )


def _sklearn_digits_csv() -> Path:
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location, "datasets", "data", "digits.csv.gz")
        if path.exists():
            return path
    raise SourceError(
        "digits: scikit-learn's digits.csv.gz not found; fix: pip install scikit-learn"
    )


def _stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation; the first round(fraction x class size) go to test."""
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        test.append(rng.permutation(members)[: round(test_fraction * len(members))])
    test_set = np.sort(np.concatenate(test))
    return {"train": np.setdiff1d(np.arange(len(labels)), test_set), "test": test_set}


def _read_idx_file(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise SourceError(
            f"fashion-mnist: {path} is missing; fix: apt-get install -y dataset-fashion-mnist "
            "or set data.fashion_mnist_dir"
        ) from None


def _parse_idx(raw: bytes, path: Path, *, magic: int) -> np.ndarray:
    """IDX: big-endian magic, dimension sizes, then uint8 data."""
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise SourceError(f"{path}: not an IDX file (magic {found}, expected {magic})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _array_candidates(
    images: np.ndarray, labels: np.ndarray, stem: str, picked: np.ndarray
) -> list[Candidate]:
    """Refs carry the index in the original file, zero-padded so they sort in file order."""
    width = len(str(len(images)))
    return [
        Candidate(f"{stem}#{i:0{width}d}", int(labels[i]), partial(encode_png, images[i]))
        for i in picked.tolist()
    ]


def _stratified_pick(labels: np.ndarray, limit: int) -> np.ndarray:
    """Sorted positions of the first `limit` items taken round-robin over classes in file order.

    The first N of a file is not balanced (Fashion-MNIST's first 2000 train images hold 186-216
    per class); this gives every class N/classes (+-1) and is still deterministic."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = labels == cls
        rank_in_class[members] = np.arange(members.sum())
    return np.sort(np.lexsort((labels, rank_in_class))[:limit])


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no metadata chunks) for an HxW or HxWx3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


# --- folders of images ------------------------------------------------------------------------


def image_folder(
    root: Path, name: str, labels: str = "none", holdout_percent: float = 0.0
) -> Source:
    """A tree of images. Splits, decided from the first level: only `train/`, `val/`, `test/`
    folders (with `train/`) are the splits; otherwise the whole tree is the `train` split, less
    a `holdout` split of about `holdout_percent` % of the files, picked by a hash of each
    file's path so a file never changes side as new drops arrive (label-free evaluation and
    drift are measured on it, never trained on).

    labels="none" (the default: data arrives unlabelled, and folder names are dates, cameras or
    batches, not classes): every image at any depth is a sample with no label.
    labels="folders": inside a split, first-level folders are class names (shared across splits,
    sorted) and an image outside any class folder is quarantined rather than given no label."""
    top_dirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    split_layout = "train" in top_dirs and top_dirs <= set(SPLIT_FOLDERS)
    split_roots = {s: root / s for s in SPLIT_FOLDERS if s in top_dirs} if split_layout else {}
    split_roots = split_roots or {"train": root}
    by_folder = labels == "folders"
    classes = (
        sorted(set().union(*(_class_dirs(path) for path in split_roots.values())))
        if by_folder
        else []
    )
    index = {name: i for i, name in enumerate(classes)}
    splits, ignored = {}, {}
    for split, split_root in split_roots.items():
        files, ignored[split] = _list_images(split_root)
        splits[split] = [_file_candidate(split_root, path, index, by_folder) for path in files]
    if not split_layout and holdout_percent > 0:
        sides: dict[bool, list[Candidate]] = {False: [], True: []}
        for candidate in splits["train"]:
            sides[_held_out(candidate.ref, holdout_percent)].append(candidate)
        splits = {"train": sides[False]} | ({HOLDOUT: sides[True]} if sides[True] else {})
        ignored[HOLDOUT] = []
    return Source(name=name, splits=splits, classes=classes, appendable=True, ignored=ignored)


def _held_out(ref: str, percent: float) -> bool:
    """A stable pseudo-random draw per path: the same file is held out on every run."""
    draw = int.from_bytes(hashlib.sha256(ref.encode()).digest()[:8], "big") / 2**64
    return draw * 100 < percent


def _class_dirs(split_root: Path) -> set[str]:
    return {p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _list_images(root: Path) -> tuple[list[Path], list[str]]:
    """Image-suffixed files (any depth, sorted by relative path) and what was skipped."""
    images: list[Path] = []
    ignored: list[str] = []
    for directory, subdirs, names in os.walk(root):
        linked = [d for d in subdirs if Path(directory, d).is_symlink()]  # not followed: loops
        ignored += [_rel(root, Path(directory, d)) + "/" for d in linked]
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in linked]
        for entry in names:
            path = Path(directory, entry)
            if path.suffix.lower() in IMAGE_SUFFIXES and not entry.startswith("."):
                images.append(path)
            else:
                ignored.append(_rel(root, path))
    images.sort(key=lambda p: _rel(root, p))
    return images, sorted(ignored)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _file_candidate(root: Path, path: Path, index: dict[str, int], labelled: bool) -> Candidate:
    ref = _rel(root, path)
    folder = ref.split("/", 1)[0] if "/" in ref else None
    if labelled and folder is None:
        return Candidate(ref, None, partial(_refuse, "not in a class folder (labelled layout)"))
    label = index[folder] if labelled and folder is not None else None
    return Candidate(ref, label, partial(_read_file, path))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadImage(f"unreadable: {type(error).__name__}: {error.strerror or error}") from None


def _refuse(reason: str) -> bytes:
    raise BadImage(reason)


def vote_mode(candidates: Iterator[Candidate]) -> str:
    """'L' when most readable images are grayscale, else 'RGB' (headers only, no decode)."""
    gray = colour = 0
    for candidate in candidates:
        try:
            with Image.open(io.BytesIO(candidate.read())) as image:
                is_gray = image.mode in GRAY_MODES
        except Exception:  # untrusted bytes (bombs included): those get no vote
            continue
        gray, colour = gray + is_gray, colour + (not is_gray)
    return "L" if gray > colour else "RGB"


# --- validation and normalisation -------------------------------------------------------------


def examine(candidate: Candidate, known_sha: str | None, mode: str, max_pixels: int) -> Examined:
    """Read, hash and (unless unchanged since `known_sha`) fully decode one candidate.

    A plain module-level function of picklable arguments, so a process pool can run it."""
    try:
        data = candidate.read()
    except BadImage as bad:
        return Examined("", known_sha == "", problem=str(bad))
    sha = hashlib.sha256(data).hexdigest()
    if sha == known_sha:
        return Examined(sha, True)
    try:
        return Examined(sha, False, prepared=prepare(data, mode=mode, max_pixels=max_pixels))
    except BadImage as bad:
        return Examined(sha, False, problem=str(bad))


def prepare(data: bytes, *, mode: str, max_pixels: int) -> Prepared:
    """Fully decode untrusted bytes once; return what to store or raise `BadImage`.

    The original bytes are kept when they are PNG/JPEG/WebP already in `mode` with no EXIF
    rotation (byte-identical to the input, smallest); otherwise the normalised pixels are stored
    as PNG, so every stored image decodes straight to `mode`. Small images also carry their
    pixels, for the decoded array beside their shard."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    normalised, kept = _decode(data, mode, max_pixels)
    width, height = normalised.size
    pixels = normalised.tobytes() if width * height <= DECODED_MAX_PIXELS else b""
    if kept is not None:
        return Prepared(data, kept, width, height, pixels)
    buffer = io.BytesIO()
    normalised.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return Prepared(buffer.getvalue(), "png", width, height, pixels)


def _decode(data: bytes, mode: str, max_pixels: int) -> tuple[Image.Image, str | None]:
    """The normalised image and, when the input can be stored unchanged, its extension."""
    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, max_pixels)
            image.load()
            normalised = normalise(image, mode)
            return normalised, _keep_original(image, normalised, mode)
    except (BadImage, MemoryError):
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (PIL cannot identify the content)") from None
    except Image.DecompressionBombError as error:
        raise BadImage(f"decompression bomb: {error}") from None
    except Exception as error:  # untrusted input: PIL raises many types for malformed files
        raise BadImage(f"corrupt or truncated: {type(error).__name__}: {error}") from None


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own bomb check follows data.max_pixels (its warning is silenced: we refuse those
    images ourselves, with a reason)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise BadImage(
            f"decompression bomb: {image.width}x{image.height} = {pixels} pixels > "
            f"data.max_pixels={max_pixels}"
        )


def _keep_original(image: Image.Image, normalised: Image.Image, mode: str) -> str | None:
    """The shard extension when the input bytes can be stored unchanged, else None."""
    unchanged = (
        image.mode == mode
        and normalised.size == image.size
        and getattr(image, "n_frames", 1) == 1
        and "transparency" not in image.info
        and _orientation(image) in (0, 1)
    )
    return KEPT_FORMATS.get(image.format or "") if unchanged else None


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def normalise(image: Image.Image, mode: str) -> Image.Image:
    """EXIF rotation applied; 16-bit/float scaled, alpha composited on white, CMYK/palette
    converted; returned in `mode` ('L' or 'RGB') with no metadata to carry into the shard."""
    if _orientation(image) not in (0, 1):
        image = ImageOps.exif_transpose(image)
    if image.mode in GRAY_MODES - {"1", "L", "LA"}:
        image = _wide_to_l(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    converted = image.convert(mode) if image.mode != mode else image.copy()
    converted.info = {}
    return converted


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit and float grayscale to 8-bit by range, not by clipping (PIL's convert clips)."""
    pixels = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if pixels.size and float(pixels.max()) <= 1.0 else 1.0
        scaled = pixels.astype(np.float64) * scale
    elif image.mode.startswith("I;16") or (pixels.size and int(pixels.max()) > 255):
        scaled = pixels.astype(np.float64) / 257.0
    else:
        scaled = pixels.astype(np.float64)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
