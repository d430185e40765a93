"""The LTM paper's claim in miniature: trained from scratch with one recipe, does a merged model
beat the unmerged one? Fashion-MNIST, MobileViT-XXS and a small ViT, original / LTM / ToMe.

    python benchmarks/bench_scratch.py --json scratch.json                      # the full run (~1 h, 2 cores)
    python benchmarks/bench_scratch.py --data x/usr/share/datasets/fashion-mnist --models vit --seeds 0 1 2
    python benchmarks/bench_scratch.py --smoke --data DIR                       # seconds (tests)

Every run goes through ``ltm_convert.finetune.scratch.train_from_scratch`` (what ``ltm-convert train``
runs): timm's transforms with RandAugment and random erasing, Mixup / CutMix with label smoothing,
AdamW, cosine schedule with warm-up (EMA off here, see RECIPE). The recipe is the same for every
arm; only the model changes (``--set key=value`` changes a recipe field for every arm alike).
ToMe does not exist for MobileViT (its blocks run on 2-D patch grids, which only LTM keeps): that
arm is reported as n/a.

For each model x seed, in this order:

* **equal epochs**: the original, LTM at ``--ratio`` and ToMe at ``--ratio`` (the ratio is a FLOPs
  fraction, so both merged arms have the same FLOPs; the table shows each arm's counted FLOPs)
  train ``--epochs`` epochs on the same class-balanced subset from the same initial weights;
* **equal wall time**: each merged arm trains the number of steps that fits the original's
  training time at the merged arm's *measured* step rate (images/s of its equal-epochs runs
  against the original's, each run's least disturbed epoch, the median over seeds; not assumed
  from FLOPs), on a cosine schedule
  whose length is rounded up to whole epochs and cut at that step. Training time excludes
  validation, which is the same work for every arm. A merged arm that is no faster gets the
  equal-epochs run again (reused, not re-run).

Val top-1 is the model's (not the EMA's, which is in the JSON); the difference to the original is
paired per seed (same initial weights, same images), reported as mean ± sample standard deviation
over seeds. A difference no larger than that spread is a tie. Rows are printed as each run ends,
the JSON is rewritten after each run, so a cut-off run still reports.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402  (benchmarks/fmnist.py)

T0 = time.time()

# name: (timm model, constructor options, training resolution)
MODELS = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 6}, 28),  # ViT-Ti width (192, 3 heads), 49 tokens
    "mobilevit": ("mobilevit_xxs", {}, 64),
}
SMOKE_MODELS = {"vit": ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2}, 16)}
ARMS = ("original", "ltm", "tome")
# the recipe: train_from_scratch's defaults (the paper repository's) except what a run of minutes needs
# (EMA off: a run of ~100-200 steps has no use for an average over thousands, and the EMA's own
# validation pass would double the per-epoch evaluation; --set model_ema=true ema_decay=0.99 turns it on)
RECIPE = {"batch_size": 64, "warmup_epochs": 1, "model_ema": False, "save_every": 0, "progress": False}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (/proc/loadavg): how shared the cores were."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [float("nan")] * 3


# --------------------------------------------------------------------------------------------
# the adapter: one arm, one seed, through the training API


def training_api() -> Any:
    """``train_from_scratch``, or one line saying this checkout of ltm_convert lacks it."""
    from ltm_convert.errors import LtmError

    try:
        from ltm_convert.finetune.scratch import train_from_scratch
    except ImportError:
        raise LtmError("this benchmark drives ltm_convert.finetune.scratch.train_from_scratch (`ltm-convert train`), "
                       "which this checkout of ltm_convert lacks; update ltm_convert") from None
    return train_from_scratch


def train_arm(model: str, kwargs: dict, img_size: int, arm: str, ratio: float, seed: int, data: dict,
              recipe: dict, epochs: int, workdir: Path, max_steps: int | None = None) -> dict[str, Any]:
    """Train one arm from scratch with ``train_from_scratch``; its val top-1, time and FLOPs."""
    from ltm_convert.flops import count_flops

    train_from_scratch = training_api()

    options = dict(recipe, epochs=epochs, seed=seed, img_size=(img_size, img_size), model_kwargs=dict(kwargs),
                   max_steps=max_steps)
    options.update({"original": True} if arm == "original" else {"method": arm, "ratio": ratio})
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # its epoch lines: the log, not the table
        warnings.simplefilter("ignore")
        result = train_from_scratch(model, (data["train"], data["val"]), out_dir=workdir, **options)
    m, final = result.metrics, result.metrics["final"]
    return {"top1": final["val_top1"], "ema_top1": final.get("ema_val_top1"), "steps": final["step"],
            "epochs": epochs, "train_seconds": final["train_seconds"], "wall_seconds": final["wall_seconds"],
            "img_s": final["img_s"], "epoch_img_s": [e["img_s"] for e in m.get("epochs", [])],
            "steps_per_epoch": m["steps_per_epoch"],
            "flops": count_flops(result.model, (img_size, img_size))}


# --------------------------------------------------------------------------------------------
# statistics and the verdict


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def verdict(diffs: list[float]) -> str:
    """'better' / 'worse' when the mean paired difference exceeds its spread over seeds, else 'tie'."""
    if len(diffs) < 2:
        return "n/a (one seed)"
    mean, sd = statistics.fmean(diffs), spread(diffs)
    return "tie" if abs(mean) <= sd else ("better" if mean > 0 else "worse")


def summarise(runs: list[dict], model: str, regime: str) -> list[dict]:
    """Per arm: top-1 mean, spread, per seed, and the paired difference to the original's same seed."""
    base = {r["seed"]: r for r in runs if r["model"] == model and r["arm"] == "original" and r["regime"] == "epochs"}
    rows = []
    for arm in ARMS:
        mine = sorted((r for r in runs if r["model"] == model and r["arm"] == arm
                       and r["regime"] == ("epochs" if arm == "original" else regime)), key=lambda r: r["seed"])
        if not mine:
            continue
        if "error" in mine[0]:
            rows.append({"model": model, "arm": arm, "regime": regime, "skipped": mine[0]["error"]})
            continue
        top = [r["top1"] for r in mine]
        diffs = [r["top1"] - base[r["seed"]]["top1"] for r in mine if r["seed"] in base and "top1" in base[r["seed"]]]
        row = {"model": model, "arm": arm, "regime": regime, "seeds": [r["seed"] for r in mine], "top1": top,
               "mean": statistics.fmean(top), "std": spread(top), "flops": mine[0]["flops"],
               "train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
               "steps": statistics.fmean(r["steps"] for r in mine)}
        if arm != "original" and diffs:
            row.update(diff=statistics.fmean(diffs), diff_std=spread(diffs), diffs=diffs, verdict=verdict(diffs))
        rows.append(row)
    return rows


