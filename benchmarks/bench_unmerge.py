"""What the unmerge to full-grid maps costs: its share of the converted model's time.

A dense client (segmentation, depth) asks a converted timm ViT for NCHW maps of its blocks
(``forward_intermediates``); every patch then takes the value of the token it was merged into
(rewriters/heads.py): the blocks track which token holds each patch (a small index gather per
block) and each map is one gather of its tokens. The unmerge's cost is those two: the tracking,
timed as the same NLC call of timm's own method (merged tokens, no maps: the adapter, which
spreads NLC tokens over the grid too, left out) with and without it, alternating on one model,
and the gathers, timed alone on the forward's real tokens and sources. Its share is their sum over
the time of the NCHW call, at batch B on one thread. Beside it: the NCHW call against the NLC call,
which also holds timm's own NCHW layout copy (what the original model pays for its maps too).

    python benchmarks/bench_unmerge.py [--batch 32] [--ratio 0.5] [--repeats 9] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from ltm_convert.api import convert, describe
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.state import capturing, tracking_sources


def quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [round(q[0], 4), round(statistics.median(values), 4), round(q[2], 4)]


def paired(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat, in an order that rotates every repeat (one warm-up round first)."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                runs[name]()
                if i:
                    times[name].append(time.perf_counter() - start)
    return times


def merged_tokens(model: torch.nn.Module, x: torch.Tensor, indices: Any) -> list[torch.Tensor]:
    """The blocks' merged NLC tokens: timm's own forward_intermediates, without the adapter that spreads them."""
    return type(model).forward_intermediates(model, x, indices=indices, output_fmt="NLC", intermediates_only=True)


def gather_seconds(model: torch.nn.Module, x: torch.Tensor, indices: Any, repeats: int) -> float:
    """Median seconds of the unmerge's gathers alone (one per map), on the forward's real tokens and sources."""
    with torch.inference_mode(), tracking_sources(), capturing() as states:
        tokens = merged_tokens(model, x, indices)
    names = [b.ltm_name for b in model.blocks]
    take = sorted(range(len(names)))[-indices:] if isinstance(indices, int) else list(indices)
    prefix = model.num_prefix_tokens
    # (timm drops the prefix tokens; a dense model's last block hands its tokens out spread itself: no state)
    pairs = [(y, states[names[i]].source - prefix) for y, i in zip(tokens, take) if states.get(names[i]) is not None]
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for y, src in pairs:
                take_rows(y, src)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    torch.manual_seed(0)
    original = timm.create_model(args.model, pretrained=False).eval()
    model = convert(original, args.ratio, dense=True)
    info = describe(model)
    x = torch.randn(args.batch, 3, *info["input_size"], generator=torch.Generator().manual_seed(0))
    rows = []
    for label, indices in (("all blocks", None), ("last 4 blocks", 4)):
        def nchw() -> Any:
            return model.forward_intermediates(x, indices=indices, output_fmt="NCHW", intermediates_only=True)

        def nlc() -> Any:
            return merged_tokens(model, x, indices)

        def tracked() -> Any:
            with tracking_sources():
                return nlc()

        times = paired({"nchw": nchw, "nlc": nlc, "nlc_tracked": tracked}, args.repeats)
        gathers = gather_seconds(model, x, indices if indices is not None else list(range(len(model.blocks))),
                                 args.repeats)
        share = [(t - n + gathers) / c for c, n, t in zip(times["nchw"], times["nlc"], times["nlc_tracked"])]
        maps_over_tokens = [1 - n / c for c, n in zip(times["nchw"], times["nlc"])]
        rows.append({
            "maps": label, "batch": args.batch, "ratio": args.ratio, "flops_ratio": round(info["flops_ratio"], 4),
            "threads": args.threads, "repeats": args.repeats,
            "nchw_s": quartiles(times["nchw"]), "nlc_s": quartiles(times["nlc"]),
            "nlc_tracked_s": quartiles(times["nlc_tracked"]), "gathers_s": round(gathers, 6),
            "unmerge_share": quartiles(share), "nchw_over_nlc_share": quartiles(maps_over_tokens),
        })
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows, "argv": sys.argv[1:]}, f, indent=1)


if __name__ == "__main__":
    main()
