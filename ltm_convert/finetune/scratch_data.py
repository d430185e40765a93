"""Data for training from scratch, through timm's own pipeline (``ltm-convert train``).

The images come from ``timm.data.create_dataset`` (DATA/train/<class>/ and DATA/val/<class>/), from
in-memory datasets given from Python, or from the offline Fashion-MNIST package; they are
transformed by ``timm.data.create_transform`` (RandAugment, random erasing, colour jitter, random
resized crops for training; resize and centre crop for validation), and batches are mixed by
``timm.data.Mixup`` (Mixup / CutMix, label smoothing) with the loss timm's train.py pairs with it.

Exact resume: timm's transforms draw from the global RNGs. Each training image is transformed
under RNGs seeded from (seed, epoch, index) and the global state is put back afterwards, so what an
image becomes depends on nothing but those three numbers (not on worker processes, nor on where a
run stopped), and the main process's RNGs (Mixup, dropout) are left as the checkpoint holds them.
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ltm_convert.config import FASHION_MNIST_NAMES
from ltm_convert.errors import LtmError

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid", "eval", "test")
LAYOUT = "expected DATA/train/<class>/<images> and DATA/val/<class>/<images>"


# --------------------------------------------------------------------------------------------
# Image folders (checked without torch: the CLI refuses a bad folder before any work)


def data_folders(root: str | os.PathLike) -> tuple[Path, Path, list[str]]:
    """(train dir, val dir, class names) of an image-folder dataset, or one line naming what is wrong."""
    root = Path(root)
    if not root.exists():
        raise LtmError(f"no such data directory: {root}; give a folder with train/<class>/ and val/<class>/ "
                       "image folders (or 'fashion-mnist')")
    if not root.is_dir():
        raise LtmError(f"--data {root} is a file; give a folder with train/<class>/ and val/<class>/ image folders")
    train = next((root / d for d in TRAIN_DIRS if (root / d).is_dir()), None)
    if train is None:
        raise LtmError(f"{root} has no train/ folder; {LAYOUT.replace('DATA', str(root))}")
    val = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
    if val is None:
        raise LtmError(f"{root} has no val/ folder (validation images); {LAYOUT.replace('DATA', str(root))}")
    classes = _class_folders(train)
    if not classes:
        raise LtmError(f"{train} has no class folders; put each class's images in a folder of its own: "
                       f"{train}/<class>/<images>")
    if len(classes) < 2:
        raise LtmError(f"{train} has one class folder ({classes[0]}); a classifier needs at least 2 classes")
    unknown = sorted(set(_class_folders(val)) - set(classes))
    if unknown:
        raise LtmError(f"{val} has class folder(s) {', '.join(unknown[:3])} that {train} lacks; train/ and val/ "
                       "must use the same class folders")
    return train, val, classes


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# The datasets


@dataclass
class ScratchData:
    """Training and validation datasets of (PIL image or ready tensor, label), and the class names."""
    train: Any
    val: Any
    classes: list[str]
    source: str  # what the data was, for the metrics file

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_data(data: Any, train_samples: int | None = None, val_samples: int | None = None,
                 seed: int = 0) -> ScratchData:
    """``data``: an image folder (train/ and val/ inside), 'fashion-mnist', a (train, val) pair of
    torch Datasets, or a mapping with 'train' and 'val' (or 'validation') Datasets; with seeded
    subsets of ``train_samples`` / ``val_samples`` images when given."""
    from ltm_convert.finetune.data import seeded_subset

    out = _resolve(data)
    out.train = seeded_subset(out.train, train_samples, seed)
    out.val = seeded_subset(out.val, val_samples, seed + 1)
    return out


def _resolve(data: Any) -> ScratchData:
    if isinstance(data, ScratchData):
        return ScratchData(data.train, data.val, list(data.classes), data.source)
    if isinstance(data, (str, os.PathLike)):
        if str(data).lower() in FASHION_MNIST_NAMES:
            return _fashion_mnist()
        return _folders(data)
    if isinstance(data, Mapping):
        val = next((data[k] for k in ("val", "validation", "test") if k in data), None)
        if "train" not in data or val is None:
            raise LtmError(f"a data mapping needs 'train' and 'val' datasets, got keys {sorted(map(str, data))}")
        return _in_memory(data["train"], val)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _in_memory(*data)
    raise LtmError(f"data must be an image folder, 'fashion-mnist', a (train, val) pair of datasets or a mapping "
                   f"with 'train' and 'val', got {type(data).__name__}")


def _folders(root: str | os.PathLike) -> ScratchData:
    from timm.data import create_dataset

    train_dir, val_dir, classes = data_folders(root)
    class_map = {c: i for i, c in enumerate(classes)}
    train = create_dataset("", root=str(train_dir), split="train", search_split=False, class_map=class_map,
                           is_training=True)
    val = create_dataset("", root=str(val_dir), split="validation", search_split=False, class_map=class_map)
    for ds, folder in ((train, train_dir), (val, val_dir)):
        if len(ds) == 0:
            raise LtmError(f"{folder} holds no images timm can read (.png, .jpg, ...) in its class folders")
    counts = [0] * len(classes)
    for _, target in train.reader.samples:
        counts[target] += 1
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise LtmError(f"class folder(s) {', '.join(empty[:3])} in {train_dir} hold no images; add images or remove "
                       "the folder")
    return ScratchData(train=ImageFiles(train.reader.samples), val=ImageFiles(val.reader.samples), classes=classes,
                       source=str(root))


class ImageFiles:
    """(RGB PIL image, label) of timm's folder index, each file closed once read. An image that cannot
    be decoded is replaced by the next readable one, with a warning naming it (timm skips them too)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from ltm_convert.images import open_image

        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                return open_image(path), int(target)
            except LtmError as exc:
                warnings.warn(f"{exc}; the next image is used in its place", UserWarning, stacklevel=2)
        raise LtmError("no image of the dataset can be decoded; check the data folder")


