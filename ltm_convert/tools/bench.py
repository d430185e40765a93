"""Measure converted models against their original: FLOPs, parameters, latency, throughput, agreement.

Everything a benchmark table needs, as functions (the CLI lives in ``commands/bench.py``):

* FLOPs with ``torch.utils.flop_counter`` (``flops.count_flops``, batch 1, the unit of every ratio);
* latency per batch size, the original and each converted model timed **back to back in the same
  process**, in alternating order (O,C then C,O ...), after warm-up; the speed-up of a model is the
  median over repeats of t_original / t_converted of the adjacent pair, which cancels most of the
  drift a shared machine adds; latencies are medians;
* fp32 on CPU, autocast (bf16 by default, or fp16) on GPU, optionally ``torch.compile``;
* agreement (``ltm_convert.metrics``): cosine of the main output (logits / pooled feature; a token
  sequence averaged; of several feature maps the last) with the original's on a batch of images, in
  fp32 eager mode; each row names the output it compared (``compared``).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ltm_convert.metrics import agreement as output_agreement
from ltm_convert.model_inputs import (
    example_input,
    main_output,
    main_output_name,
    planned_input_size,
    run_model,
)
from ltm_convert.device import pick_device

DEFAULT_BATCHES_CPU = (1, 8, 32)
DEFAULT_BATCHES_GPU = (1, 8, 32, 256)


def default_batches(device: str | torch.device) -> tuple[int, ...]:
    return DEFAULT_BATCHES_GPU if torch.device(device).type == "cuda" else DEFAULT_BATCHES_CPU


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def agreement(original: nn.Module, converted: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """:func:`ltm_convert.metrics.agreement` of the converted model with the original, per image
    (mean, min), and which output it compared (:func:`main_output_name`: for a model with several
    feature maps, the last one)."""
    with torch.inference_mode():
        out = run_model(converted, images)
        cos = output_agreement(main_output(out).float(), main_output(run_model(original, images)).float())
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "compared": main_output_name(out)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_runner(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                compile: bool = False, backend: str = "inductor") -> Callable[[torch.Tensor], Any]:
    """A callable that runs one inference forward of ``model`` (compiled if asked) and waits for it."""
    from ltm_convert.model_inputs import call_kwargs

    model = model.to(device).eval()
    fn = torch.compile(model, fullgraph=True, dynamic=False, backend=backend) if compile else model

    def run(x: torch.Tensor) -> Any:
        args, kwargs = call_kwargs(model, x)  # read from the model: a compiled wrapper hides its signature
        with torch.inference_mode(), _autocast(device, amp_dtype):
            out = fn(*args, **kwargs)
        _sync(device)
        return out

    return run


CLOCKS = ("wall", "cpu")


def clock_fn(name: str) -> Any:
    """``wall``: elapsed seconds. ``cpu``: this process's CPU seconds, for a CPU run on one thread on
    a shared machine: the work done, untouched by the time other processes hold the core (with
    more threads it would also count the spin-waits of OpenMP workers, so it is refused there)."""
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}; choose one of {', '.join(CLOCKS)}")
    if name == "cpu" and torch.get_num_threads() != 1:
        raise ValueError("the cpu clock measures one thread's work; call torch.set_num_threads(1) first")
    return time.process_time if name == "cpu" else time.perf_counter


def _time(run: Callable[[torch.Tensor], Any], x: torch.Tensor, now: Callable[[], float] = time.perf_counter) -> float:
    start = now()
    run(x)
    return now() - start


@dataclass
class Timing:
    batch: int
    latency_s: dict[str, float] = field(default_factory=dict)  # median seconds per batch
    throughput: dict[str, float] = field(default_factory=dict)  # images / s
    speedup: dict[str, float] = field(default_factory=dict)  # median paired t_orig / t_conv
    samples: dict[str, list[float]] = field(default_factory=dict)


def time_against_original(original: Callable, converted: dict[str, Callable], x: torch.Tensor, *,
                          repeats: int = 5, warmup: int = 1, group: int = 1,
                          warmup_input: torch.Tensor | None = None, clock: str = "wall") -> Timing:
    """Time the converted runners against the original, ``repeats`` times.

    The converted models go in groups of ``group``; each group is timed right next to one run of the
    original (before it on even repeats, after it on odd ones), and a model's speed-up is the median
    over repeats of t_original / t_converted within its group. group=1 gives strict pairs; a larger
    group costs fewer original runs on a slow machine. ``clock``: see :func:`clock_fn`.
    """
    now = clock_fn(clock)
    wx = x if warmup_input is None else warmup_input
    for _ in range(warmup):
        original(wx)
        for run in converted.values():
            run(wx)
    names = list(converted)
    groups = [names[i:i + max(1, group)] for i in range(0, len(names), max(1, group))]
    samples: dict[str, list[float]] = {"original": [], **{k: [] for k in converted}}
    ratios: dict[str, list[float]] = {k: [] for k in converted}
    for r in range(repeats):
        for i, members in enumerate(groups):
            first = (r + i) % 2 == 0
            t_o = _time(original, x, now) if first else None
            times = {name: _time(converted[name], x, now) for name in (members if first else reversed(members))}
            if t_o is None:
                t_o = _time(original, x, now)
            samples["original"].append(t_o)
            for name, t_c in times.items():
                samples[name].append(t_c)
                ratios[name].append(t_o / t_c)
    batch = x.shape[0]
    timing = Timing(batch=batch, samples=samples)
    for name, values in samples.items():
        med = statistics.median(values)
        timing.latency_s[name] = med
        timing.throughput[name] = batch / med
    for name, values in ratios.items():
        timing.speedup[name] = statistics.median(values)
    return timing


def resolve_amp(dtype: str | None, device: torch.device) -> torch.dtype | None:
    """'bf16' / 'fp16' / 'fp32' -> the autocast dtype (None = fp32). CPU always runs fp32."""
    if device.type != "cuda":
        return None
    name = (dtype or "bf16").lower()
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": None, "float32": None}[name]


def benchmark(original: nn.Module, converted: dict[str, nn.Module], *, batches: Sequence[int] | None = None,
              repeats: int = 5, warmup: int = 1, device: str | torch.device | None = None,
              dtype: str | None = None, compile: bool = False, images: torch.Tensor | None = None,
              input_size: tuple[int, int] | None = None, group: int = 1,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark converted models (name -> model) against ``original``; returns a JSON-able dict.

    ``images`` (real photos, optional) give the agreement column; timing uses random inputs of the
    planned resolution (the content does not change the static shapes, hence not the time).
    """
    from ltm_convert.api import ltm_parameters, merge_counts
    from ltm_convert.flops import count_flops

    dev = pick_device(str(device) if device is not None else None)
    amp = resolve_amp(dtype, dev)
    batches = list(batches or default_batches(dev))
    size = planned_input_size(next(iter(converted.values()), original), input_size)
    say = log or (lambda _msg: None)

    base_flops = count_flops(original, size)
    base_params = count_params(original)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in converted.items():
        config = model.ltm_config
        flops = count_flops(model, size)
        rows[name] = {
            "name": name,
            "method": config.method,
            "ratio": config.ratio,
            "flops": flops,
            "flops_ratio": flops / base_flops,
            "ideal_speedup": base_flops / flops,
            "params": count_params(model),
            "params_added": sum(p.numel() for _, p in ltm_parameters(model)),
            "tokens_out": [b["tokens_out"] for b in merge_counts(model)],
        }
        if images is not None:
            rows[name].update(agreement(original, model, images))

    run_o = make_runner(original, dev, amp, compile)
    runs = {name: make_runner(model, dev, amp, compile) for name, model in converted.items()}
    timings = []
    for batch in batches:
        say(f"timing batch {batch} ...")
        x = example_input(original, size, batch=batch, device=dev)
        wx = x[: min(batch, 4)] if dev.type == "cpu" else x  # CPU: warm up on a small batch (cheap)
        t = time_against_original(run_o, runs, x, repeats=repeats, warmup=warmup, group=group, warmup_input=wx)
        timings.append(t)
        for name in converted:
            rows[name].setdefault("timing", {})[str(batch)] = {
                "latency_ms": 1e3 * t.latency_s[name],
                "throughput": t.throughput[name],
                "speedup": t.speedup[name],
            }
    original_row = {
        "flops": base_flops,
        "params": base_params,
        "timing": {str(t.batch): {"latency_ms": 1e3 * t.latency_s["original"],
                                  "throughput": t.throughput["original"]} for t in timings},
    }
    return {
        "device": _device_name(dev),
        "dtype": "fp32" if amp is None else str(amp).replace("torch.", ""),
        "compile": compile,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "input_size": list(size),
        "batches": batches,
        "repeats": repeats,
        "group": group,
        "original": original_row,
        "models": list(rows.values()),
        # every timed run, in order (pairs line up index by index when group=1): for spreads
        "samples_ms": {str(t.batch): {k: [1e3 * v for v in vals] for k, vals in t.samples.items()} for t in timings},
    }


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def convert_all(original: nn.Module, ratios: Iterable[float], methods: Iterable[str], *,
                input_size: tuple[int, int] | None = None, log: Callable[[str], None] | None = None
                ) -> dict[str, nn.Module]:
    """Convert ``original`` once per (method, ratio); keys are "method@ratio"."""
    from ltm_convert.api import convert

    say = log or (lambda _msg: None)
    out = {}
    for method in methods:
        for ratio in ratios:
            say(f"converting {method} at ratio {ratio:g} ...")
            out[f"{method}@{ratio:g}"] = convert(original, ratio, method=method, input_size=input_size)
    return out


