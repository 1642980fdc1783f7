"""Write Fashion-MNIST training images as an unlabelled daily drop, the way a team's images
arrive: `incoming/<day>/<camera>/<n>.png`, no labels, optionally only some classes (a shifted
distribution, to see the drift test react) and a few broken files.

    python bench/fashion_drops.py incoming/2026-11-30 --start 10000 --count 5000
    python bench/fashion_drops.py incoming/2026-12-02 --start 20000 --count 3000 \\
        --classes 5 7 9 --broken        # footwear only: a shift; plus 3 bad files
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import DataParams
from pipeline.sources import fashion_mnist

BROKEN = {"empty.png": b"", "notes.jpg": b"not a JPEG\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--start", type=int, default=10_000, help="first training image index")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--classes", type=int, nargs="*", help="keep only these class ids")
    parser.add_argument("--cameras", type=int, default=2, help="sub-folders the drop is split in")
    parser.add_argument("--broken", action="store_true", help="add an empty, a fake, a cut file")
    args = parser.parse_args()

    images = fashion_mnist(Path(DataParams().fashion_mnist_dir), {"train": 0, "test": 0})
    picked = [
        c
        for c in images.splits["train"][args.start :]
        if not args.classes or c.label in args.classes
    ][: args.count]
    for n, candidate in enumerate(picked):
        folder = args.folder / f"cam{n % args.cameras + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.start + n:06d}.png").write_bytes(candidate.read())
    if args.broken:
        for name, data in BROKEN.items():
            (args.folder / name).write_bytes(data)
        whole = picked[0].read()
        (args.folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    print(f"{args.folder}: {len(picked)} images" + (" + 3 broken files" if args.broken else ""))


if __name__ == "__main__":
    main()
