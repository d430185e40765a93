"""Fine-tune the bundled DINOv2 ViT-S/14 (real weights) converted at --ratio on Fashion-MNIST (CPU)
and print agreement with the frozen original before and after.

    PYTHONPATH=. python benchmarks/bench_finetune.py                       # 112 px, ratio 0.5
    PYTHONPATH=. python benchmarks/bench_finetune.py --train-samples 4096 --epochs 2 --json out.json

The bundled backbone has no head, so distillation is 1 - cosine on the pooled features and
"agreement" (ltm_convert.metrics) is the mean cosine between student and teacher features on held-out
Fashion-MNIST test images (1.0 = identical); the IB loss uses the Fashion-MNIST labels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--train-samples", type=int, default=768)
    p.add_argument("--val-samples", type=int, default=192)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train", default="mask", choices=["mask", "all"])
    p.add_argument("--mask-lr", type=float, default=None, help="default: the library's (FinetuneConfig.mask_lr)")
    p.add_argument("--lr", type=float, default=None, help="default: the library's (FinetuneConfig.lr)")
    p.add_argument("--ib-weight", type=float, default=0.1)
    p.add_argument("--freeze", action="append", default=None,
                   help="keep parameters whose name contains this frozen (default: the library's; 'none': train all ltm_)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default="/tmp/ltm_bench_finetune")
    p.add_argument("--json", dest="json_out", default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    import torch

    from ltm_convert.api import convert, describe
    from ltm_convert.sources.bundled import bundled_timm
    from ltm_convert.finetune import FinetuneConfig, finetune
    from ltm_convert.finetune.data import fashion_mnist_available

    if args.threads:
        torch.set_num_threads(args.threads)
    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed: run scripts/setup_data.sh", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = convert(bundled_timm(img_size=args.img_size), args.ratio)
    info = describe(model)
    t_convert = time.perf_counter() - t0
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, train=args.train,
                         **{k: v for k, v in (("mask_lr", args.mask_lr), ("lr", args.lr)) if v is not None}, ib_weight=args.ib_weight, freeze=FinetuneConfig.freeze if args.freeze is None else tuple(f for f in args.freeze if f != 'none'), save_every=0, log_every=1, progress=sys.stderr.isatty())
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    t1 = time.perf_counter()
    _, history = finetune(model, "fashion-mnist", workdir=args.workdir, train_samples=args.train_samples,
                          val_samples=args.val_samples, config=cfg)
    t_train = time.perf_counter() - t1
    evals = [h for h in history if h["type"] == "eval"]
    steps = [h for h in history if h["type"] == "train"]
    out = {
        "model": "bundled DINOv2 ViT-S/14 (timm)", "img_size": args.img_size, "ratio": args.ratio,
        "flops_ratio": round(info["flops_ratio"], 4), "train": args.train,
        "train_images": args.train_samples, "val_images": evals[0]["val_images"], "epochs": args.epochs,
        "batch_size": args.batch_size, "steps": len(steps), "threads": torch.get_num_threads(),
        "agreement_before": round(evals[0]["agreement"], 5), "agreement_after": round(evals[-1]["agreement"], 5),
        "kd_before": round(evals[0]["kd"], 5), "kd_after": round(evals[-1]["kd"], 5),
        "train_loss_first": round(steps[0]["loss"], 5), "train_loss_last": round(steps[-1]["loss"], 5),
        "train_kd_first": round(steps[0]["kd"], 5), "train_kd_last": round(steps[-1]["kd"], 5),
        "train_img_per_s": round(steps[-1]["img_s"], 2), "convert_s": round(t_convert, 1),
        "finetune_s": round(t_train, 1),
    }
    print(json.dumps(out, indent=2))
    print(f"agreement with the teacher: {out['agreement_before']:.4f} before -> "
          f"{out['agreement_after']:.4f} after {out['steps']} steps "
          f"({'improved' if out['agreement_after'] > out['agreement_before'] else 'NOT improved'})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
