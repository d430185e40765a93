"""Datasets for fine-tuning: an ImageFolder-style directory, the offline Fashion-MNIST idx files,
or a local HuggingFace ``datasets`` directory (``save_to_disk``), with a deterministic,
resumable sampler that also shards across DDP ranks.

Every dataset returns ``(image tensor (3, H, W) normalised with the model's mean/std, label)``.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Subset

from ltm_convert.config import FASHION_MNIST_NAMES
from ltm_convert.errors import LtmError
from ltm_convert.images import Augment, Preprocess, is_image_file, normalisation

FASHION_MNIST_DIR = Path(os.environ.get("LTM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot"]
# --------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise LtmError(f"cannot read {path} ({exc}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4:
        raise LtmError(f"{path} is not an idx file")
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise LtmError(f"{path}: only unsigned-byte idx files are supported")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise LtmError(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} bytes)")
    return arr.reshape(dims)


def fashion_mnist_available(root: Path | None = None) -> bool:
    root = root or FASHION_MNIST_DIR
    return all((root / f"{s}-{k}-ubyte.gz").is_file() for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))


class ArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Preprocess, classes: list[str]) -> None:
        self.images, self.labels, self.transform, self.classes = images, labels, transform, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def fashion_mnist(split: str, transform: Preprocess, root: Path | None = None) -> ArrayDataset:
    root = root or FASHION_MNIST_DIR
    if not fashion_mnist_available(root):
        raise LtmError(f"Fashion-MNIST is not installed under {root}; run scripts/setup_data.sh "
                       "(apt-get install -y dataset-fashion-mnist)")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return ArrayDataset(images, labels, transform, list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------------------------
# ImageFolder


class ImageFolder(Dataset):
    """root/<class>/<image>. Unreadable images are found up front (PIL verify) and skipped; an
    image that still fails to decode later is replaced by the next good one and counted."""

    def __init__(self, root: Path, transform: Preprocess, classes: list[str] | None = None,
                 augment: Any = None) -> None:
        from PIL import Image

        self.root, self.transform, self.augment = Path(root), transform, augment
        if not self.root.is_dir():
            raise LtmError(f"no such data directory: {self.root}")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise LtmError(f"{self.root} has no class folders; expected {self.root}/<class>/<image files>")
        self.classes = classes or found
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[str] = []
        empty = []
        for c in found:
            if c not in index:
                raise LtmError(f"{self.root}/{c} is not one of the training classes; train and val must have the same class folders")
            files = sorted(p for p in (self.root / c).rglob("*") if is_image_file(p))
            good = 0
            for p in files:
                try:
                    with Image.open(p) as im:
                        im.verify()
                except Exception:  # noqa: BLE001 - any decoder error means a bad file
                    self.skipped.append(str(p))
                    continue
                self.samples.append((p, index[c]))
                good += 1
            if good == 0:
                empty.append(c)
        if empty:
            raise LtmError(f"class folder(s) {', '.join(empty[:3])} in {self.root} have no readable images; "
                           "add images or remove the folder")
        # images that pass verify() yet fail to decode (truncated JPEGs) are counted per DataLoader
        # worker in shared memory, so the count reaches the main process
        self.failures = torch.zeros(64, dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = self._load(path)
                if self.augment is not None:
                    return self.augment(image, (i + k) % len(self.samples)), label
                return self.transform(image), label
            except Exception:  # noqa: BLE001 - any decoder error means a bad file
                info = torch.utils.data.get_worker_info()
                self.failures[(info.id if info is not None else 0) % 64] += 1
        raise LtmError(f"no image in {self.root} can be decoded")


# --------------------------------------------------------------------------------------------
# HF datasets directory


class HFDiskDataset(Dataset):
    def __init__(self, ds: Any, transform: Preprocess, image_key: str, label_key: str) -> None:
        self.ds, self.transform, self.image_key, self.label_key = ds, transform, image_key, label_key
        feat = ds.features.get(label_key)
        names = getattr(feat, "names", None)
        self.classes = list(names) if names else [str(i) for i in range(int(max(ds[label_key])) + 1)]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(i)]
        im = row[self.image_key]
        arr = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
        return self.transform(arr), int(row[self.label_key])


def _hf_splits(root: Path, transform: Preprocess) -> dict[str, HFDiskDataset]:
    try:
        import datasets
    except ImportError:
        raise LtmError(f"{root} is a HuggingFace datasets directory; pip install datasets to read it") from None
    try:
        obj = datasets.load_from_disk(str(root))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever datasets / pyarrow make of a damaged directory
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise LtmError(f"{root} looks like a HuggingFace datasets directory but cannot be read ({text}); "
                       "re-create it with Dataset.save_to_disk, or give an ImageFolder directory") from None
    splits = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"train": obj}
    out = {}
    for name, ds in splits.items():
        image_key = next((k for k in ("image", "img", "pixel_values") if k in ds.column_names), None)
        label_key = next((k for k in ("label", "labels", "fine_label") if k in ds.column_names), None)
        if image_key is None or label_key is None:
            raise LtmError(f"{root} split {name!r} needs an image and a label column, has {ds.column_names}")
        out[name] = HFDiskDataset(ds, transform, image_key, label_key)
    return out


def _is_hf_dir(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file()


# --------------------------------------------------------------------------------------------
# Entry point


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    skipped: int  # unreadable images skipped

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Tell augmenting datasets the epoch (their random crops depend on it)."""
        ds = self.train
        while isinstance(ds, Subset):
            ds = ds.dataset
        augment = getattr(ds, "augment", None)
        if augment is not None:
            augment.epoch = int(epoch)

    def late_failures(self) -> int:
        """Images that could not be decoded while training (replaced by the next readable one)."""
        seen: dict[int, Any] = {}
        for ds in (self.train, self.val):
            while isinstance(ds, Subset):
                ds = ds.dataset
            seen[id(ds)] = ds
        counters = {id(ds.failures): ds.failures for ds in seen.values() if getattr(ds, "failures", None) is not None}
        return sum(int(c.sum()) for c in counters.values())