def _fashion_mnist() -> ScratchData:
    from ltm_convert.finetune.data import fashion_mnist

    train, val = fashion_mnist("train", _as_pil), fashion_mnist("test", _as_pil)
    return ScratchData(train=train, val=val, classes=list(train.classes), source="fashion-mnist")


def _in_memory(train: Any, val: Any) -> ScratchData:
    from torch.utils.data import Dataset

    for name, ds in (("train", train), ("val", val)):
        if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
            raise LtmError(f"the {name} data must be a torch Dataset with a length, got {type(ds).__name__}")
        if len(ds) == 0:
            raise LtmError(f"the {name} dataset is empty")
    classes = _classes_of(train)
    return ScratchData(train=train, val=val, classes=classes, source=f"{type(train).__name__} (in memory)")


def _classes_of(ds: Any) -> list[str]:
    """Class names from ``ds.classes`` (torchvision's habit), else the labels (``ds.targets``)."""
    inner = ds
    while not hasattr(inner, "classes") and hasattr(inner, "dataset"):  # Subset
        inner = inner.dataset
    names = getattr(inner, "classes", None)
    if names is not None and len(names) >= 2:
        return [str(c) for c in names]
    targets = getattr(inner, "targets", None)
    if targets is not None and len(targets):
        return [str(i) for i in range(int(max(int(t) for t in targets)) + 1)]
    raise LtmError("cannot tell the number of classes of the training dataset: give it a .classes list (or "
                   ".targets), or set num_classes in the config")


# --------------------------------------------------------------------------------------------
# timm's transforms, applied reproducibly


@contextlib.contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Python, numpy and torch (CPU) RNGs seeded from ``key`` inside; their state restored after."""
    import numpy as np
    import torch

    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class Transformed:
    """A dataset of (image, label) seen through a timm transform. With ``seed``, each image's random
    augmentation is a function of (seed, epoch, index) alone (:func:`seeded`); images that are
    already tensors are taken as the model's input, untransformed."""

    def __init__(self, dataset: Any, transform: Any, seed: int | None = None) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        label = int(label)
        if _is_tensor(image):
            return image, label
        image = _as_pil(image)
        if self.seed is None:
            return self.transform(image), label
        with seeded(self.seed, self.epoch, index):
            return self.transform(image), label


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _as_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    import numpy as np

    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image).convert("RGB")
    raise LtmError(f"a dataset item's image must be a PIL image, an (H, W[, 3]) uint8 array or a ready tensor, "
                   f"got {type(image).__name__}")


def transforms(cfg: Any, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
               crop_pct: float | None) -> tuple[Any, Any]:
    """(training transform, validation transform) from timm's ``create_transform``."""
    from timm.data import create_transform

    train = create_transform(size, is_training=True, auto_augment=cfg.aa_policy(), re_prob=cfg.reprob,
                             re_mode="pixel", re_count=1, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
                             interpolation="random", mean=mean, std=std)
    val = create_transform(size, is_training=False, interpolation="bicubic", mean=mean, std=std, crop_pct=crop_pct)
    for step in getattr(train, "transforms", []):
        for op in getattr(step, "ops", []):  # RandAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return train, val


def posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, for every level RandAugment asks for: at its strongest (magnitude 10 with
    ``inc1``) it keeps 0 bits, which Pillow up to 12 turned into a black image and Pillow 13 refuses
    ("bits must be between or equal to 1 and 8"), stopping a run at a random step."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def mixup_and_loss(cfg: Any, num_classes: int) -> tuple[Any, Any]:
    """(timm Mixup or None, training loss), paired as timm's train.py pairs them: Mixup carries the
    label smoothing into soft targets (SoftTargetCrossEntropy); without it, LabelSmoothingCrossEntropy."""
    import torch.nn as nn
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup_active():
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                    label_smoothing=cfg.smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()