def table_rows(result: dict[str, Any], batch: int | None = None) -> list[dict[str, Any]]:
    """Flat rows for a table: one per converted model, timing at ``batch`` (default: the largest)."""
    batch = batch or max(result["batches"])
    rows = []
    for row in result["models"]:
        t = row.get("timing", {}).get(str(batch), {})
        rows.append({
            "method": row["method"], "ratio": row["ratio"], "flops_ratio": row["flops_ratio"],
            "ideal_speedup": row["ideal_speedup"], "speedup": t.get("speedup"),
            "efficiency": (t["speedup"] / row["ideal_speedup"]) if t.get("speedup") else None,
            "latency_ms": t.get("latency_ms"), "throughput": t.get("throughput"),
            "cosine_mean": row.get("cosine_mean"), "cosine_min": row.get("cosine_min"),
            "params_added": row["params_added"],
        })
    return rows


def markdown_table(result: dict[str, Any], batch: int | None = None) -> str:
    """The issue's table as Markdown: speed-up at ``batch`` next to 1 / FLOPs ratio, agreement."""
    batch = batch or max(result["batches"])
    base = result["original"]["timing"].get(str(batch), {})
    lines = [
        f"Device: {result['device']}, {result['dtype']}, torch {result['torch']}, input "
        f"{result['input_size'][0]}x{result['input_size'][1]}, batch {batch}, median of {result['repeats']} "
        f"paired repeats{', torch.compile' if result['compile'] else ''}. Original: "
        f"{result['original']['flops'] / 1e9:.2f} GFLOPs/image, {base.get('latency_ms', float('nan')):.0f} ms/batch, "
        f"{base.get('throughput', float('nan')):.1f} im/s.",
        "",
        "| method | target ratio | FLOPs ratio | 1/FLOPs ratio | measured speed-up | speed-up / ideal "
        "| im/s | cosine (mean / min) | params added |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows(result, batch):
        cos = "-" if r["cosine_mean"] is None else f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        ips = "-" if r["throughput"] is None else f"{r['throughput']:.1f}"
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['flops_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
                     f"{sp} | {eff} | {ips} | {cos} | {r['params_added']:,} |")
    return "\n".join(lines)
