"""How much faster is a fine-tuning step of a converted model? The real Trainer step, timed.

    python benchmarks/bench_train.py                          # bundled DINOv2 ViT-S/14, 224 px, batch 32
    python benchmarks/bench_train.py --ratios 0.5 --steps 3 --json train.json

For the bundled model converted at each ratio (LTM and ToMe) and for the original (the same model
converted at 1.0, which merges nothing, so the step runs the same code), it times
``Trainer.train_step`` (tools/train_speed.py): teacher forward, student forward and backward, AdamW.

* ``hard``: `--train all --training-merge hard` (the merge of inference; the recipe that helps);
* ``relaxed``: `--train mask --training-merge relaxed` (LTM only: every token stays, weighted, so
  the student does at least the original's work plus the masks').

The teacher's forward is timed on its own; "student" is the step without it. The goal of the issue
is a hard-merge student step at least 0.9 x (1 / FLOPs ratio) faster than the original's.
Progress goes to stderr, the Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65, 0.5])
    p.add_argument("--methods", nargs="+", default=["ltm", "tome"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-relaxed", action="store_true", help="skip the relaxed-merge rows")
    p.add_argument("--tiny", action="store_true", help="a random-weight ViT-Ti at 32 px (tests)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU seconds of this process on one thread (for a shared, loaded machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (--clock cpu needs 1)")
    p.add_argument("--interleave", action="store_true",
                   help="build every trainer first, then time them round-robin (one step each per round) and "
                        "report per-round paired speed-ups: for a machine whose load drifts")
    args = p.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.clock == "cpu":
        torch.set_num_threads(1)
    from speed_models import finish, speed_model

    from ltm_convert.api import convert
    from ltm_convert.flops import count_flops
    from ltm_convert.tools.train_speed import make_trainer, time_steps

    base, size = speed_model("tiny" if args.tiny else "bundled", args.size)
    flops0 = count_flops(base, size)
    runs = [("original", 1.0, "ltm", "hard")]
    for method in args.methods:
        for ratio in args.ratios:
            runs.append((f"{method}@{ratio:g}", ratio, method, "hard"))
            if method == "ltm" and not args.no_relaxed:
                runs.append((f"{method}@{ratio:g}", ratio, method, "relaxed"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    clock = "CPU seconds of this process" if args.clock == "cpu" else "wall seconds"
    print(f"CPU, {torch.get_num_threads()} threads, load {load:.1f} at start; batch {args.batch}, {size[0]} px, "
          f"median of {args.steps} steps after {args.warmup} warm-up (quartiles in brackets), {clock}.\n", flush=True)
    print("| model | merge | FLOPs ratio | step s | im/s | teacher s | student s | student speed-up | ideal "
          "| / ideal |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.interleave:
        results = interleaved(args, base, size, flops0, runs)
        finish(results, args.json_out, T0, batch=args.batch, size=size)
        return 0
    results, base_student = [], None
    for name, ratio, method, merge in runs:
        log(f"{name} ({merge}) ...")
        student = convert(copy.deepcopy(base), ratio, method=method, input_size=size)
        fr = count_flops(student, size) / flops0
        trainer = make_trainer(student, batch=args.batch, size=size, train="all" if merge == "hard" else "mask",
                               training_merge=merge)
        t = time_steps(trainer, steps=args.steps, warmup=args.warmup, clock=args.clock)
        student_s = t.step_s - (t.teacher_s or 0.0)
        base_student = base_student or student_s
        sp = base_student / student_s
        print(f"| {name} | {merge} | {fr:.3f} | {t.step_s:.2f} ({t.quartiles_s[0]:.2f}-{t.quartiles_s[1]:.2f}) | "
              f"{t.images_per_s:.2f} | {t.teacher_s:.2f} | {student_s:.2f} | {sp:.2f}x | {1 / fr:.2f}x | "
              f"{sp * fr:.2f} |", flush=True)
        results.append({"model": name, "merge": merge, "flops_ratio": fr, "step_s": t.step_s,
                        "quartiles_s": t.quartiles_s, "teacher_s": t.teacher_s, "student_s": student_s,
                        "student_speedup": sp, "of_ideal": sp * fr, "samples_s": t.samples_s})
        del trainer, student
    finish(results, args.json_out, T0, batch=args.batch, size=size)
    return 0


def interleaved(args: argparse.Namespace, base, size, flops0: float, runs: list) -> list[dict]:
    """Every trainer built first, then timed round-robin (tools/train_speed.time_steps_interleaved):
    a row's student speed-up is the median over rounds of the original's student time over its own,
    both from the same round, with the round's teacher forward taken off each."""
    import statistics

    from ltm_convert.api import convert
    from ltm_convert.flops import count_flops
    from ltm_convert.tools.train_speed import make_trainer, time_steps_interleaved

    trainers, fr = {}, {}
    for name, ratio, method, merge in runs:
        log(f"building {name} ({merge}) ...")
        student = convert(copy.deepcopy(base), ratio, method=method, input_size=size)
        fr[(name, merge)] = count_flops(student, size) / flops0
        trainers[(name, merge)] = make_trainer(student, batch=args.batch, size=size,
                                               train="all" if merge == "hard" else "mask", training_merge=merge)
    log(f"timing {len(trainers)} trainers round-robin, {args.steps} rounds ...")
    samples, teacher = time_steps_interleaved(trainers, steps=args.steps, warmup=args.warmup, clock=args.clock)
    key0 = next(iter(trainers))
    base_student = [o - t for o, t in zip(samples[key0], teacher)]
    results = []
    for key, steps in samples.items():
        student = [s - t for s, t in zip(steps, teacher)]
        ratios = sorted(b / s for b, s in zip(base_student, student))
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
        sp, f = statistics.median(ratios), fr[key]
        step_s = statistics.median(steps)
        print(f"| {key[0]} | {key[1]} | {f:.3f} | {step_s:.2f} | {args.batch / step_s:.2f} | "
              f"{statistics.median(teacher):.2f} | {statistics.median(student):.2f} | {sp:.2f}x ({q[0]:.2f}-{q[2]:.2f}) | "
              f"{1 / f:.2f}x | {sp * f:.2f} |", flush=True)
        results.append({"model": key[0], "merge": key[1], "flops_ratio": f, "step_s": step_s, "samples_s": steps,
                        "teacher_s": statistics.median(teacher), "teacher_samples_s": teacher,
                        "student_s": statistics.median(student), "student_speedup": sp,
                        "student_speedup_quartiles": (q[0], q[2]), "of_ideal": sp * f})
    return results


if __name__ == "__main__":
    sys.exit(main())
