"""LTM against ToMe at the same FLOPs target, timed directly against each other in one process.

bench_methods.py times every method against the original; two speed-ups measured that way each
carry the original's own noise. Here the ToMe-converted model is the baseline and the
LTM-converted model is timed against it (alternating, medians of paired ratios), so the ratio
"ToMe time / LTM time" is measured directly: above 1 means LTM is faster. Next to the median the
table gives the quartiles of the paired ratios and how many pairs LTM won, so a difference can be
told from the noise of a shared machine. The mask modules alone are timed the same way on the
first merging block's real input.

    python benchmarks/bench_ltm_vs_tome.py [--ratios 0.8 0.65 0.5] [--batch 32] [--repeats 9]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ltm_convert.api import convert, describe
from ltm_convert.tools.bench import benchmark
from ltm_convert.sources.bundled import bundled_timm


def mask_times(ltm: torch.nn.Module, tome: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of the first merging block's mask module, LTM and ToMe, on the same tokens."""
    inputs = {}

    def grab(name):
        def hook(mod, args):
            inputs[name] = args
        return hook

    handles = []
    for name, model in (("ltm", ltm), ("tome", tome)):
        first = next(m for m in model.modules() if getattr(m, "ltm_mask", None) is not None and m.merges())
        handles.append(first.ltm_mask.register_forward_pre_hook(grab(name)))
    with torch.inference_mode():
        ltm(x)
        tome(x)
    for h in handles:
        h.remove()
    masks = {name: next(m for m in model.modules() if getattr(m, "ltm_mask", None) is not None and m.merges()).ltm_mask
             for name, model in (("ltm", ltm), ("tome", tome))}
    times: dict[str, list[float]] = {"ltm": [], "tome": []}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name in (("ltm", "tome") if i % 2 else ("tome", "ltm")):
                start = time.perf_counter()
                masks[name](*inputs[name])
                if i:
                    times[name].append((time.perf_counter() - start) * 1000)
    return statistics.median(times["ltm"]), statistics.median(times["tome"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    original = bundled_timm()
    rows = []
    for ratio in args.ratios:
        ltm, tome = convert(original, ratio), convert(original, ratio, method="tome")
        fl, ft = describe(ltm)["flops_ratio"], describe(tome)["flops_ratio"]
        result = benchmark(tome, {"ltm": ltm}, batches=[args.batch], repeats=args.repeats)
        timing = result["models"][0]["timing"][str(args.batch)]
        samples = result["samples_ms"][str(args.batch)]
        t_tome, t_ltm = samples["original"], samples["ltm"]
        pairs = sorted(a / b for a, b in zip(t_tome, t_ltm))
        q1, _, q3 = statistics.quantiles(pairs, n=4)
        won = sum(p > 1 for p in pairs)
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        m_ltm, m_tome = mask_times(ltm, tome, x, args.repeats)
        rows.append((ratio, fl, ft, result["original"]["timing"][str(args.batch)]["latency_ms"],
                     timing["latency_ms"], timing["speedup"], q1, q3, f"{won}/{len(pairs)}", m_ltm, m_tome))
        print(f"[{time.strftime('%H:%M:%S')}] ratio {ratio} done", file=sys.stderr, flush=True)
    print(f"bundled DINOv2 ViT-S/14, CPU fp32, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} alternating pairs\n")
    print("| ratio | FLOPs LTM / ToMe | ToMe ms | LTM ms | ToMe time / LTM time: median (quartiles) "
          "| pairs LTM faster | mask alone: LTM ms / ToMe ms |")
    print("|---|---|---|---|---|---|---|")
    for ratio, fl, ft, ms_t, ms_l, speed, q1, q3, won, m_l, m_t in rows:
        print(f"| {ratio} | {fl:.4f} / {ft:.4f} | {ms_t:.0f} | {ms_l:.0f} | {speed:.3f}x ({q1:.3f}-{q3:.3f}) "
              f"| {won} | {m_l:.1f} / {m_t:.1f} |")


if __name__ == "__main__":
    main()