def table(rows: list[dict], base_flops: float) -> str:
    out = ["| model | arm | regime | FLOPs (M) | FLOPs ratio | steps | train s | top-1 mean ± std | per seed "
           "| top-1 - original (paired) | merged vs unmerged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r['arm']} | {r['regime']} | | | | | n/a: {r['skipped']} | | | |")
            continue
        diff = f"{r['diff']:+.4f} ± {r['diff_std']:.4f}" if "diff" in r else "(reference)"
        out.append(f"| {r['model']} | {r['arm']} | {r['regime']} | {r['flops'] / 1e6:.1f} | {r['flops'] / base_flops:.3f} "
                   f"| {r['steps']:.0f} | {r['train_seconds']:.0f} | {r['mean']:.4f} ± {r['std']:.4f} | "
                   f"{', '.join(f'{v:.4f}' for v in r['top1'])} | {diff} | {r.get('verdict', '')} |")
    return "\n".join(out)


def claim_line(rows: list[dict], model: str, regime: str) -> str:
    """One plain sentence per model and regime: does 'merged beats unmerged' hold? It holds for an arm
    whose paired difference to the original is above its spread over seeds; within it is a tie."""
    said = {r["arm"]: f"{r['arm']} {r['verdict']} ({r['diff']:+.4f} ± {r['diff_std']:.4f})" for r in rows if "verdict" in r}
    if not said:
        return f"{model}, equal {regime}: no merged arm finished."
    verdicts = {r["arm"]: r["verdict"] for r in rows if "verdict" in r}
    if all(v.startswith("n/a") for v in verdicts.values()):
        return f"{model}, equal {regime}: one seed, no spread: cannot tell ({'; '.join(said.values())})."
    wins = [arm for arm, v in verdicts.items() if v == "better"]
    if wins:
        head = f"'merged beats unmerged' HOLDS at this scale for {', '.join(wins)}"
    elif any(v == "worse" for v in verdicts.values()):
        head = "'merged beats unmerged' does NOT hold at this scale (merged is worse or tied)"
    else:
        head = "'merged beats unmerged' does NOT hold at this scale (a tie: differences within the spread)"
    return f"{model}, equal {regime}: {head}: {'; '.join(said.values())}."


