"""What a short fine-tune changes on unseen photos: a bare distillation loop, scored on held-out photos.

The product's `ltm-convert finetune` adds schedules, validation, checkpoints and resume; this loop
strips all of that so that one question can be asked at a time: does training THESE parameters
(the backbone, its norms, or the merge masks alone) at THIS rate raise agreement with the original
on photos the loop never saw? Every run starts from the converted model, trains on random crops of
the training photos (or, with --on-held, on the held-out photos themselves: an upper bound on what
the chosen parameters can learn), and scores the held-out photos before and every --eval-every
steps, each time with a paired bootstrap 95% interval against the start. benchmarks/README.md
("Fine-tuning that helps", "What the masks cannot learn") holds the measured rows.

    python benchmarks/bench_mask_learning.py --images DIR --params mask --lr 1e-5 --steps 60 --json out.json

The held-out / training split is bench_quality.py's (same --held-out and --seed give the same photos).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

PARAM_SETS = {
    "all": lambda name, p: "ltm_" not in name,  # the backbone; masks frozen
    "norms": lambda name, p: "ltm_" not in name and "norm" in name,
    "mask": lambda name, p: "ltm_" in name,  # the merge masks alone
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of photos (any image files)")
    p.add_argument("--held-out", type=int, default=350, help="photos evaluated (>= 300 unless --allow-small)")
    p.add_argument("--allow-small", action="store_true", help="allow --held-out < 300 (tests)")
    p.add_argument("--seed", type=int, default=0, help="split, batches and bootstrap seed")
    p.add_argument("--model-spec", default="bundled", help="load_model spec (default: bundled DINOv2 ViT-S/14)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (tests)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON", help="extra load_model options")
    p.add_argument("--method", default="ltm")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--params", choices=sorted(PARAM_SETS), default="mask", help="what trains")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (constant)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--deep", type=float, default=0.0,
                   help="weight of an extra loss: every block's class token against the original's (0: off)")
    p.add_argument("--soft", action="store_true", help="train through the masks' relaxed merge (training mode)")
    p.add_argument("--on-held", action="store_true",
                   help="train on the held-out photos themselves (flips only): what the parameters could learn at best")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (0: off), as `finetune` does")
    p.add_argument("--crop-scale", type=float, default=0.35, help="smallest crop area of a training view")
    p.add_argument("--fit-keep", type=int, default=0, metavar="N",
                   help="before any step, fit the keep terms to first-order merge prices on N training views "
                        "(ltm_convert.finetune.keep_fit; 0: off)")
    p.add_argument("--fit-scale", type=float, default=None, help="the keep fit's scale (default: the product's)")
    p.add_argument("--fit-rounds", type=int, default=1,
                   help="fit again this many times, each on new views priced with the last fit in place")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the run (per-eval intervals, losses) here")
    args = p.parse_args(argv)
    if args.held_out < 300 and not args.allow_small:
        p.error("--held-out must be >= 300 for meaningful intervals (use --allow-small for tests)")
    if args.steps < 0 or args.eval_every < 1 or args.batch < 1 or args.fit_keep < 0:
        p.error("--eval-every and --batch must be >= 1, --steps and --fit-keep >= 0")
    if args.deep and args.fit_keep:
        p.error("--deep and --fit-keep do not combine (the --deep hooks would hold every fit batch's graph)")
    if args.steps == 0 and not args.fit_keep:
        p.error("nothing to measure: give --steps or --fit-keep")
    return args


def load_training_photos(folder: Path, names: list[str], side: int) -> torch.Tensor:
    """uint8 (N, 3, side, side): each photo's short side scaled to ``side`` and centre-cropped, so
    random crops can be cut from it at every step without decoding again."""
    from PIL import Image

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = side / min(w, h)
            im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - side) // 2, (h - side) // 2
            out.append(torch.from_numpy(np.asarray(im.crop((left, top, left + side, top + side))).copy()).permute(2, 0, 1))
    return torch.stack(out)


def class_tokens(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Hooks that collect token 0 of every top-level block's output (the --deep loss)."""
    store: list[torch.Tensor] = []
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise SystemExit("error: --deep needs a model with a `blocks` list (timm ViTs); run without --deep")
    handles = [b.register_forward_hook(lambda m, i, o: store.append(o[:, 0])) for b in blocks]
    return store, handles


