"""Small generated photo folders for the benchmark scripts' tests (no real photos needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gradient_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` PNGs of smooth colour gradients plus noise, each a different size and aspect."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = 40 + 7 * i, 90 - 3 * i
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(3 * xx + i), np.cos(4 * yy - i), xx * yy], -1) * 0.4 + 0.5
        arr = np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder
