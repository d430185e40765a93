"""What keeps `ltm-convert convert --dry-run` cheap, held without timing anything (2 shared cores).

The dry run of a ViT-B must cost at most 1.5 s beyond importing torch and timm and building the
model (benchmarks/bench_convert.py measures it). The savings that got it there change costs, never
results: the lean trace gives the graph and the plan of the full one, conversion runs no garbage
collection, the CLI freezes its heap before Python's exit collections, and a timm model never
imports transformers.
"""
from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys

import pytest
import torch

import model_zoo

TIMEOUT = 600


def _node_key(graph: torch.fx.Graph) -> list[tuple]:
    """Everything a family can read of a node, but its Python stack trace."""
    out = []
    for n in graph.nodes:
        val = n.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else repr(val)
        out.append((n.op, str(n.target), n.name, repr(n.args), repr(n.kwargs), repr(n.meta.get("nn_module_stack")),
                    shape, str(getattr(val, "dtype", None))))
    return out


def _models():
    """One model of each kind of graph the families read: timm and HF token sequences, class
    attention, 2-D patch grids."""
    import timm

    yield "timm vit", model_zoo.timm_model("vit-token"), None
    yield "hf ViTForImageClassification", model_zoo.hf_model("ViTForImageClassification"), None
    name, kwargs = model_zoo.CLASS_ATTENTION_TIMM["cait"]
    yield "timm cait", timm.create_model(name, pretrained=False, **kwargs).eval(), None
    yield "timm mobilevit", model_zoo.grid_model("mobilevit-xxs"), (128, 128)


def test_lean_trace_gives_the_full_traces_graph_and_plan(monkeypatch):
    import torch.fx.config as fx_config

    from ltm_convert import tracer
    from ltm_convert.analysis.graph import export_graph
    from ltm_convert.rewriters import plan_for

    for what, model, size in _models():
        lean = tracer.analyse(model, size)
        with monkeypatch.context() as m:
            m.setattr(tracer, "export_graph", functools.partial(export_graph, lean=False))
            full = tracer.analyse(model, size)
        assert not any("stack_trace" in n.meta for n in lean.facts.graph.nodes), what
        assert any("stack_trace" in n.meta for n in full.facts.graph.nodes), what  # the full trace records them
        assert _node_key(lean.facts.graph) == _node_key(full.facts.graph), what
        (lean_family, lean_plan), (full_family, full_plan) = plan_for(lean), plan_for(full)
        assert lean_family.name == full_family.name and lean_plan.to_dict() == full_plan.to_dict(), what
    assert not fx_config.do_not_emit_stack_traces  # the global flag is put back
    model = model_zoo.timm_model("vit-token")
    x = model_zoo.images_for(model, batch=1)
    with torch.no_grad():  # the lazily compiled graph module runs as the model does
        assert torch.allclose(export_graph(model).module()(x), model(x), atol=1e-5)


def test_conversion_runs_no_garbage_collection(monkeypatch):
    """A full collection walks the whole process (torch, timm, the model), and the trace and the
    counts make enough garbage to trigger one. With thresholds this low, any collection while the
    pipeline runs would show; collection is back on afterwards and finds the garbage left."""
    from ltm_convert import api

    model = model_zoo.timm_model("vit-token")
    api.convert(model, 0.7)  # first-use imports out of the way
    seen: list[int] = []
    inside: list[list[int]] = []
    pipeline = api._convert

    def watched(*args, **kwargs):
        start = len(seen)
        try:
            return pipeline(*args, **kwargs)
        finally:
            inside.append(seen[start:])

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    monkeypatch.setattr(api, "_convert", watched)
    old = gc.get_threshold()
    gc.callbacks.append(record)
    gc.set_threshold(50, 1, 1)
    try:
        converted = api.convert(model, 0.7)
        assert gc.isenabled()
        before = len(seen)
        assert gc.collect() > 0  # the conversion's garbage in cycles, collectable now
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(record)
    assert len(inside) == 1 and not inside[0], f"conversion ran {sum(map(len, inside))} garbage collections"
    assert len(seen) > before
    assert abs(api.describe(converted)["flops_ratio"] - 0.7) <= 0.05  # a conversion like any other


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LTM_DEBUG", None)
    return env


def test_cli_dry_run_of_a_timm_model_imports_no_transformers(tmp_path):
    """The real CLI in a subprocess; ``-X importtime`` lists every module the process imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ltm_convert.cli", "convert", "vit_tiny_patch16_224",
         "--no-pretrained", "--dry-run", "--model-kwargs", "depth=2", "--model-kwargs", "img_size=32",
         "--model-kwargs", "patch_size=8"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dry run: nothing written" in done.stdout and "FLOPs ratio" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "timm" in imported and "torch" in imported  # the listing is complete
    assert not {m for m in imported if m.split(".")[0] == "transformers"}, "the dry run imported transformers"
    assert not list(tmp_path.iterdir()), "the dry run wrote a file"


@pytest.mark.parametrize("args", [["--version"], ["convert"]])
def test_cli_freezes_its_heap_before_the_exit_collections(tmp_path, args):
    """Python's last collections at exit walk every live object (~1 s of a dry run on 2 cores);
    the CLI freezes the heap in an exit handler first, on success and on error alike. An exit
    handler registered before the CLI runs after the CLI's, and sees the frozen heap."""
    code = ("import atexit, gc, runpy, sys\n"
            "atexit.register(lambda: sys.stderr.write(f'frozen objects: {gc.get_freeze_count()}\\n'))\n"
            f"sys.argv = ['ltm-convert', *{args!r}]\n"
            "runpy.run_module('ltm_convert.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == (0 if args == ["--version"] else 2), done.stderr[-2000:]
    frozen = [int(line.split(":")[1]) for line in done.stderr.splitlines() if line.startswith("frozen objects:")]
    assert frozen and frozen[0] > 10_000, done.stderr[-2000:]
