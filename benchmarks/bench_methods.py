"""LTM against the baselines (ToMe, ToFu, LTMP) on the bundled real model, in one process.

For every method and FLOPs ratio: FLOPs ratio (torch.utils.flop_counter), the measured speed-up at
each batch size next to the ideal 1 / FLOPs ratio (original and converted timed back to back,
alternating, medians of paired ratios), and the agreement with the original (cosine of the pooled
feature on four real photos, untrained masks). Prints the Markdown table of benchmarks/README.md.

    python benchmarks/bench_methods.py [--ratios 0.8 0.65 0.5] [--methods ltm tome tofu ltmp]
        [--batches 1 8 32] [--repeats 5] [--compile] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ltm_convert.tools.bench import benchmark, convert_all, markdown_table
from ltm_convert.images import sample_photos
from ltm_convert.sources.bundled import bundled_timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    parser.add_argument("--methods", nargs="+", default=["ltm", "tome", "tofu", "ltmp"])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="autocast dtype on GPU: bf16 (default) or fp16")
    parser.add_argument("--group", type=int, default=1,
                        help="converted models timed per run of the original (1 = strict pairs)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None, help="also write the full result to this JSON file")
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    original = bundled_timm()
    converted = convert_all(original, args.ratios, args.methods, log=log)
    result = benchmark(original, converted, batches=args.batches, repeats=args.repeats, warmup=args.warmup,
                       device=args.device, dtype=args.dtype, compile=args.compile, images=sample_photos(224), group=args.group,
                       log=log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    for batch in result["batches"]:
        print(f"\n### batch {batch}\n")
        print(markdown_table(result, batch))


if __name__ == "__main__":
    main()