def seeded_subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """``n`` items of ``ds`` drawn by ``seed`` (in their order in ``ds``); all of it for None or n >= len."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def _split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(ds)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, sorted(perm[n_val:])), Subset(ds, sorted(perm[:n_val]))


def build_data(spec: str | os.PathLike, model: Any, *, input_size: tuple[int, int], val_fraction: float = 0.1,
               train_samples: int | None = None, val_samples: int | None = None, seed: int = 0,
               augment: bool = True) -> DataBundle:
    """``spec``: 'fashion-mnist', an ImageFolder dir (with train/ and val/ inside, or one folder
    that is split), or a local HF datasets dir. Photos in an image folder are augmented for training
    (random crops and flips, ``augment``); validation images never are."""
    mean, std = normalisation(model)
    tf = Preprocess(input_size, mean, std)
    aug = Augment(input_size, mean, std, seed) if augment else None
    skipped = 0
    if str(spec).lower() in FASHION_MNIST_NAMES:
        train, val = fashion_mnist("train", tf), fashion_mnist("test", tf)
        classes = train.classes
    else:
        root = Path(spec)
        if not root.exists():
            raise LtmError(f"no such data directory: {root} (give an ImageFolder dir, a HF datasets dir, or 'fashion-mnist')")
        if not root.is_dir():
            raise LtmError(f"{root} is a file; --data needs a directory or 'fashion-mnist'")
        if _is_hf_dir(root):
            splits = _hf_splits(root, tf)
            train = splits.get("train") or next(iter(splits.values()))
            val_ds = splits.get("validation") or splits.get("val") or splits.get("test")
            if val_ds is None:
                train, val = _split(train, val_fraction, seed)
                classes = train.dataset.classes
            else:
                val, classes = val_ds, train.classes
        elif (root / "train").is_dir():
            train = ImageFolder(root / "train", tf, augment=aug)
            val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
            val = ImageFolder(val_dir, tf, classes=train.classes) if val_dir else None
            skipped = len(train.skipped) + (len(val.skipped) if val is not None else 0)
            classes = train.classes
            if val is None:
                plain = ImageFolder.__new__(ImageFolder)
                plain.__dict__.update(train.__dict__)
                plain.augment = None  # validation images are never augmented
                train, val = _split(train, val_fraction, seed)
                val = Subset(plain, val.indices)
        else:
            full = ImageFolder(root, tf)
            skipped, classes = len(full.skipped), full.classes
            train, val = _split(full, val_fraction, seed)
            if aug is not None:  # the same split, the training side augmented
                augmented = ImageFolder.__new__(ImageFolder)
                augmented.__dict__.update(full.__dict__)
                augmented.augment = aug
                train = Subset(augmented, train.indices)
    train = seeded_subset(train, train_samples, seed)
    val = seeded_subset(val, val_samples, seed + 1)
    if len(train) == 0:
        raise LtmError(f"{spec} has no training images")
    return DataBundle(train=train, val=val, classes=classes, skipped=skipped)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, rank-sharded) that can start mid-epoch.

    With drop_last the per-step union over ranks of per-rank batches equals one process's batch
    of the same global size, so 1-process and N-process runs see the same samples per step.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size  # per rank
        self.start_step = 0

    def set_position(self, epoch: int, step: int) -> None:
        self.set_epoch(epoch)
        self.start_step = step

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_step * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_step * self.batch_size)


def shard(ds: Dataset, rank: int, world: int) -> Dataset:
    """Evaluation shard without padding (counts are summed across ranks afterwards)."""
    if world <= 1:
        return ds
    return Subset(ds, list(range(rank, len(ds), world)))
