"""Read-only graph work shared by every family: the export graph of the whole model and facts about it.

The model is traced once with ``torch.export`` (non-strict), which works on every timm and HF
vision model measured so far. Node ``nn_module_stack`` metadata maps each node back to
its module. :class:`GraphFacts` answers data-dependence and ancestry questions over the graph;
:func:`residuals` lists every residual add with what its branch computes (attention, an MLP, other).

Nothing here mutates the model.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from ltm_convert.errors import UnsupportedModelError
from ltm_convert.model_inputs import call_kwargs, example_input

aten = torch.ops.aten

ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._softmax.default,
    aten.softmax.int,
    aten._safe_softmax.default,
}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.mm.default}
LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
SHAPE_ONLY = {aten.sym_size.int, operator.mul, operator.add, operator.floordiv}


@contextlib.contextmanager
def lean_trace(lean: bool = True) -> Iterator[None]:
    """torch.export settings that change what a trace costs, not the graph it gives (the same nodes,
    targets, shapes and module paths; tests/test_dry_run_cost.py holds them equal): no Python stack trace
    recorded for each node (``node.meta["stack_trace"]``, which nothing here reads; about a fifth
    of a ViT-B trace) and graph modules that write their Python code when first run rather than
    after each of export's passes. Conversion holds its process-wide lock around the trace, so the
    global flag is set and restored in one thread."""
    if not lean:
        yield
        return
    import torch.fx.config as fx_config

    try:  # private in torch 2.x: without it, only the stack traces are skipped
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:  # pragma: no cover - older / newer torch
        _use_lazy_graph_module = None
    old = getattr(fx_config, "do_not_emit_stack_traces", False)
    fx_config.do_not_emit_stack_traces = True
    try:
        with _use_lazy_graph_module(True) if _use_lazy_graph_module is not None else contextlib.nullcontext():
            yield
    finally:
        fx_config.do_not_emit_stack_traces = old


def export_graph(model: nn.Module, input_size: tuple[int, int] | None = None,
                 lean: bool = True) -> torch.export.ExportedProgram:
    """torch.export the model on a batch of one image; the graph the matcher reads (``lean``: see
    :func:`lean_trace`)."""
    images = example_input(model, input_size)
    args, kwargs = call_kwargs(model, images)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), lean_trace(lean):
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export failures carry long messages; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"not supported yet: torch.export could not trace {type(model).__name__} ({first[:200]})"
        ) from exc
    finally:
        model.train(was_training)


def module_calls(model: nn.Module, input_size: tuple[int, int] | None) -> dict[str, tuple[tuple, dict]]:
    """How one real forward calls each module: (args, kwargs) of its first call. Exported graphs
    can call blocks differently (HF builds attention masks while exporting), so this is eager."""
    from ltm_convert.model_inputs import run_model

    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(mod, a, k, _name=name):
            calls.setdefault(_name, (a, dict(k)))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run_model(model, example_input(model, input_size))
    finally:
        for h in handles:
            h.remove()
    return calls


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return clean_path(path)


def clean_path(path: str) -> str:
    # export paths look like "blocks.0.attn" or "L['self'].blocks[0]"; normalise the latter
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").split("["):
        out.extend(p for p in part.split(".") if p)
    return ".".join(p.strip("'\"") for p in out)


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


class GraphFacts:
    """Data dependence and ancestry over an export graph."""

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        self.graph = ep.graph
        self.graph_module = ep.graph_module
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        user_inputs = set(ep.graph_signature.user_inputs)
        self.params = {n for n in self.nodes if n.op == "placeholder" and n.name not in user_inputs}
        self.data: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                if n.name in user_inputs:
                    self.data.add(n)
            elif n.op == "call_function" and n.target not in SHAPE_ONLY:
                if any(a in self.data for a in n.all_input_nodes):
                    self.data.add(n)
        # ancestors as integer bit sets over the topological order: cheap to build and to test
        self._anc: dict[fx.Node, int] = {}
        for n in self.nodes:
            bits = 0
            for a in n.all_input_nodes:
                bits |= self._anc[a] | (1 << self.order[a])
            self._anc[n] = bits

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """True when a feeds b (directly or not)."""
        return bool(self._anc[b] >> self.order[a] & 1)

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        bits = self._anc[node]
        return {n for n in self.nodes if bits >> self.order[n] & 1}

    def branch(self, start: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes on paths from start to end (exclusive of start, inclusive of end)."""
        bits = self._anc[end] | (1 << self.order[end])
        return [n for n in self.nodes if bits >> self.order[n] & 1 and n is not start and self.is_ancestor(start, n)]

    def is_attention(self, nodes: Iterable[fx.Node]) -> fx.Node | None:
        for n in nodes:
            if n.op != "call_function":
                continue
            if n.target in ATTENTION_OPS:
                return n
            if n.target in MATMUL_OPS and len(n.args) >= 2:
                a, b = n.args[0], n.args[1]
                if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self.data and b in self.data:
                    return n
            if isinstance(n.target, torch._ops.HigherOrderOperator) and self._hop_attention(n):
                return n
        return None

    def _hop_attention(self, node: fx.Node) -> bool:
        """A wrapped region (autocast, checkpoint) that multiplies two of its data inputs together,
        as EfficientViT's ReLU linear attention does inside ``wrap_with_autocast``."""
        subs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        data_in = [a for a in node.all_input_nodes if a in self.data]
        if not subs or len(data_in) < 2:
            return False
        sub = getattr(self.graph_module, str(subs[0].target), None)
        if not isinstance(sub, fx.GraphModule):
            return False
        return any(m.op == "call_function" and m.target in MATMUL_OPS | {torch.matmul, operator.matmul}
                   for m in sub.graph.nodes)

    def linears(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        found = []
        for n in nodes:
            if n.op != "call_function":
                continue
            if n.target in LINEAR_OPS and any(a in self.params for a in n.all_input_nodes):
                found.append(n)
            elif n.target == aten.conv2d.default and len(n.args) > 1 and shape_of(n.args[1]) is not None:
                w = shape_of(n.args[1])
                groups = n.args[6] if len(n.args) > 6 else 1
                if w and w[-1] == 1 and w[-2] == 1 and groups == 1:
                    found.append(n)
        return found


@dataclass
class Residual:
    add: fx.Node
    skip: fx.Node
    branch_out: fx.Node
    kind: str  # "attention" | "mlp" | "other"
    attn_node: fx.Node | None
    linears: list[fx.Node]


def residuals(facts: GraphFacts) -> list[Residual]:
    found = []
    for n in facts.nodes:
        if n.op != "call_function" or n.target not in (aten.add.Tensor, operator.add):
            continue
        a, b = (n.args + (None, None))[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if a not in facts.data or b not in facts.data:
            continue
        if facts.is_ancestor(a, b):
            skip, out = a, b
        elif facts.is_ancestor(b, a):
            skip, out = b, a
        else:
            continue
        branch = facts.branch(skip, out)
        attn = facts.is_attention(branch)
        lins = facts.linears(branch)
        kind = "attention" if attn is not None else ("mlp" if len(lins) >= 2 else "other")
        found.append(Residual(n, skip, out, kind, attn, lins))
    return found




# ops that pass their input through unchanged in eval mode (layouts, copies, dropout)
PASSTHROUGH_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                   aten.contiguous.default, aten.alias.default, aten.dropout.default, aten.detach.default,
                   operator.getitem}
LAYOUT_ONLY_OPS = {aten.transpose.int, aten.permute.default, aten.flatten.using_ints}


def passthrough_source(node: fx.Node, layout_too: bool = True) -> fx.Node:
    """Follow identity-like ops (and, if asked, pure re-layouts) back to the tensor they pass on."""
    ops = PASSTHROUGH_OPS | LAYOUT_ONLY_OPS if layout_too else PASSTHROUGH_OPS
    while (node.op == "call_function" and node.target in ops and node.args
           and isinstance(node.args[0], fx.Node) and not (node.target is operator.getitem)):
        node = node.args[0]
    return node


NORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
CONV_OPS = {aten.conv2d.default, aten.conv2d.padding}


def is_local_conv(node: fx.Node) -> bool:
    """A depth-wise 2-D convolution with stride 1 that keeps its map's shape (TinyViT's
    ``local_conv``): every token of the output is computed from its own channel's neighbours."""
    if node.op != "call_function" or node.target not in CONV_OPS or len(node.args) < 2:
        return False
    src, out = shape_of(node.args[0]), shape_of(node)
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
    strides = list(stride) if isinstance(stride, (list, tuple)) else [stride]
    return (src is not None and src == out and len(src) == 4 and src[1] > 1 and groups == src[1]
            and all(s == 1 for s in strides))


def through_local_convs(node: fx.Node, limit: int = 16) -> tuple[fx.Node, list[fx.Node]]:
    """Follow ``node`` back through re-layouts, eval-mode batch norms and local convolutions
    (:func:`is_local_conv`): the tensor they were computed from, and the convolutions passed.

    Why: TinyViT runs a depth-wise convolution between its attention residual and its MLP residual
    (``x = local_conv(x + attn(x)); x = x + mlp(x)``). The block is still "attention residual, then
    MLP residual" for a family that merges only inside the MLP; a family that shortens the token
    sequence after the attention must refuse it (tracer.Analysis.between)."""
    convs: list[fx.Node] = []
    for _ in range(limit):
        node = passthrough_source(node)
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            break
        inner = node.args[0]
        if node.target is operator.getitem and node.args[1] == 0 and inner.op == "call_function" \
                and inner.target in NORM_OPS:
            node = inner
        elif node.target in NORM_OPS:
            node = inner
        elif is_local_conv(node):
            convs.append(node)
            node = inner
        else:
            break
    return node, convs


def common_prefix(paths: list[str]) -> str:
    """The longest module path that every path lies in ("" if they share none)."""
    split = [p.split(".") for p in paths if p is not None]
    prefix = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            prefix.append(parts[0])
        else:
            break
    return ".".join(prefix)
