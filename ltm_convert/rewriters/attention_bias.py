"""Give an attention module that takes no mask argument one, so a bias reaches its logits.

Proportional attention adds log(size) to every key's logit; a converted block feeds it to its
attention child's mask argument (analysis/block_split.py). An attention that has none (CaiT's
talking-heads and class attention, any timm-style ``forward(self, x)`` that computes its own
softmax) gets one: :func:`accept_bias` swaps its class for a generated subclass
(:class:`BiasedAttention`, generated.py; state-dict keys unchanged) whose forward, when it
receives ``attn_mask``, runs the module's own code with the bias added to the logits right before
the softmax (or passed to ``scaled_dot_product_attention``). Without ``attn_mask`` it runs the
original forward, so a model where nothing merged is the original model.

:class:`GeneratedCode` is what such classes share: code traced from the module's own forward,
built once per module structure and never pickled (class_attention.py builds its class-attention
blocks on it too).
"""
from __future__ import annotations

import inspect
import operator
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ltm_convert.analysis.block_split import BlockCall, _compile, _mask_param, bind_call, structure_key, trace_block
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.generated import DropsGenerated, generated_subclass, rebuild

BIASED_PREFIX = "LtmBiasedAttention__"
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)
_CODE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


class GeneratedCode(DropsGenerated):
    """Shared by the generated classes: ``_ltm_code()`` = (function, parameter names, the call it was
    traced for), built once per block structure and dropped when pickled (rebuilt on first use)."""

    ltm_original_class: type
    ltm_generated_keys = ("_ltm_generated",)

    def _ltm_code(self) -> tuple[Callable, list[str], BlockCall]:
        code = self.__dict__.get("_ltm_generated")
        if code is None:
            call: BlockCall = self.__dict__["_ltm_call"]
            cls = type(self).ltm_original_class
            key = (type(self).__name__, structure_key(self, cls, "", call))
            with _LOCK:
                code = _CODE.get(key)
            if code is None:
                fn = self._ltm_generate(trace_block(self, call, cls), call)
                names = [p for p in _signature_names(cls) if p != "self"]
                code = (fn, names, call)
                with _LOCK:
                    code = _CODE.setdefault(key, code)
            self.__dict__["_ltm_generated"] = code
        return code

    def _ltm_generate(self, graph: fx.Graph, call: BlockCall) -> Callable:
        raise NotImplementedError

    def _ltm_bind(self, names: list[str], call: BlockCall, args: tuple, kwargs: dict) -> dict[str, Any]:
        values = dict(zip(names, args))
        values.update(kwargs)
        for key, planned in call.constants.items():
            value = values.get(key, planned)
            if isinstance(value, torch.Tensor) or (value is None) != (planned is None):
                raise LtmError(f"{type(self).ltm_original_class.__name__} was converted for calls with "
                               f"{key}={planned!r}; convert the model for this calling convention")
        return values


