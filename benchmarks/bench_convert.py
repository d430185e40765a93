"""Converted vs original on the bundled real model (DINOv2 ViT-S/14 weights), in one process.

Prints, per ratio: FLOPs ratio (torch.utils.flop_counter), parity at ratio 1.0, cosine of the
pooled feature with the original on real photos, and CPU latency of batch B, original and converted
timed alternately (medians), with the speed-up next to 1 / FLOPs ratio.

    python benchmarks/bench_convert.py [--batch 32] [--repeats 5] [--ratios 0.8 0.65 0.5] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ltm_convert.api import convert, describe
from ltm_convert.bundled import bundled_timm, preprocess


def real_photos(n: int) -> torch.Tensor:
    import skimage.data as skdata

    photos = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    images = preprocess(photos, 224)
    return images.repeat((n + len(photos) - 1) // len(photos), 1, 1, 1)[:n]


def timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    original = bundled_timm()
    photos = real_photos(4)
    x = real_photos(args.batch)
    with torch.inference_mode():
        ref = original(photos)
        parity = (convert(original, 1.0)(photos) - ref).abs().max().item()
    rows = []
    for ratio in args.ratios:
        converted = convert(original, ratio)
        info = describe(converted)
        with torch.inference_mode():
            cos = torch.cosine_similarity(converted(photos), ref)
        timed(original, x), timed(converted, x)  # warm-up
        t_orig, t_conv = [], []
        for _ in range(args.repeats):
            t_orig.append(timed(original, x))
            t_conv.append(timed(converted, x))
        m_orig, m_conv = statistics.median(t_orig), statistics.median(t_conv)
        rows.append({
            "ratio": ratio, "flops_ratio": round(info["flops_ratio"], 4),
            "tokens_last_block": info["blocks"][-1]["tokens_out"],
            "cosine_min": round(cos.min().item(), 4), "cosine_mean": round(cos.mean().item(), 4),
            "ms_original": round(1000 * m_orig, 1), "ms_converted": round(1000 * m_conv, 1),
            "speedup": round(m_orig / m_conv, 3), "ideal_speedup": round(1 / info["flops_ratio"], 3),
        })
    result = {"model": "bundled DINOv2 ViT-S/14 @224 (timm)", "batch": args.batch, "threads": torch.get_num_threads(),
              "parity_max_abs_diff_ratio_1": parity, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}, batch {args.batch}, {result['threads']} threads, CPU fp32")
    print(f"parity at ratio 1.0: max |diff| = {parity:.2e}")
    print(f"{'ratio':>6} {'FLOPs':>7} {'last N':>6} {'cos min':>8} {'cos mean':>8} {'orig ms':>8} {'conv ms':>8} "
          f"{'speed-up':>8} {'1/FLOPs':>8}")
    for r in rows:
        print(f"{r['ratio']:>6} {r['flops_ratio']:>7} {r['tokens_last_block']:>6} {r['cosine_min']:>8} "
              f"{r['cosine_mean']:>8} {r['ms_original']:>8} {r['ms_converted']:>8} {r['speedup']:>8} {r['ideal_speedup']:>8}")


if __name__ == "__main__":
    main()
