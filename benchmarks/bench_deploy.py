"""Does the speed-up survive deployment? ONNX Runtime (CPU) and torch.compile, each against its own original.

    python benchmarks/bench_deploy.py                        # bundled DINOv2 ViT-S/14, 224 px, batch 32
    python benchmarks/bench_deploy.py --runtimes onnx --ratios 0.5 --json deploy.json
    python benchmarks/bench_deploy.py --tiny                 # random ViT-Ti at 32 px (tests)

Every model (the original, LTM and ToMe at each ratio) is exported with ``ltm-convert export``'s
code (tools/export.py, checked against PyTorch with onnxruntime) and run in an onnxruntime CPU
session, and compiled with ``torch.compile(fullgraph=True)`` (inductor). In each runtime the
converted model is timed in pairs with that runtime's original (tools/bench.py), so the speed-up
compares like with like; ideal is 1 / FLOPs ratio. Progress on stderr, the table on stdout.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def onnx_runner(model: Any, size: tuple[int, int], folder: Path, name: str) -> Callable:
    import onnxruntime as ort
    import torch

    from ltm_convert.tools.export import export_onnx, verify_onnx

    path = export_onnx(model, folder / f"{name}.onnx", input_size=size)
    verify_onnx(model, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> Any:
        return session.run(None, {"images": x.numpy()})

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", nargs="+", default=["onnx", "compile"], choices=["onnx", "compile", "eager"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.65, 0.5])
    p.add_argument("--methods", nargs="+", default=["ltm", "tome"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU seconds of this process on one thread (for a shared, loaded machine)")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (--clock cpu needs 1)")
    args = p.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.clock == "cpu":
        torch.set_num_threads(1)
    from speed_models import finish, speed_model

    from ltm_convert.api import convert
    from ltm_convert.flops import count_flops
    from ltm_convert.model_inputs import example_input
    from ltm_convert.tools.bench import make_runner, time_against_original

    base, size = speed_model("tiny" if args.tiny else "bundled", args.size)
    flops0 = count_flops(base, size)
    models = {"original": base}
    for method in args.methods:
        for ratio in args.ratios:
            log(f"converting {method} at {ratio:g} ...")
            models[f"{method}@{ratio:g}"] = convert(copy.deepcopy(base), ratio, method=method, input_size=size)
    fr = {k: count_flops(m, size) / flops0 for k, m in models.items()}
    x = example_input(base, size, batch=args.batch)
    load = os.getloadavg()[0]
    print(f"CPU, {torch.get_num_threads()} threads, load {load:.1f} at start; batch {args.batch}, {size[0]} px, "
          f"median of {args.repeats} paired repeats against the same runtime's original, "
          f"{'CPU seconds of this process' if args.clock == 'cpu' else 'wall seconds'}.\n", flush=True)
    print("| runtime | model | FLOPs ratio | ideal | speed-up (q1-q3) | / ideal | im/s | original im/s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ltm_deploy.") as tmp:
        for runtime in args.runtimes:
            log(f"{runtime}: preparing the runners ...")
            if runtime == "onnx":
                runs = {k: onnx_runner(m, size, Path(tmp), k.replace("@", "_")) for k, m in models.items()}
            else:
                runs = {k: make_runner(m, torch.device("cpu"), None, compile=runtime == "compile")
                        for k, m in models.items()}
            for k in models:  # compile / first-run costs before any timing
                runs[k](x[:2] if runtime == "onnx" else x)
            for k in list(models)[1:]:
                log(f"{runtime}: timing {k} ...")
                t = time_against_original(runs["original"], {k: runs[k]}, x, repeats=args.repeats, warmup=1,
                                          clock=args.clock)
                pairs = sorted(a / b for a, b in zip(t.samples["original"], t.samples[k]))
                q1, q3 = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
                sp = t.speedup[k]
                print(f"| {runtime} | {k} | {fr[k]:.3f} | {1 / fr[k]:.2f}x | {sp:.2f}x ({q1:.2f}-{q3:.2f}) | "
                      f"{sp * fr[k]:.2f} | {t.throughput[k]:.1f} | {t.throughput['original']:.1f} |", flush=True)
                results.append({"runtime": runtime, "model": k, "flops_ratio": fr[k], "speedup": sp,
                                "of_ideal": sp * fr[k], "images_per_s": t.throughput[k],
                                "original_images_per_s": t.throughput["original"], "pairs": pairs})
    finish(results, args.json_out, T0, batch=args.batch, size=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
