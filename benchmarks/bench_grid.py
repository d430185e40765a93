"""Grid models (MobileViT, Swin, EfficientViT; timm and HF) converted at ratio 0.8 vs the original,
timed in one process on CPU.

Random weights (no weights for these are available offline; the static schedule makes the time
independent of the weights and of the image content). Prints, per model, the grid schedule, the
FLOPs ratio (torch.utils.flop_counter) and the measured speed-up at batch B next to 1 / FLOPs ratio.

    python benchmarks/bench_grid.py [--batch 32] [--repeats 5] [--ratio 0.8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from ltm_convert.api import convert, describe
from ltm_convert.tools.bench import benchmark

MODELS = ["timm:mobilevit_xxs", "timm:mobilevit_xs", "timm:mobilevit_s", "hf:MobileViTForImageClassification",
          "timm:swin_tiny_patch4_window7_224", "hf:SwinForImageClassification", "timm:efficientvit_b1"]


def build(spec: str) -> torch.nn.Module:
    kind, name = spec.split(":")
    torch.manual_seed(0)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import transformers as T

    config = T.SwinConfig() if name.startswith("Swin") else T.MobileViTConfig(image_size=256)  # Swin-T / MobileViT-S
    return getattr(T, name)(config).eval()


def _grids(info: dict) -> list[str]:
    """Distinct grid -> target grid pairs in order, with a count when several blocks share one."""
    out: list[str] = []
    counts: dict[str, int] = {}
    for g in info["grids"]:
        text = "{}x{}->{}x{}".format(*g["grid"], *g["grid_out"])
        if text not in counts:
            out.append(text)
        counts[text] = counts.get(text, 0) + 1
    return [t if counts[t] == 1 else f"{counts[t]} x {t}" for t in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    for spec in args.models:
        original = build(spec)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = convert(original, args.ratio)
        convert_s = time.perf_counter() - start
        info = describe(converted)
        result = benchmark(original, {"ltm": converted}, batches=[args.batch], repeats=args.repeats)
        row = result["models"][0]
        timing = row["timing"][str(args.batch)]
        rows.append({
            "model": spec, "ratio": args.ratio, "flops_ratio": round(row["flops_ratio"], 4),
            "grids": _grids(info), "input": "x".join(map(str, info["input_size"])),
            "ms_original": round(result["original"]["timing"][str(args.batch)]["latency_ms"], 1),
            "ms_converted": round(timing["latency_ms"], 1), "speedup": round(timing["speedup"], 3),
            "ideal_speedup": round(row["ideal_speedup"], 3), "convert_s": round(convert_s, 1),
            "warning": str(caught[0].message) if caught else None,
        })
        print(f"[{time.strftime('%H:%M:%S')}] {spec} done", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"CPU fp32, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.repeats} pairs\n")
    print("| model | input | FLOPs ratio | grids (tokens -> targets) | original ms | converted ms | speed-up | 1/FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['flops_ratio']} | {', '.join(r['grids'])} | {r['ms_original']} | "
              f"{r['ms_converted']} | {r['speedup']}x | {r['ideal_speedup']}x |")


if __name__ == "__main__":
    main()
