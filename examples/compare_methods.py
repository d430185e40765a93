"""Compare LTM with the built-in baselines (ToMe, ToFu, LTMP) on the bundled real model.

Converts the bundled DINOv2 ViT-S/14 (real weights, offline) with every method at one FLOPs
ratio, then measures in one process: FLOPs ratio, speed-up against the original (timed
alternately, medians) next to the ideal 1 / FLOPs ratio, and agreement with the original on real
photos. The command line does the same: ``ltm-convert bench bundled --ratio 0.65 --method ltm
--method tome``; ``benchmarks/bench_methods.py`` prints the full table.

Run: python examples/compare_methods.py [--size 112] [--batch 8]
"""
from __future__ import annotations

import argparse

import torch

from ltm_convert.tools.bench import benchmark, convert_all, markdown_table
from ltm_convert.images import sample_photos
from ltm_convert.sources.bundled import bundled_timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112, help="input resolution (224 for the real thing)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.65)
    args = parser.parse_args()

    torch.manual_seed(0)
    original = bundled_timm(img_size=args.size)
    models = convert_all(original, [args.ratio], ["ltm", "tome", "tofu", "ltmp"])
    result = benchmark(original, models, batches=[args.batch], repeats=3, warmup=1,
                       images=sample_photos(args.size))
    print(markdown_table(result, args.batch))
    print("ok")


if __name__ == "__main__":
    main()
