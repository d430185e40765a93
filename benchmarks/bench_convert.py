"""How long conversion takes, phase by phase: what a user waits for before the first forward.

Converts timm ``vit_base_patch16_224`` (random weights) and the bundled real DINOv2 ViT-S/14 a few
times in this process and prints the median seconds of every phase (``model.ltm_timings``: trace =
torch.export + matching, match = family choice, build = merge modules in, flops = cost model,
solve = schedule, finish), then times the CLI dry run end to end in a fresh process (imports
included) against its floor, a fresh process that only imports torch and timm and builds the model
(also with exits alike, both with Python's exit collections or both skipping them as the CLI does,
to show what the CLI's cheaper exit is worth).

    python benchmarks/bench_convert.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


FLOOR = "import torch, timm; timm.create_model('vit_base_patch16_224', pretrained=False)"
DRY_RUN = ("import sys; from ltm_convert.cli import main\n"
           "sys.argv = ['ltm-convert', 'convert', 'vit_base_patch16_224', '--no-pretrained', '--dry-run']\n"
           "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
           "sys.stderr.write('transformers imported: %s\\n' % ('transformers' in sys.modules))\n")
# the same dry run with Python's exit collections (the CLI skips them: cli._freeze_heap_at_exit), to
# show how much of the dry run's lead over the floor is its cheaper exit
DRY_RUN_FULL_EXIT = DRY_RUN + "import atexit, gc; atexit.unregister(gc.freeze)\n"
# and the floor skipping them too: the dry run's own work beyond it, exits alike
FLOOR_FROZEN_EXIT = FLOOR + "; import atexit, gc; atexit.register(gc.freeze)"


def _timed(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stderr


def cli_dry_run(repeats: int) -> dict:
    """The CLI dry run end to end against its floor (a fresh process that imports torch and timm and
    builds the same model), interleaved so that all see the same machine load; also the dry run
    with Python's usual exit collections, against the same floor."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    floor, dry, over, over_full_exit, over_frozen, imported = [], [], [], [], [], set()
    for _ in range(repeats):
        f, _ = _timed(FLOOR)
        d, err = _timed(DRY_RUN)
        e, _ = _timed(DRY_RUN_FULL_EXIT)
        g, _ = _timed(FLOOR_FROZEN_EXIT)
        floor.append(f)
        dry.append(d)
        over.append(d - f)
        over_full_exit.append(e - f)
        over_frozen.append(d - g)
        imported.add("transformers imported: True" in err)
    q = lambda xs: [round(v, 2) for v in statistics.quantiles(xs, n=4)] if len(xs) > 1 else [round(xs[0], 2)] * 3  # noqa: E731
    return {"floor_s": q(floor), "dry_run_s": q(dry), "beyond_floor_s": q(over),
            "beyond_floor_full_exit_s": q(over_full_exit), "beyond_frozen_floor_s": q(over_frozen),
            "transformers_imported": any(imported),
            "loadavg_before": load_before, "loadavg": [round(v, 2) for v in os.getloadavg()]}


def load_times(repeats: int) -> dict:
    """``load`` of a saved ViT-B/16 (random weights) as files record it now (family + plan, replayed
    without torch.export) against the same file without its plan (re-planned, as before), paired."""
    import tempfile
    from pathlib import Path

    import timm

    from ltm_convert.api import convert
    from ltm_convert.io import load, save

    with tempfile.TemporaryDirectory() as tmp:
        replay, replan = Path(tmp) / "replay", Path(tmp) / "replan"
        save(convert(timm.create_model("vit_base_patch16_224", pretrained=False).eval(), 0.8), replay)
        shutil.copytree(replay, replan)
        recipe = json.loads((replan / "ltm_config.json").read_text())
        recipe.pop("plan")
        (replan / "ltm_config.json").write_text(json.dumps(recipe))
        times: dict[str, list[float]] = {"replayed": [], "re-planned": []}
        for _ in range(repeats):
            for name, path in (("replayed", replay), ("re-planned", replan)):
                start = time.perf_counter()
                load(path)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
    loads = load_times(args.repeats)
    phases = list(results[0]["seconds"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| model | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for r in results:
        print(f"| {r['model']} | " + " | ".join(f"{r['seconds'][p]:.2f}" for p in phases) + " |")
    print(f"\n`ltm-convert convert vit_base_patch16_224 --no-pretrained --dry-run` ({args.repeats} paired runs, "
          f"quartiles in s, load average {cli['loadavg_before']} before, {cli['loadavg']} after):")
    print(f"  floor (import torch, timm + build the model): {cli['floor_s']}")
    print(f"  dry run end to end:                          {cli['dry_run_s']}")
    print(f"  dry run beyond the floor (paired):           {cli['beyond_floor_s']}")
    print(f"  exits alike, both with Python's collections: {cli['beyond_floor_full_exit_s']}")
    print(f"  exits alike, both skipping them:             {cli['beyond_frozen_floor_s']}")
    print(f"  transformers imported: {cli['transformers_imported']}")
    print(f"\nload() of a saved ViT-B/16, median of {args.repeats}: plan replayed {loads['replayed']:.2f} s, "
          f"re-planned (files without a plan) {loads['re-planned']:.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"convert": results, "cli_dry_run": cli, "load_s": loads}, fh, indent=2)


if __name__ == "__main__":
    main()