# --------------------------------------------------------------------------------------------
# the run


def best_rate(run: dict) -> float:
    """A run's images/s in its least disturbed epoch: the cores are shared, and a busy minute should
    not decide how long another arm trains."""
    return max(run.get("epoch_img_s") or [run["img_s"]])


def equal_time_steps(runs: list[dict], model: str, arm: str, epochs: int,
                     warmup_epochs: int = 0) -> tuple[float, int, int | None]:
    """(speed ratio, epochs, max_steps) of the equal-wall-time run: the steps that fit the original's
    training time at this arm's measured rate (median over seeds of its best-epoch images/s over the
    original's, same seed)."""
    base = {r["seed"]: r for r in runs if r["model"] == model and r["arm"] == "original" and "img_s" in r}
    ratios = [best_rate(r) / best_rate(base[r["seed"]]) for r in runs
              if r["model"] == model and r["arm"] == arm and r["regime"] == "epochs" and "img_s" in r and r["seed"] in base]
    speed = statistics.median(ratios)
    spe = next(r["steps_per_epoch"] for r in runs if r["model"] == model and "steps_per_epoch" in r)
    steps = max(1, round(epochs * spe * speed))
    n_epochs = max(math.ceil(steps / spe), warmup_epochs + 1)  # the schedule needs an epoch past the warm-up
    return speed, n_epochs, (None if steps == n_epochs * spe else steps)