def _signature_names(cls: type) -> list[str]:
    return [p.name for p in inspect.signature(inspect.unwrap(cls.forward)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def add_placeholder(graph: fx.Graph, name: str) -> fx.Node:
    """A new last input of a traced graph."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return graph.placeholder(name)


class SizeBiasMode(TorchFunctionMode):
    """Adds the bias to the logits of the softmax over keys run inside it (or hands it to
    ``scaled_dot_product_attention`` as ``attn_mask``); with ``bias=None`` it only records what
    it saw. For attention whose softmax fx cannot reach: HF DPT, ViTPose and VideoMAE compute it
    one module deeper through ``attention_interface(..., None, ...)`` (the mask hard-coded None),
    HF MobileViT's grandchild reshapes with ``x.size()[:-1] + (...)``. A torch-function mode sees
    the call wherever it happens and survives torch.compile, torch.export and the ONNX exporter."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = bias
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            last = dim is not None and dim in (-1, args[0].dim() - 1)
            self.seen.append("softmax" if last else f"a softmax over dim {dim}")
            if self.bias is not None:
                args = (args[0] + self.bias.to(args[0].dtype), *args[1:])
        elif func is F.scaled_dot_product_attention:
            masked = (len(args) > 3 and args[3] is not None) or kwargs.get("attn_mask") is not None \
                or bool(kwargs.get("is_causal")) or (len(args) > 5 and bool(args[5]))
            self.seen.append("an attention that masks itself" if masked else "softmax")
            if self.bias is not None:
                kwargs["attn_mask"] = self.bias.to(args[0].dtype)
        return func(*args, **kwargs)


def forward_with_bias(module: nn.Module, bias: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The module's own forward (``ltm_original_class``) with ``bias`` added to its one softmax over the
    keys; refused in one line where that softmax did not run (e.g. flex_attention switched on after
    conversion), never silently without the bias."""
    original = type(module).ltm_original_class
    mode = SizeBiasMode(bias)
    with mode:
        out = original.forward(module, *args, **kwargs)
    if mode.seen != ["softmax"]:
        raise LtmError(f"{original.__name__} computed its attention without the one softmax ltm_convert adds the "
                       f"token-size bias to ({', '.join(mode.seen) or 'none'}{_backend(module)}); run it with "
                       "attn_implementation 'sdpa' or 'eager': model.set_attn_implementation('sdpa')")
    return out


class BiasedAttention(GeneratedCode):
    """An attention module given an ``attn_mask``: added to its logits right before its softmax."""

    def forward(self, *args: Any, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attn_mask is None:
            return type(self).ltm_original_class.forward(self, *args, **kwargs)
        if self.__dict__.get("_ltm_by_mode"):
            return forward_with_bias(self, attn_mask, *args, **kwargs)
        fn, names, call = self._ltm_code()
        values = self._ltm_bind(names, call, args, kwargs)
        return fn(self, *[values[n] for n in call.tensor_names], attn_mask)

    def _ltm_generate(self, graph: fx.Graph, call: BlockCall) -> Callable:
        what = type(self).ltm_original_class.__name__
        bias = add_placeholder(graph, "ltm_attn_bias")
        sdpa = [n for n in graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        soft = [n for n in graph.nodes if (n.op == "call_method" and n.target == "softmax")
                or (n.op == "call_function" and n.target in _SOFTMAX)]
        if len(sdpa) + len(soft) != 1:
            raise UnsupportedModelError(f"not supported yet: {what} computes {len(sdpa) + len(soft)} softmaxes; "
                                        "ltm_convert adds the token-size bias to exactly one")
        if sdpa:
            node = sdpa[0]
            if len(node.args) > 3 or node.kwargs.get("attn_mask") is not None or node.kwargs.get("is_causal"):
                raise UnsupportedModelError(f"not supported yet: {what} already masks its attention")
            node.kwargs = {**node.kwargs, "attn_mask": bias}
        else:
            node = soft[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if dim not in (-1, 3):
                raise UnsupportedModelError(f"not supported yet: {what} takes its softmax over dim {dim}, not the keys")
            with graph.inserting_before(node):
                biased = graph.call_function(operator.add, (node.args[0], bias))
            node.args = (biased, *node.args[1:])
        return _compile(graph, self)[1]


def _backend(module: nn.Module) -> str:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return f"; attn_implementation is {impl!r}" if isinstance(impl, str) else ""


def biased_class(original: type) -> type:
    """The :class:`BiasedAttention` subclass of an attention class (picklable by name)."""
    return generated_subclass(BIASED_PREFIX, original, __name__, BiasedAttention)


def __getattr__(name: str) -> Any:
    """Rebuild a generated class from its name (what pickle asks for in a fresh process)."""
    return rebuild(__name__, name, {BIASED_PREFIX: biased_class})


def takes_mask(attn: nn.Module) -> bool:
    """Whether an attention module's forward has a mask argument a block can feed the bias to."""
    return _mask_param(attn) is not None


def accept_bias(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give an attention module without a mask argument one (class swap; a no-op for the others).
    ``args, kwargs``: how the model calls it. Refused (UnsupportedModelError) where the bias cannot
    be placed: more than one positional input, not exactly one softmax, a mask of its own."""
    if takes_mask(attn):
        return
    if len(args) > 1:
        raise UnsupportedModelError(f"not supported yet: {type(attn).__name__} takes no attention mask and "
                                    "more than one positional argument")
    call = bind_call(attn, args, kwargs)
    original = attn.__class__
    attn.__class__ = biased_class(type(attn))
    attn.__dict__["_ltm_call"] = call
    try:
        attn._ltm_code()  # generated now: a model it cannot handle is refused at conversion, not at run time
    except UnsupportedModelError as traced:
        if "computes 0 softmaxes" not in str(traced) and "cannot trace" not in str(traced):
            _undo(attn, original)
            raise
        seen = _softmaxes_seen(attn, original, args, kwargs)  # fx cannot see it: watch one call instead
        if seen != ["softmax"]:
            _undo(attn, original)
            raise UnsupportedModelError(f"not supported yet: {original.__name__} computes "
                                        f"{', '.join(seen) if seen else '0 softmaxes'}; ltm_convert adds the "
                                        "token-size bias to exactly one softmax over the keys") from traced
        attn.__dict__["_ltm_by_mode"] = True


def _undo(attn: nn.Module, original: type) -> None:
    attn.__class__ = original
    attn.__dict__.pop("_ltm_call", None)


def _softmaxes_seen(attn: nn.Module, original: type, args: tuple, kwargs: dict) -> list[str]:
    """The softmaxes one call of the module's own forward computes, on a weightless copy."""
    from ltm_convert.flops import meta_copy

    def meta(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.empty(v.shape, dtype=v.dtype, device="meta")
        return type(v)(meta(x) for x in v) if isinstance(v, (tuple, list)) else v

    copy_ = meta_copy(attn)
    mode = SizeBiasMode(None)
    try:
        with torch.no_grad(), mode:
            original.forward(copy_, *[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()})
    except Exception as exc:  # noqa: BLE001 - code that computes on values cannot run weightless
        raise UnsupportedModelError(f"not supported yet: {original.__name__} cannot run on the meta device "
                                    f"({str(exc).splitlines()[0][:120]})") from exc
    return mode.seen


def give_attention_a_mask(block: nn.Module, name: str, attn_child: str, analysis: Any) -> str | None:
    """Give the block's attention a mask argument where it has none (:func:`accept_bias`), so the
    proportional-attention bias (log sizes) reaches its logits. Returns why not where its code cannot
    take one (the block then converts without proportional attention, as ToMe without it)."""
    attn = block.get_submodule(attn_child)
    if takes_mask(attn):
        return None
    call = analysis.calls.get(f"{name}.{attn_child}")
    if call is None:
        return f"{type(attn).__name__} was not called as a module"
    try:
        accept_bias(attn, *call)
    except UnsupportedModelError as exc:
        return str(exc).removeprefix("not supported yet: ")
    return None


def warn_without_bias(without_bias: dict[str, str]) -> None:
    """One warning naming the blocks whose attention cannot take the size bias (block -> why): their
    merged tokens count once in attention, a loss of accuracy the user should know of."""
    if not without_bias:
        return
    import warnings

    names = list(without_bias)
    warnings.warn(f"ltm_convert: the attention of {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
                  f"takes no mask and cannot be given one ({next(iter(without_bias.values()))}): its merged "
                  "tokens count once in attention (no proportional attention), which costs accuracy",
                  UserWarning, stacklevel=5)
