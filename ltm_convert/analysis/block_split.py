"""Split one block's own forward at its attention residual, without knowing its class.

The block is traced with torch.fx, every direct child module a leaf, through a shim that calls
the unwrapped ``forward`` (HF layers hide theirs behind a ``*args, **kwargs`` checkpointing
wrapper). In that graph the attention residual add is found by data flow: an add whose one input
comes from the block input and whose other comes from the attention child. The graph is then cut
in two Python functions over the block's own children:

* ``part_a(self, <block tensors>, ltm_attn_bias) -> z``: everything up to the residual add, with
  the proportional-attention bias fed to the attention child's mask argument;
* ``part_b(self, z, <side tensors>) -> output``: everything after it.

Both are generated code that reads ``self.<child>``, so the LTM block that runs them owns the
original children under their original names and the state-dict keys do not change.
"""
from __future__ import annotations

import inspect
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ltm_convert.config import is_ltm_name
from ltm_convert.errors import UnsupportedModelError

_MASK_PARAM_NAMES = ("attn_mask", "attention_mask", "mask", "attn_bias")


@dataclass
class BlockCall:
    """How the model calls a block: the bound arguments of one real call."""

    tensor_names: list[str]  # parameters that received tensors (become placeholders)
    constants: dict[str, Any]  # parameters that received anything else (frozen into the graph)
    x_name: str  # the token-sequence input


@dataclass
class SplitBlock:
    """The two halves of a block, as code to run with the LTM block as ``self``."""

    part_a: Callable[..., torch.Tensor]
    part_b: Callable[..., Any]
    a_inputs: list[str]
    b_inputs: list[str]
    constants: dict[str, Any]
    signature: inspect.Signature
    mask_param: str | None
    pre_norm: str | None  # the child that normalises the attention input, if one does
    code_a: str
    code_b: str


def unwrapped_forward(module: nn.Module, cls: type | None = None) -> Callable:
    return inspect.unwrap((cls or type(module)).forward)


def is_tensor_input(value: Any) -> bool:
    """A tensor, or a tuple / list of tensors (HF passes rotary tables as ``position_embeddings=(cos,
    sin)``): such an argument is an input of the cut code, never a constant frozen into it."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> BlockCall:
    """Record which of a block's parameters are tensors (or tuples of tensors) in a real call."""
    sig = inspect.signature(unwrapped_forward(module))
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    tensors, constants = [], {}
    for name, value in list(bound.arguments.items())[1:]:
        param = sig.parameters[name]
        if param.kind == param.VAR_POSITIONAL:
            if value:
                raise UnsupportedModelError(f"not supported yet: {type(module).__name__} is called with extra positional arguments")
            continue
        if param.kind == param.VAR_KEYWORD:
            for k, v in value.items():
                if is_tensor_input(v):
                    raise UnsupportedModelError(f"not supported yet: {type(module).__name__} receives tensor keyword {k!r}")
                constants[k] = v
            continue
        if is_tensor_input(value):
            tensors.append(name)
        else:
            constants[name] = value
    if not tensors:
        raise UnsupportedModelError(f"not supported yet: {type(module).__name__} receives no tensor input")
    return BlockCall(tensor_names=tensors, constants=constants, x_name=tensors[0])


class _ChildLeafTracer(fx.Tracer):
    """Treat each direct child of the traced block as an opaque call."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = {id(m) for m in root.children()}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)


_PROXIES: dict[type, type] = {}


def _proxy_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` fx may replace: tracing never touches ``cls`` itself,
    so other threads running blocks of that class are unaffected."""
    proxy = _PROXIES.get(cls)
    if proxy is None:
        proxy = _PROXIES[cls] = type(f"_LtmTrace{cls.__name__}", (cls,), {"__module__": __name__})
    return proxy


