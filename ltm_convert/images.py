"""One way to turn images into model input, shared by bench, visualize, fine-tuning and the benchmarks.

The rule: scale the image so it covers the model's input size (bicubic, antialiased), centre-crop
to that size, normalise with the model's own mean / std (timm pretrained_cfg, HF config), else
ImageNet's. Accepts paths, PIL images, HxW(x3|x4) arrays (uint8 or floats in [0, 1]) and
(3, H, W) / (N, 3, H, W) float tensors in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ltm_convert.config import IMAGENET_MEAN, IMAGENET_STD
from ltm_convert.errors import LtmError

MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb check: 400-Mpx files are refused, not decoded


def normalisation(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own mean/std (timm pretrained_cfg, HF config), else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    config = getattr(model, "config", None)
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def open_image(path: str | Path) -> Any:
    """An RGB PIL image from a file; refuses images too large to decode safely."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise LtmError(f"image {path} is {im.width}x{im.height} ({im.width * im.height / 1e6:.0f} Mpx), more than "
                               f"the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx ltm_convert decodes; downscale it first")
            return im.convert("RGB")
    except LtmError:
        raise
    except Image.DecompressionBombError:
        raise LtmError(f"image {path} is larger than the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx ltm_convert decodes "
                       "(a decompression bomb?); downscale it first") from None
    except (OSError, ValueError) as e:
        raise LtmError(f"cannot read image {path}: {e}") from None


def to_tensor(image: Any) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from a path, PIL image, array or tensor."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise LtmError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    if isinstance(image, (str, Path)):
        image = open_image(image)
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise LtmError(f"expected an HxWx3 image, got shape {a.shape}; pass RGB images")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    t = torch.from_numpy(np.array(a[..., :3], copy=True)).permute(2, 0, 1)  # a writable copy: PIL arrays are read-only
    return t.float() / 255.0 if a.dtype == np.uint8 else t.float().clamp(0, 1)


def resize_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (..., 3, h, w): scale to cover (h, w), then centre-crop."""
    h, w = size
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    s = max(h / H, w / W)
    nh, nw = max(h, round(H * s)), max(w, round(W * s))
    batched = x if x.dim() == 4 else x[None]
    y = F.interpolate(batched, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - h) // 2, (nw - w) // 2
    y = y[..., top:top + h, left:left + w]
    return y if x.dim() == 4 else y[0]


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)


def preprocess(images: Any, size: int | tuple[int, int] = 224, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Images -> normalised (N, 3, h, w) float batch (see the module docstring for the rule)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items = list(images)
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise LtmError("no images to preprocess")
    return torch.stack([normalise(resize_crop(to_tensor(im), size), mean, std) for im in items])  # type: ignore[arg-type]


def model_input(model: Any, images: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``preprocess`` with the model's own normalisation and its conversion resolution (for a video
    model: still clips, each image repeated over its frames)."""
    from ltm_convert.model_inputs import as_model_input, planned_input_size

    size = planned_input_size(model, size)
    mean, std = normalisation(model)
    return as_model_input(model, preprocess(images, size, mean, std))


class Preprocess:
    """The same rule as a dataset transform: one image (array or PIL) -> normalised (3, h, w)."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = tuple(size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Any) -> torch.Tensor:
        return normalise(resize_crop(to_tensor(image), self.size), self.mean, self.std)  # type: ignore[arg-type]


def sample_photos(size: int | tuple[int, int] = 224) -> torch.Tensor:
    """Four real photos from scikit-image (chelsea, astronaut, coffee, rocket), ImageNet-normalised."""
    try:
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LtmError("real-image agreement needs scikit-image; run `pip install scikit-image`") from exc
    return preprocess([skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()], size)


class Augment:
    """Training augmentation for photos: a random crop of 35-100% of the area (aspect 3/4-4/3), resized
    to the model's input, and a horizontal flip; then the usual normalisation. The randomness is a
    function of (seed, epoch, sample index), so a resumed run sees the same crops as one that never
    stopped, with or without DataLoader workers."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], seed: int = 0) -> None:
        self.size = tuple(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.epoch = int(seed), 0

    def __call__(self, image: Any, index: int = 0) -> torch.Tensor:
        import math

        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + int(index)) % (2 ** 31))
        x = to_tensor(image)
        H, W = x.shape[-2:]
        area = H * W * (0.35 + 0.65 * float(torch.rand((), generator=g)))
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=g)))
        h = max(1, min(H, int(round(math.sqrt(area / aspect)))))
        w = max(1, min(W, int(round(math.sqrt(area * aspect)))))
        top = int(torch.randint(0, H - h + 1, (), generator=g))
        left = int(torch.randint(0, W - w + 1, (), generator=g))
        x = x[:, top:top + h, left:left + w]
        if float(torch.rand((), generator=g)) < 0.5:
            x = x.flip(-1)
        x = F.interpolate(x[None], size=self.size, mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
        return normalise(x, self.mean, self.std)


# every image file any reader here takes (PIL opens them all): calibration folders, fine-tuning
# data, visualisation, the benchmarks' photo folders
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def folder_photos(folder: Path, what: str = "the folder") -> list[Path]:
    """The photos of a folder (``--calibration-images``, ``calibration_images=``): its image files, or, for an ImageFolder-style
    tree (one subfolder per class), those of its subfolders taken in turn, so that the first images
    (calibration uses the first 64) come from every class."""
    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if is_image_file(p))

    files = images(folder)
    if files:
        return files
    subfolders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [images(d) for d in subfolders]
    mixed = [f for group in _round_robin(per_class) for f in group]
    if not mixed:
        kinds = "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        where = f" nor in its {len(subfolders)} subfolder(s)" if subfolders else ""
        raise LtmError(f"{what} {folder} holds no {kinds} images{where}; "
                       "point it at a folder of photos (or of class folders of photos)")
    return mixed


def _round_robin(groups: list[list[Path]]) -> list[list[Path]]:
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]: one file of each group per round."""
    rounds: list[list[Path]] = []
    for i in range(max((len(g) for g in groups), default=0)):
        rounds.append([g[i] for g in groups if i < len(g)])
    return rounds
