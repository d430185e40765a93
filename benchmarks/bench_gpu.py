"""Every GPU question in one command, inside a time budget, printing each row as it is measured.

    python benchmarks/bench_gpu.py                       # one H100/H200: at most --budget seconds (450)
    python benchmarks/bench_gpu.py --json gpu.json --md gpu.md
    python benchmarks/bench_gpu.py --smoke               # the same code on CPU, tiny model, seconds

What it measures (random weights: speed does not depend on the weights):

1. bf16 inference throughput of ViT-B/16 and ViT-L/16 at 224 px, batch 256, eager and
   ``torch.compile(fullgraph=True)``: the original, LTM and ToMe at 0.8 / 0.65 / 0.5, each timed in
   pairs with the original (tools/bench.py), speed-up against the ideal 1 / FLOPs ratio, and the
   peak memory of one forward;
2. fine-tuning images/s in bf16 with the real Trainer step (`--train all --training-merge hard`,
   teacher forward included; tools/train_speed.py): the original (the same model converted at 1.0,
   which merges nothing) against LTM at 0.5, the teacher's share, and peak memory.

GPU time is short and may be cut off, so the cheap answers come first (eager before compile, ViT-B
before ViT-L) and every row is printed the moment it is measured. A row that would not fit in what
is left of ``--budget`` is printed as skipped, with the reason, instead of being started.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

T0 = time.time()
HEADER = ("| model | mode | method | ratio | FLOPs ratio | ideal | speed-up | / ideal | im/s | peak MB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def emit(line: str, lines: list[str]) -> None:
    print(line, flush=True)
    lines.append(line)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny ViT, batch 4: checks the code in seconds")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    p.add_argument("--archs", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65, 0.5])
    p.add_argument("--methods", nargs="+", default=["ltm", "tome"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--md", dest="md_out", default=None, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    if args.smoke:
        args.archs, args.ratios, args.batch, args.train_batch, args.repeats = ["tiny"], [0.5], 4, 4, 2
    return args


class Budget:
    """What is left of --budget; ``fits(estimate)`` says whether a step of that many seconds may start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def fits(self, estimate: float) -> bool:
        return self.left() > estimate


def timed(run: Callable, x: Any) -> float:
    start = time.perf_counter()
    run(x)  # tools/bench.py runners wait for the device before they return
    return time.perf_counter() - start