def trace_block(block: nn.Module, call: BlockCall, cls: type | None = None) -> fx.Graph:
    """fx-trace ``cls.forward`` (default: the block's class), unwrapped, on the block's own children,
    with its non-tensor arguments frozen."""
    cls = cls or type(block)
    fn = inspect.unwrap(cls.forward)
    sig = inspect.signature(fn)
    concrete = {}
    for name, param in list(sig.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in call.tensor_names:
            concrete[name] = call.constants.get(name, param.default)
    # fx reads the signature of type(root).forward: trace a proxy object of a subclass whose forward
    # is the unwrapped one, sharing the block's children, parameters and attributes
    proxy_cls = _proxy_class(cls)
    proxy_cls.forward = _strip_var_keyword(fn)
    proxy = proxy_cls.__new__(proxy_cls)
    proxy.__dict__.update(block.__dict__)
    proxy.training = False  # blocks are always cut as in eval mode (as convert traces them)
    try:
        return _ChildLeafTracer(proxy).trace(proxy, concrete_args=concrete)
    except Exception as exc:
        raise UnsupportedModelError(
            f"not supported yet: torch.fx cannot trace {cls.__name__}.forward ({str(exc).splitlines()[0][:160]})"
        ) from exc


def _strip_var_keyword(fn: Callable) -> Callable:
    """A shim with fn's named parameters and no ``*args``/``**kwargs`` (fx reads the code object)."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    src = (f"def forward({', '.join(names)}):\n"
           f"    return fn({names[0]}, {', '.join(f'{n}={n}' for n in names[1:])})\n")
    scope: dict[str, Any] = {"fn": fn}
    exec(src, scope)
    return scope["forward"]


def _depends(node: fx.Node, sources: set[fx.Node], memo: dict[fx.Node, bool]) -> bool:
    if node in memo:
        return memo[node]
    result = node in sources or any(_depends(a, sources, memo) for a in node.all_input_nodes)
    memo[node] = result
    return result


def _mask_param(attn: nn.Module) -> str | None:
    params = inspect.signature(unwrapped_forward(attn)).parameters
    for name in _MASK_PARAM_NAMES:
        if name in params:
            return name
    return None


_SPLITS: dict[tuple, SplitBlock] = {}
_SPLIT_LOCK = threading.Lock()


def structure_key(block: nn.Module, cls: type, attn_child: str, call: BlockCall) -> tuple:
    """What the cut of a block depends on: its class, its children's names and types, its plain
    attributes (forward may branch on them) and how it is called. Blocks with equal keys share one
    cut, so a 12-block ViT is traced once, not twelve times."""
    plain = tuple(sorted((k, v) for k, v in vars(block).items()
                         if isinstance(v, (bool, int, float, str, type(None))) and not k.startswith("_") and not is_ltm_name(k)
                         and k != "training"))
    children = tuple((n, type(c)) for n, c in block.named_children() if not is_ltm_name(n))
    constants = repr(sorted(call.constants.items(), key=lambda kv: kv[0]))
    return (cls, attn_child, tuple(call.tensor_names), call.x_name, constants, children, plain)


def split_block(block: nn.Module, attn_child: str, call: BlockCall, cls: type | None = None) -> SplitBlock:
    """Cut the block's graph at the attention residual add into part_a and part_b (cached per
    :func:`structure_key`). ``cls``: the class whose forward is cut (default: the block's own)."""
    cls = cls or type(block)
    key = structure_key(block, cls, attn_child, call)
    with _SPLIT_LOCK:
        found = _SPLITS.get(key)
    if found is not None:
        return found
    split = _split(block, attn_child, call, cls)
    with _SPLIT_LOCK:
        return _SPLITS.setdefault(key, split)


def _split(block: nn.Module, attn_child: str, call: BlockCall, cls: type) -> SplitBlock:
    graph = trace_block(block, call, cls)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    x = placeholders.get(call.x_name)
    if x is None:
        raise UnsupportedModelError(f"not supported yet: {type(block).__name__}'s token input was not traced")
    attn_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == attn_child]
    if len(attn_nodes) != 1:
        raise UnsupportedModelError(
            f"not supported yet: {type(block).__name__} calls its attention {attn_child!r} {len(attn_nodes)} times"
        )
    attn_node = attn_nodes[0]
    from_x: dict[fx.Node, bool] = {}
    from_attn: dict[fx.Node, bool] = {}
    z = None
    for n in graph.nodes:
        if n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2:
            a, b = n.args
            if not all(isinstance(v, fx.Node) for v in (a, b)):
                continue
            ax, bx = _depends(a, {attn_node}, from_attn), _depends(b, {attn_node}, from_attn)
            if ax != bx and _depends(a if bx else b, {x}, from_x):
                z = n
                break
    if z is None:
        raise UnsupportedModelError(
            f"not supported yet: no residual add after the attention in {type(block).__name__} (post-norm or parallel block?)"
        )
    anc_z: set[fx.Node] = set()
    stack = [z]
    while stack:
        n = stack.pop()
        if n in anc_z:
            continue
        anc_z.add(n)
        stack.extend(n.all_input_nodes)
    output = next(n for n in graph.nodes if n.op == "output")
    from_z: dict[fx.Node, bool] = {}
    part_b_nodes = [n for n in graph.nodes if n is not z and n.op != "output" and _depends(n, {z}, from_z)]
    # part_b may read placeholders other than x (side inputs) and constants, but not x nor part_a values
    for n in part_b_nodes:
        for a in n.all_input_nodes:
            if a is z or a in part_b_nodes:
                continue
            if a.op == "get_attr":
                continue
            if a.op == "placeholder" and a is not x:
                continue
            raise UnsupportedModelError(
                f"not supported yet: the MLP half of {type(block).__name__} reads {a.name!r} from before the merge"
            )
    spatial = _spatial_child(block, part_b_nodes)
    if spatial is not None:
        raise UnsupportedModelError(
            f"not supported yet: the MLP half of {type(block).__name__} runs a 2-D convolution ({spatial}) on the "
            "token grid, which a merged (shorter) token sequence cannot feed"
        )
    mask_param = _mask_param(getattr(block, attn_child))
    first_arg = attn_node.args[0] if attn_node.args else None
    pre_norm = first_arg.target if isinstance(first_arg, fx.Node) and first_arg.op == "call_module" else None

    # ---- graph A: block inputs (+ bias) -> z
    ga = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    a_inputs = []
    for n in graph.nodes:
        if n.op == "placeholder" and n.target in call.tensor_names:
            env[n] = ga.placeholder(n.target)
            a_inputs.append(n.target)
        elif n.op == "placeholder" and any(u in anc_z or u in part_b_nodes for u in n.users):
            raise UnsupportedModelError(f"not supported yet: {type(block).__name__} uses its frozen argument {n.target!r}")
    bias = ga.placeholder("ltm_attn_bias")
    for n in graph.nodes:
        if n.op == "placeholder" or n not in anc_z:
            continue
        new = ga.node_copy(n, lambda v: env[v])
        if n is attn_node and mask_param is not None:
            _set_mask_arg(new, getattr(block, attn_child), mask_param, bias)
        env[n] = new
    ga.output(env[z])

    # ---- graph B: z (+ side inputs) -> output
    gb = fx.Graph()
    envb: dict[fx.Node, fx.Node] = {z: gb.placeholder("ltm_z")}
    b_inputs = []
    for n in graph.nodes:
        if (n.op == "placeholder" and n is not x and n.target in call.tensor_names
                and any(n in m.all_input_nodes for m in part_b_nodes + [output])):
            envb[n] = gb.placeholder(n.target)
            b_inputs.append(n.target)
    for n in part_b_nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in envb:
                envb[a] = gb.node_copy(a, lambda v: envb[v])
        envb[n] = gb.node_copy(n, lambda v: envb[v])
    result = output.args[0]
    info = getattr(graph._codegen, "pytree_info", None)  # a tuple argument frozen (HF's resolution=(h, w)):
    if info is not None and info.out_spec is not None:   # fx flattened the output; the halves return it as is
        result = pytree.tree_unflatten(list(result), info.out_spec)
    gb.output(fx.map_arg(result, lambda v: envb[v] if v in envb else _extra_attention_output(v, attn_node, block)))

    code_a, fn_a = _compile(ga, block)
    code_b, fn_b = _compile(gb, block)
    return SplitBlock(
        part_a=fn_a, part_b=fn_b, a_inputs=a_inputs, b_inputs=b_inputs, constants=call.constants,
        signature=inspect.signature(unwrapped_forward(block, cls)), mask_param=mask_param, pre_norm=pre_norm, code_a=code_a, code_b=code_b,
    )


