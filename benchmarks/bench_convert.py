"""How long conversion takes, phase by phase: what a user waits for before the first forward.

Converts timm ``vit_base_patch16_224`` (random weights) and the bundled real DINOv2 ViT-S/14 a few
times in this process and prints the median seconds of every phase (``model.ltm_timings``: trace =
torch.export + matching, match = family choice, build = merge modules in, flops = cost model,
solve = schedule, finish), then times the CLI dry run end to end in a fresh process (imports
included).

    python benchmarks/bench_convert.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def convert_times(name: str, build, repeats: int) -> dict:
    from ltm_convert.api import convert

    model = build()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        converted = convert(model, 0.8)
        total = time.perf_counter() - start
        runs.append({"total": total, **converted.ltm_timings})
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"model": name, "seconds": phases}


def cli_dry_run(repeats: int) -> float:
    cmd = [sys.executable, "-m", "ltm_convert.cli", "convert", "vit_base_patch16_224", "--no-pretrained", "--dry-run"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import timm

    from ltm_convert.sources import load_model

    results = [
        convert_times("timm vit_base_patch16_224 (random)",
                      lambda: timm.create_model("vit_base_patch16_224", pretrained=False).eval(), args.repeats),
        convert_times("bundled DINOv2 ViT-S/14", lambda: load_model("bundled"), args.repeats),
    ]
    cli = cli_dry_run(args.repeats)
    phases = list(results[0]["seconds"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| model | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for r in results:
        print(f"| {r['model']} | " + " | ".join(f"{r['seconds'][p]:.2f}" for p in phases) + " |")
    print(f"\n`ltm-convert convert vit_base_patch16_224 --no-pretrained --dry-run`, end to end: {cli:.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"convert": results, "cli_dry_run_s": cli}, fh, indent=2)


if __name__ == "__main__":
    main()