def set_merge_mode(model: torch.nn.Module, soft: bool) -> None:
    """Backbone in eval mode (no dropout), masks in training mode only for --soft."""
    from ltm_convert.merge.state import SequenceMask

    model.eval()
    if soft:
        for m in model.modules():
            if isinstance(m, SequenceMask):
                m.train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from torchvision.transforms import v2

    from ltm_convert.api import convert
    from ltm_convert.metrics import agreement
    from ltm_convert.sources import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    names = bq.list_images(args.images)
    held, train = bq.split_names(names, args.held_out, args.seed)
    if not train and not args.on_held:
        raise SystemExit(f"error: all {len(names)} photos are held out; lower --held-out or use --on-held")
    options = dict(args.model_kwargs)
    if args.no_pretrained:
        options["pretrained"] = False
    original = load_model(args.model_spec, **options).eval()
    size, mean, std = bq.model_input(original)
    held_x = bq.load_photos(args.images, held, size, mean, std)
    held_ref = bq.features(original, len(held), lambda i, j: held_x[i:j], 32, "original")
    train_u8 = load_training_photos(args.images, train, round(size * 8 / 7)) if train else None
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(args.crop_scale, 1.0), antialias=True),
                          v2.RandomHorizontalFlip()])

    def batch(n: int = args.batch) -> torch.Tensor:
        if args.on_held:
            idx = [rng.randrange(len(held)) for _ in range(n)]
            x = held_x[idx]
            return torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x, x.flip(-1))
        idx = [rng.randrange(len(train)) for _ in range(n)]
        x = torch.stack([augment(train_u8[i]) for i in idx]).float() / 255
        return (x - mean_t) / std_t

    student = convert(copy.deepcopy(original), args.ratio, method=args.method)
    chosen = [(n, p) for n, p in student.named_parameters() if PARAM_SETS[args.params](n, p)]
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    if not chosen:
        raise SystemExit(f"error: --params {args.params} selects no parameter of this model")
    start_values = {n: p.detach().clone() for n, p in chosen}
    optimizer = torch.optim.Adam([p for _, p in chosen], lr=args.lr)
    teacher_cls, teacher_handles = class_tokens(original) if args.deep else ([], [])
    student_cls, student_handles = class_tokens(student) if args.deep else ([], [])

    def held_cosines() -> np.ndarray:
        out = bq.features(student, len(held), lambda i, j: held_x[i:j], 32, "student")
        student_cls.clear()
        return agreement(out, held_ref).numpy()

    start = held_cosines()
    evals = [{"step": 0, **bq.summary(start)}]
    bq.log(f"step 0: held-out mean {start.mean():.4f} ({len(held)} photos); training {len(chosen)} tensors, "
           f"{sum(p.numel() for _, p in chosen)} values")
    if args.fit_keep:
        from ltm_convert.finetune.keep_fit import KEEP_FIT_SCALE, fit_keep_terms

        sizes = [min(32, args.fit_keep - i) for i in range(0, args.fit_keep, 32)]
        for round_ in range(1, args.fit_rounds + 1):
            report = fit_keep_terms(student, (batch(n) for n in sizes), seed=args.seed + round_ - 1,
                                    scale=KEEP_FIT_SCALE if args.fit_scale is None else args.fit_scale)
            cos = held_cosines()
            diff = bq.paired_bootstrap(cos, start, args.seed)
            evals.append({"step": 0, "after": "fit_keep", "round": round_, **bq.summary(cos), "minus_start": diff,
                          "fit_keep": report})
            r2 = [b["r2"] for b in report["blocks"].values()] or [float("nan")]
            bq.log(f"keep fit {round_} on {report['images']} views ({report['seconds']:.0f} s, R2 {min(r2):.3f}-"
                   f"{max(r2):.3f}): held-out mean {cos.mean():.4f}, minus start "
                   f"{bq.fmt_ci(diff['diff_mean'], diff['diff_mean_ci'])}")
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        set_merge_mode(student, args.soft)
        x = batch()
        teacher_cls.clear()
        student_cls.clear()
        with torch.no_grad():
            target = original(x)
        out = student(x)
        loss = (1 - F.cosine_similarity(out, target, dim=1)).mean()
        if args.deep:
            deep = sum((1 - F.cosine_similarity(s, t.detach(), dim=1)).mean() for s, t in zip(student_cls, teacher_cls))
            loss = loss + args.deep * deep / len(teacher_cls)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for _, p in chosen], args.clip_grad)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            cos = held_cosines()
            diff = bq.paired_bootstrap(cos, start, args.seed)
            evals.append({"step": step, **bq.summary(cos), "minus_start": diff,
                          "loss_last": float(np.mean(losses[-args.eval_every:]))})
            bq.log(f"step {step}: held-out mean {cos.mean():.4f}, minus start "
                   f"{bq.fmt_ci(diff['diff_mean'], diff['diff_mean_ci'])}")
    for h in teacher_handles + student_handles:
        h.remove()
    changed = sorted(n for n, p in chosen if not torch.equal(p.detach(), start_values[n]))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "versions": bq.versions(), "held_out": len(held), "train": len(train), "evals": evals,
              "losses": losses, "trained_tensors": [n for n, _ in chosen], "changed_tensors": changed,
              "seconds": time.time() - started}
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    last = evals[-1]
    fit = f"keep fit on {args.fit_keep} views, " if args.fit_keep else ""
    print(f"{args.method}@{args.ratio} {fit}--params {args.params} lr {args.lr:g}, {args.steps} steps: held-out mean "
          f"{evals[0]['mean']:.4f} -> {last['mean']:.4f}, minus start "
          f"{bq.fmt_ci(last['minus_start']['diff_mean'], last['minus_start']['diff_mean_ci'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