def peak_memory(run: Callable, x: Any, device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(x)
    return torch.cuda.max_memory_allocated(device) / 2**20


def inference_rows(name: str, original: Any, converted: dict[str, Any], size: tuple[int, int], args: argparse.Namespace,
                   device: Any, compile: bool, budget: Budget, lines: list[str], results: list[dict]) -> None:
    import torch

    from ltm_convert.flops import count_flops
    from ltm_convert.model_inputs import example_input
    from ltm_convert.tools.bench import make_runner, time_against_original

    mode = "compile" if compile else "eager"
    amp = torch.bfloat16 if device.type == "cuda" else None
    backend_note = ""
    if compile and device.type != "cuda":
        backend_note = " (eager backend)"  # smoke: dynamo's fullgraph capture without inductor's C++ build
    base = count_flops(original, size)
    x = example_input(original, size, batch=args.batch, device=device)

    def runner(model: Any) -> Callable:
        return make_runner(model, device, amp, compile, backend="inductor" if device.type == "cuda" else "eager")

    start = time.time()
    run_o = runner(original)
    run_o(x)
    first = time.time() - start  # compile (or warm-up) time of one model: the estimate for the next
    peak_o = peak_memory(run_o, x, device)
    t_o = statistics.median(timed(run_o, x) for _ in range(args.repeats))
    emit(f"| {name} | {mode}{backend_note} | original | 1 | 1.000 | 1.00x | 1.00x | - | {args.batch / t_o:.1f} | "
         f"{peak_o if peak_o is None else round(peak_o)} |", lines)
    results.append({"model": name, "mode": mode, "method": "original", "ratio": 1.0, "images_per_s": args.batch / t_o,
                    "peak_mb": peak_o})
    for key, model in converted.items():
        method, ratio = key.split("@")
        if not budget.fits(first + 4 * args.repeats * t_o):
            emit(f"| {name} | {mode} | {method} | {ratio} | - | - | skipped: {budget.left():.0f} s of the budget left "
                 f"| - | - | - |", lines)
            continue
        flops = count_flops(model, size) / base
        run = runner(model)
        peak = peak_memory(run, x, device)
        t = time_against_original(run_o, {key: run}, x, repeats=args.repeats, warmup=1)
        sp = t.speedup[key]
        emit(f"| {name} | {mode}{backend_note} | {method} | {ratio} | {flops:.3f} | {1 / flops:.2f}x | {sp:.2f}x | "
             f"{sp * flops:.2f} | {t.throughput[key]:.1f} | {peak if peak is None else round(peak)} |", lines)
        results.append({"model": name, "mode": mode, "method": method, "ratio": float(ratio), "flops_ratio": flops,
                        "speedup": sp, "of_ideal": sp * flops, "images_per_s": t.throughput[key], "peak_mb": peak,
                        "samples_s": t.samples[key]})


def finetune_rows(name: str, original: Any, size: tuple[int, int], args: argparse.Namespace, device: Any,
                  budget: Budget, lines: list[str], results: list[dict]) -> None:
    import copy

    from ltm_convert.api import convert
    from ltm_convert.tools.train_speed import make_trainer, time_steps

    emit("", lines)
    emit(f"Fine-tuning ({name}, batch {args.train_batch}, bf16 autocast on GPU, `--train all --training-merge hard`, "
         "teacher forward included):", lines)
    emit("", lines)
    emit("| model | student | step ms (q1-q3) | im/s | teacher ms | speed-up | peak MB |\n|---|---|---|---|---|---|---|",
         lines)
    base_step = None
    for label, ratio in (("original (converted at 1.0)", 1.0), ("ltm@0.5", 0.5)):
        if base_step is not None and not budget.fits(3 * 8 * base_step):
            emit(f"| {name} | {label} | skipped: {budget.left():.0f} s left | - | - | - | - |", lines)
            continue
        student = convert(copy.deepcopy(original), ratio, input_size=size)
        trainer = make_trainer(student, batch=args.train_batch, size=size, device=str(device))
        t = time_steps(trainer, steps=args.repeats, warmup=2)
        base_step = base_step or t.step_s
        peak = "-" if t.peak_mem_mb is None else f"{t.peak_mem_mb:.0f}"
        emit(f"| {name} | {label} | {1e3 * t.step_s:.1f} ({1e3 * t.quartiles_s[0]:.1f}-{1e3 * t.quartiles_s[1]:.1f}) | "
             f"{t.images_per_s:.1f} | {1e3 * (t.teacher_s or 0):.1f} | {base_step / t.step_s:.2f}x | {peak} |", lines)
        results.append({"model": name, "finetune": label, "ratio": ratio, "step_s": t.step_s,
                        "images_per_s": t.images_per_s, "teacher_s": t.teacher_s, "peak_mb": t.peak_mem_mb,
                        "samples_s": t.samples_s})
        del trainer, student


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from speed_models import speed_model

    from ltm_convert.tools.bench import convert_all

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("error: no GPU here; run with --smoke to check the code on CPU", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    lines: list[str] = []
    results: list[dict] = []
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    emit(f"Device: {gpu}, torch {torch.__version__}, batch {args.batch}, bf16 autocast on GPU, median of "
         f"{args.repeats} paired repeats; budget {args.budget:.0f} s.", lines)
    emit("", lines)
    emit(HEADER, lines)
    models: dict[str, tuple[Any, dict[str, Any], tuple[int, int]]] = {}
    plan = [(arch, False) for arch in args.archs]
    plan.insert(1, ("finetune", None))  # fine-tuning of the first model right after its eager rows
    if not args.no_compile:
        plan += [(arch, True) for arch in args.archs]
    for arch, compile in plan:
        if arch == "finetune":
            name, (original, _, size) = next(iter(models.items()))
            finetune_rows(name, original, size, args, device, budget, lines, results)
            emit("", lines)
            emit(HEADER, lines)
            continue
        if arch not in models:
            if not budget.fits(20):
                emit(f"| {arch} | - | skipped: {budget.left():.0f} s left |", lines)
                continue
            log(f"building and converting {arch} ...")
            original, size = speed_model("tiny" if args.smoke else arch)
            converted = convert_all(original, args.ratios, args.methods, input_size=size, log=log)
            models[arch] = (original, converted, size)
        original, converted, size = models[arch]
        name = "tiny" if args.smoke else arch.split("_patch")[0]
        log(f"{name}: {'compile' if compile else 'eager'} rows ...")
        inference_rows(name, original, converted, size, args, device, compile, budget, lines, results)
    log(f"done in {time.time() - T0:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": gpu, "rows": results}, indent=1))
    if args.md_out:
        Path(args.md_out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
