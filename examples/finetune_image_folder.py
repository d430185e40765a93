"""Fine-tune the merge masks of a converted model on an image folder (class sub-folders).

Builds a small labelled folder from the real photos that ship with scikit-image (random crops
of four photos = four classes), converts a small timm ViT to 60% of its FLOPs, and fine-tunes
only the ``ltm_*`` parameters against the frozen original (distillation + cross-entropy + IB
loss). Your own data: ``finetune(model, "path/to/folder", ...)`` or
``ltm-convert finetune model.pt --data path/to/folder -o tuned.pt``.

Run: python examples/finetune_image_folder.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ltm_convert import convert, load, load_model
from ltm_convert.finetune import finetune


def make_folder(root: Path, per_class: int = 12, size: int = 96) -> None:
    import skimage.data as skdata

    rng = np.random.default_rng(0)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photo = getattr(skdata, name)()
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            y = rng.integers(0, photo.shape[0] - size)
            x = rng.integers(0, photo.shape[1] - size)
            Image.fromarray(photo[y:y + size, x:x + size]).save(root / name / f"{i}.png")


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_folder(folder)
        base = load_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=4)
        model = convert(base, ratio=0.6)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tuned, history = finetune(model, str(folder), output=Path(tmp) / "tuned.pt", epochs=2, batch_size=8,
                                  mask_lr=1e-3, progress=False, val_fraction=0.25)
        evals = [r for r in history if r.get("type") == "eval"]
        for r in evals:
            shown = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
            print(f"eval after step {r.get('step')}: {shown}")
        changed = [n for n, p in tuned.named_parameters() if not torch.equal(p.detach(), before[n])]
        print(f"trained parameters: {sorted({n.split('.ltm_mask.')[-1] for n in changed})}")
        assert all(".ltm_" in n for n in changed)  # --train mask: only the merge masks move
        best = next((r for r in history if r.get("type") == "best"), None)
        if best is None:  # the last weights validated best, and they are what came back
            assert changed
        else:  # an earlier step's weights validated better (keep_best, the default): those came back
            print(f"kept the weights of step {best['best_step']} (validation {best['agreement']:.4f}, "
                  f"last step {best['last_agreement']:.4f})")
        reloaded = load(Path(tmp) / "tuned.pt")
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            diff = (reloaded(x) - tuned(x)).abs().max().item()
        print(f"saved and reloaded: max diff {diff:.1e}")
    print("ok")


if __name__ == "__main__":
    main()