def _extra_attention_output(v: fx.Node, attn_node: fx.Node, block: nn.Module) -> None:
    """A block that returns its attention's second output as is (HF V-JEPA 2's ``(hidden_states,
    attn_weights)``): weights over the tokens before the merge, which no merged block can give; the
    converted block returns None there, as the model does under SDPA. Anything else from before the
    merge is refused."""
    if v.op == "call_function" and v.target is operator.getitem and v.args[0] is attn_node \
            and isinstance(v.args[1], int) and v.args[1] >= 1:
        return None
    raise UnsupportedModelError(f"not supported yet: {type(block).__name__} returns {v.name!r} from before the merge")


def _spatial_child(block: nn.Module, nodes: list[fx.Node]) -> str | None:
    """The first child called in ``nodes`` that holds a convolution with a kernel wider than one
    (TinyViT's ``local_conv`` after the attention residual): it mixes grid neighbours, so the tokens
    it reads must be the full grid, never merged ones."""
    for n in nodes:
        if n.op != "call_module":
            continue
        child = block.get_submodule(str(n.target))
        if any(isinstance(m, nn.modules.conv._ConvNd) and any(k > 1 for k in m.kernel_size) for m in child.modules()):
            return str(n.target)
    return None


def _set_mask_arg(node: fx.Node, attn: nn.Module, param: str, bias: fx.Node) -> None:
    sig = inspect.signature(unwrapped_forward(attn))
    names = [p for p in sig.parameters if p != "self"]
    args = list(node.args)
    idx = names.index(param)
    kwargs = dict(node.kwargs)
    if idx < len(args):
        if args[idx] is not None:
            raise UnsupportedModelError(f"not supported yet: the block already passes an attention mask to {type(attn).__name__}")
        args[idx] = bias
    else:
        if kwargs.get(param) is not None:
            raise UnsupportedModelError(f"not supported yet: the block already passes an attention mask to {type(attn).__name__}")
        kwargs[param] = bias
    node.args, node.kwargs = tuple(args), kwargs


def _compile(graph: fx.Graph, root: nn.Module) -> tuple[str, Callable]:
    """Python source for the graph with ``self`` as the root module, and the compiled function."""
    graph.lint()
    code = graph.python_code(root_module="self")
    globals_ = dict(code.globals)
    exec(compile(code.src, f"<ltm_convert {type(root).__name__}>", "exec"), globals_)
    return code.src, globals_["forward"]