class Recorder:
    """The runs so far, rewritten to the JSON after each one; run lines printed as they end."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path, self.meta, self.runs, self.summary = path, meta, [], []

    def add(self, run: dict) -> None:
        self.runs.append(run)
        if "error" in run:
            print(f"  {run['model']} {run['arm']} seed {run['seed']}: n/a ({run['error']})", flush=True)
        else:
            ema = f", EMA {run['ema_top1']:.4f}" if run.get("ema_top1") is not None else ""
            print(f"  {run['model']} {run['arm']:8s} equal {run['regime']:5s} seed {run['seed']}: top-1 {run['top1']:.4f}"
                  f"{ema}; {run['steps']} steps ({run['epochs']} ep{', cut at max_steps' if run.get('max_steps') else ''}), "
                  f"{run['train_seconds']:.0f} s training, {run['img_s']:.1f} img/s, load {run['load'][0]:.1f}", flush=True)
        self.write()

    def write(self, **extra: Any) -> None:
        self.meta.update(extra)
        if self.path:
            from ltm_convert.safe_write import replace_atomically

            text = json.dumps({**self.meta, "runs": self.runs, "summary": self.summary}, indent=1, default=str)
            replace_atomically(Path(self.path), lambda tmp: Path(tmp).write_text(text))


def run_model(key: str, spec: tuple, args: argparse.Namespace, data: dict, rec: Recorder, workroot: Path) -> None:
    name, kwargs, size = spec
    recipe = dict(RECIPE, **args.set)

    def one(arm: str, seed: int, regime: str, epochs: int, max_steps: int | None = None) -> None:
        started = loadavg()
        run = {"model": key, "arm": arm, "seed": seed, "regime": regime, "max_steps": max_steps, "load_start": started}
        if any(r["model"] == key and r["arm"] == arm and "error" in r for r in rec.runs):
            return
        log(f"{key} {arm} seed {seed}, equal {regime}: {epochs} epochs" + (f", {max_steps} steps" if max_steps else ""))
        from ltm_convert.errors import LtmError

        try:
            run.update(train_arm(name, kwargs, size, arm, args.ratio, seed, data, recipe, epochs,
                                 workroot / f"{key}-{arm}-{regime}-{seed}", max_steps))
        except LtmError as exc:  # e.g. ToMe on MobileViT's 2-D grids: that arm does not exist
            run["error"] = str(exc).split(";")[0]
        run["load"] = loadavg()
        rec.add(run)

    for seed in args.seeds:
        for arm in ARMS:
            one(arm, seed, "epochs", args.epochs)
    base = next((r["flops"] for r in rec.runs if r["model"] == key and r["arm"] == "original" and "flops" in r), None)
    rows = summarise(rec.runs, key, "epochs")
    print(f"\n{table(rows, base)}\n\n{claim_line(rows, key, 'epochs')}\n", flush=True)

    how = {}
    for arm in ARMS[1:]:
        if any(r["model"] == key and r["arm"] == arm and "error" in r for r in rec.runs):
            continue
        speed, epochs, max_steps = equal_time_steps(rec.runs, key, arm, args.epochs, recipe.get("warmup_epochs", 5))
        how[arm] = {"speed_ratio": speed, "epochs": epochs, "max_steps": max_steps}
        print(f"  {key} {arm}: measured {speed:.2f}x the original's images/s -> equal wall time is "
              f"{max_steps or epochs * next(r['steps_per_epoch'] for r in rec.runs if 'steps_per_epoch' in r)} steps "
              f"({epochs} epochs{' cut at that step' if max_steps else ''})", flush=True)
        for seed in args.seeds:
            if epochs == args.epochs and max_steps is None:  # no faster: the equal-epochs run is the answer
                same = next(r for r in rec.runs if r["model"] == key and r["arm"] == arm and r["seed"] == seed
                            and r["regime"] == "epochs")
                rec.add(dict(same, regime="time", reused=True))
            else:
                one(arm, seed, "time", epochs, max_steps)
    rows_t = summarise(rec.runs, key, "time")
    print(f"\n{table(rows_t, base)}\n\n{claim_line(rows_t, key, 'time')}\n", flush=True)
    rec.summary += rows + [r for r in rows_t if r["arm"] != "original"]
    rec.write(**{f"equal_time_{key}": how})


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set wants key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(fmnist.DEFAULT_DIR), help="the folder with Fashion-MNIST's four idx.gz files")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4, help="epochs of the equal-epochs runs (and the original's)")
    p.add_argument("--train", type=int, default=2000, help="class-balanced training images")
    p.add_argument("--val", type=int, default=1000, help="class-balanced validation images (from the test files)")
    p.add_argument("--ratio", type=float, default=0.8, help="FLOPs ratio of the merged arms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="a recipe field (ScratchConfig) for every arm, e.g. mixup=0 aa=none lr=0.002")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--workdir", default=None, help="where the runs' checkpoints go (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny ViT, a few steps: seconds (tests)")
    args = p.parse_args(argv)
    args.set = parse_set(args.set)

    import torch

    from ltm_convert.errors import LtmError

    torch.set_num_threads(args.threads)
    models = {k: MODELS[k] for k in args.models}
    if args.smoke:
        models = SMOKE_MODELS
        args.seeds, args.epochs = args.seeds[:2], 2
        args.train, args.val = min(args.train, 32), min(args.val, 16)
        args.set = {"batch_size": 8, **args.set}
    try:
        data = fmnist.subsets(args.data, args.train, args.val, seed=0)
        training_api()
    except LtmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = loadavg()
    recipe = dict(RECIPE, **args.set)
    print(f"Fashion-MNIST from {args.data}: {len(data['train'])} training / {len(data['val'])} validation images "
          f"(class-balanced); seeds {args.seeds}; {args.epochs} epochs; ratio {args.ratio:g}; torch "
          f"{torch.__version__}, {args.threads} threads; load {start[0]:.2f} {start[1]:.2f} {start[2]:.2f} at start.\n"
          f"Recipe (every arm): train_from_scratch defaults with {json.dumps(recipe, sort_keys=True)}.\n"
          "Equal wall time: steps that fit the original's training time at each merged arm's measured images/s "
          "(best epoch of each run, median over seeds), not assumed from FLOPs; wall time = training steps and data "
          "loading, validation excluded.\n", flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if start[0] > cores:
        print(f"note: load {start[0]:.1f} on {cores} cores: other work shares the cores; the images/s, and with them "
              "the equal-wall-time step counts, are noisy (the load of each run is in the JSON).\n", flush=True)
    meta = {"argv": sys.argv[1:] if argv is None else argv, "data": args.data, "train": len(data["train"]),
            "val": len(data["val"]), "seeds": args.seeds, "epochs": args.epochs, "ratio": args.ratio,
            "threads": args.threads, "recipe": recipe, "torch": torch.__version__, "load_start": start,
            "models": {k: list(v) for k, v in models.items()}}
    rec = Recorder(args.json_out, meta)
    with tempfile.TemporaryDirectory(prefix="bench_scratch.") as tmp:
        workroot = Path(args.workdir or tmp)
        try:
            for key, spec in models.items():
                run_model(key, spec, args, data, rec, workroot)
        except LtmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    end = loadavg()
    print(f"load {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} at the end (start {start[0]:.2f}); {time.time() - T0:.0f} s",
          flush=True)
    rec.write(load_end=end, seconds=time.time() - T0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
