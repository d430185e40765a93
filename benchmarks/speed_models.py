"""The models the speed benchmarks time: the bundled DINOv2 ViT-S/14 (real weights), a timm
architecture with random weights (speed does not depend on the weights), or a tiny ViT for tests."""
from __future__ import annotations

from typing import Any


def speed_model(kind: str = "bundled", size: int = 224) -> tuple[Any, tuple[int, int]]:
    """(model in eval mode, input size). ``kind``: "bundled", "tiny" (ViT-Ti, 4x4 patches at 32 px,
    2 blocks) or a timm architecture name."""
    import timm
    import torch

    torch.manual_seed(0)
    if kind == "tiny":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 num_classes=10).eval(), (32, 32)
    if kind == "bundled":
        from ltm_convert.sources.bundled import bundled_timm

        return bundled_timm(size).eval(), (size, size)
    return timm.create_model(kind, pretrained=False, img_size=size).eval(), (size, size)


def finish(rows: list[dict], json_out: str | None, started: float, **meta: Any) -> None:
    """The closing line (the machine's load at the end, total time) and the JSON file, if asked."""
    import json
    import os
    import time
    from pathlib import Path

    print(f"\nload {os.getloadavg()[0]:.1f} at the end; {time.time() - started:.0f} s", flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
