"""Fashion-MNIST for the train-from-scratch benchmark: the Debian package's idx files, a seeded
class-balanced subset, in memory (what ``train_from_scratch`` takes from Python) or written as an
image folder (what ``ltm-convert train --data DIR`` and timm's ``create_dataset`` read).

    apt-get install dataset-fashion-mnist        # -> /usr/share/datasets/fashion-mnist
    # or, without root: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x
    #                   -> x/usr/share/datasets/fashion-mnist

    python benchmarks/fmnist.py --out fmnist_folder --train 6000 --val 2000

The idx reader is the package's own (``ltm_convert.finetune.data``): one reader, one error text.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

DEFAULT_DIR = Path(os.environ.get("LTM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))  # as ltm_convert's
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FILES = {split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
         for split, prefix in (("train", "train"), ("val", "t10k"))}
HOW_TO_GET = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist; without "
              "root: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x, then "
              "--data x/usr/share/datasets/fashion-mnist)")


def missing_files(root: str | os.PathLike) -> list[str]:
    """The idx files ``root`` lacks (empty: complete)."""
    return [name for pair in FILES.values() for name in pair if not (Path(root) / name).is_file()]


def check_data(root: str | os.PathLike) -> Path:
    """``root`` if it holds the four idx files, else one line saying what is missing and how to get it."""
    from ltm_convert.errors import LtmError

    root = Path(root)
    missing = missing_files(root)
    if missing:
        what = "no such folder" if not root.is_dir() else f"missing {', '.join(missing)}"
        raise LtmError(f"Fashion-MNIST not found in {root} ({what}); {HOW_TO_GET}")
    return root


def load_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of 'train' or 'val' (the official test files)."""
    from ltm_convert.errors import LtmError
    from ltm_convert.finetune.data import _read_idx

    root = check_data(root)
    images, labels = (_read_idx(root / name) for name in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise LtmError(f"{root}: {FILES[split][0]} holds {images.shape}, {FILES[split][1]} holds {labels.shape}; "
                       f"expected (N, H, W) images and N labels; {HOW_TO_GET}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise LtmError(f"{root}/{FILES[split][1]} has label {int(labels.max())}; Fashion-MNIST has {len(CLASSES)} classes")
    return images, labels


def balanced_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` images, as equal a share per class as the data allows (the first
    ``n % classes`` classes get one more), drawn by ``seed``; None or n >= len: every image."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = np.full(len(classes), n // len(classes))
    per[: n % len(classes)] += 1
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [pool[:k] for pool, k in zip(pools, per)]
    short = n - sum(len(t) for t in take)  # a class with too few images: fill from the rest, still seeded
    if short:
        rest = rng.permutation(np.concatenate([pool[len(t):] for pool, t in zip(pools, take)]))
        take.append(rest[:short])
    return np.sort(np.concatenate(take))


class FashionArrays(Dataset):
    """A torch Dataset of (28x28 uint8 array, label) with ``classes``: ``train_from_scratch`` turns
    each array into an RGB PIL image for timm's transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def subsets(root: str | os.PathLike, n_train: int | None, n_val: int | None, seed: int = 0) -> dict[str, FashionArrays]:
    """{'train', 'val'}: class-balanced subsets of the official train / test files, the same for a given seed."""
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images, labels = load_split(root, split)
        pick = balanced_subset(labels, n, seed)
        out[split] = FashionArrays(images[pick], labels[pick], list(CLASSES))
    return out


def write_image_folder(out: str | os.PathLike, data: dict[str, FashionArrays]) -> Path:
    """DIR/train/<class>/NNNNN.png and DIR/val/<class>/NNNNN.png. Written into a temporary folder next
    to ``out`` and renamed into place, so a cut-off write never leaves half a dataset; an existing
    ``out`` is refused rather than replaced."""
    from PIL import Image

    from ltm_convert.errors import LtmError

    out = Path(out)
    if out.exists():
        raise LtmError(f"{out} already exists; give a new folder (or delete it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, ds in data.items():
            for c in ds.classes:
                (tmp / split / c).mkdir(parents=True)
            for i in range(len(ds)):
                image, label = ds[i]
                Image.fromarray(image).save(tmp / split / ds.classes[label] / f"{i:05d}.png")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """An idx file (gzip-compressed for a .gz name) of a uint8 array: fake data for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path = Path(path)
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as fh:
        fh.write(head + array.tobytes())
    return path


def write_fake(root: str | os.PathLike, n_train: int = 40, n_val: int = 20, size: int = 28, seed: int = 0) -> Path:
    """Four idx.gz files shaped like Fashion-MNIST's: each class a bright bar at its own height over
    noise, so a tiny model can learn something within a few steps."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % len(CLASSES)
        images = rng.integers(0, 60, (n, size, size))
        for i, c in enumerate(labels):
            row = int(c) * (size - 2) // len(CLASSES)
            images[i, row:row + 3] = 255
        write_idx(root / FILES[split][0], images)
        write_idx(root / FILES[split][1], labels)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a class-balanced Fashion-MNIST subset as an image folder "
                                            "(DIR/train/<class>/*.png, DIR/val/<class>/*.png).")
    p.add_argument("--data", default=str(DEFAULT_DIR), help="the folder holding the four idx.gz files")
    p.add_argument("--out", required=True, help="the image folder to write (must not exist)")
    p.add_argument("--train", type=int, default=None, help="training images (default: all 60000)")
    p.add_argument("--val", type=int, default=None, help="validation images from the test files (default: all 10000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ltm_convert.errors import LtmError

    try:
        out = write_image_folder(args.out, subsets(args.data, args.train, args.val, args.seed))
    except LtmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
