"""Find a model's transformer blocks by what they compute, not by class names.

On the export graph (analysis/graph.py) a block is "a residual add whose branch holds attention,
followed on the residual stream by a residual add whose branch holds two or more linear layers";
the stream between the two may pass a depth-wise convolution (TinyViT's local convolution), which
is recorded in ``Analysis.between`` so that families that shorten the sequence refuse the block.
:func:`analyse` lists those blocks with the graph facts around them; each model family
(rewriters/) then reads the analysis and says whether and how it can convert the model, in a
:class:`ConversionPlan` that is printable and JSON-able. ``api.find_blocks`` is both steps.

The tracer never mutates the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import fx, nn

from ltm_convert.analysis.graph import (
    GraphFacts,
    Residual,
    common_prefix,
    export_graph,
    module_calls,
    module_path,
    passthrough_source,
    residuals,
    shape_of,
    through_local_convs,
)
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.model_inputs import default_input_size
from ltm_convert.plan import BlockMatch, ConversionPlan  # noqa: F401 - re-exported


@dataclass
class Analysis:
    """Everything the families read: the graph, the matched blocks and how the model calls them."""

    model_class: str
    input_size: tuple[int, int]
    facts: GraphFacts
    blocks: list[BlockMatch]
    block_adds: list[tuple[fx.Node, fx.Node]]  # (attention residual's skip input, MLP residual add) per block
    pairs: list[tuple[Residual, Residual]]  # (attention residual, MLP residual) per block
    skipped: list[tuple[str, str]]
    attention_residuals: int
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the analysed model's modules, by path
    # block -> what runs on the 2-D map between its attention and MLP residuals (TinyViT's local convolution)
    between: dict[str, str] = field(default_factory=dict)
    _calls: dict[str, tuple[tuple, dict]] | None = None

    @property
    def calls(self) -> dict[str, tuple[tuple, dict]]:
        """module path -> (args, kwargs) of its first call in one eager forward (run on first use:
        families that hook modules instead of cutting blocks never need it)."""
        if self._calls is None:
            self._calls = first_calls(self.modules[""], self.input_size)
        return self._calls

    @property
    def on_maps(self) -> bool:
        """Blocks that work on (B, C, H, W) / (B, H, W, C) maps rather than token sequences."""
        return any(len(shape_of(a.skip) or ()) == 4 for a, _ in self.pairs)

    @property
    def cut_refusal(self) -> str | None:
        """Why the blocks cannot be cut at the attention residual and run on fewer tokens after it
        (None when they can): a convolution between the two residuals needs every token of the grid.
        Families that merge only inside the MLP (ffn_grid.py) ignore it."""
        if not self.between:
            return None
        name, what = next(iter(self.between.items()))
        return (f"not supported yet: {self.model_class}'s block {name} runs {what} between its attention and MLP "
                "residuals, which a shortened token sequence cannot feed")

    @property
    def token_counts(self) -> list[int]:
        return sorted({b.tokens_with_prefix for b in self.blocks})


def first_calls(model: nn.Module, input_size: tuple[int, int]) -> dict[str, tuple[tuple, dict]]:
    """How one eager forward calls each module (args, kwargs of its first call)."""
    from ltm_convert.flops import meta_copy

    try:  # a weightless copy runs in no time and calls every module as the real one does
        return module_calls(meta_copy(model), input_size)
    except Exception:  # noqa: BLE001 - some models compute on values (.item()): run the real one
        return module_calls(model, input_size)


class RecordedAnalysis:
    """What a family's ``build`` reads when a saved file's plan is replayed: the model's modules and
    how one eager forward calls them (cheap), never the export graph unless a family asks for it
    (then the model is traced on first use, as ``convert`` would)."""

    def __init__(self, model: nn.Module, plan: ConversionPlan) -> None:
        self.model_class = type(model).__name__
        self.input_size = tuple(plan.input_size)
        self.modules = dict(model.named_modules())
        self._calls: dict[str, tuple[tuple, dict]] | None = None
        self._traced: Analysis | None = None

    @property
    def calls(self) -> dict[str, tuple[tuple, dict]]:
        if self._calls is None:
            self._calls = first_calls(self.modules[""], self.input_size)
        return self._calls

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._traced is None:
            self._traced = analyse(self.modules[""], self.input_size)
        return getattr(self._traced, name)


def check_recorded_plan(model: nn.Module, plan: ConversionPlan, analysis: RecordedAnalysis, where: str) -> None:
    """Refuse a recorded plan that does not describe this model (another model's file, or a model
    whose code changed since): every planned block must exist, hold its attention child and, for
    token sequences, receive the planned tokens and width in one eager forward."""
    import torch

    def refuse(detail: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{where}: its recorded conversion plan does not fit this {type(model).__name__} "
                                     f"({detail}); the file belongs to another model, or the model's code changed: "
                                     "convert the original model again")

    if plan.model_class != type(model).__name__:
        raise refuse(f"the plan is for a {plan.model_class}")
    for match in plan.blocks:
        block = analysis.modules.get(match.name)
        if block is None or not isinstance(getattr(block, match.attn_child, None), nn.Module):
            raise refuse(f"no block {match.name} with an attention child {match.attn_child!r}")
        if not match.tokens_with_prefix:
            continue
        args, kwargs = analysis.calls.get(match.name, ((), {}))
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        fits = x is not None and (tuple(x.shape[1:]) == (match.tokens_with_prefix, match.dim) if x.dim() == 3 else
                                  x.dim() == 4 and x[0].numel() == match.tokens_with_prefix * match.dim)  # a 2-D map
        if not fits:
            got = "no call" if x is None else f"tokens of shape {tuple(x.shape[1:])}"
            raise refuse(f"{match.name} receives {got}, the plan {match.tokens_with_prefix} tokens of width {match.dim}")


def analyse(model: nn.Module, input_size: tuple[int, int] | None = None,
            exclude: Iterable[str] | None = None) -> Analysis:
    """Trace the model once and match its transformer blocks (no mutation)."""
    input_size = tuple(input_size) if input_size else default_input_size(model)
    ep = export_graph(model, input_size)
    facts = GraphFacts(ep)
    found = residuals(facts)
    by_add = {r.add: r for r in found}
    modules = dict(model.named_modules())
    excluded = list(exclude or [])
    blocks: list[BlockMatch] = []
    block_adds: list[tuple[fx.Node, fx.Node]] = []
    pairs: list[tuple[Residual, Residual]] = []
    skipped: list[tuple[str, str]] = []
    between: dict[str, str] = {}
    for r in found:
        if r.kind != "mlp":
            continue
        # the MLP residual's skip is the attention residual's sum, up to re-layouts and dropout,
        # or (TinyViT) that sum after a depth-wise convolution on the map
        attn_res = by_add.get(r.skip) or by_add.get(passthrough_source(r.skip))
        convs: list[fx.Node] = []
        if attn_res is None:
            source, convs = through_local_convs(r.skip)
            attn_res = by_add.get(source) if convs else None
        if attn_res is None or attn_res.kind != "attention":
            continue
        paths = [module_path(attn_res.attn_node)] + [module_path(n) for n in r.linears]
        name = common_prefix([p for p in paths if p])
        block = modules.get(name)
        if not name or block is None or isinstance(block, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            skipped.append((name or "?", "attention and MLP are not inside one block module"))
            continue
        conv_paths = [module_path(c) or "" for c in convs]
        if any(not p.startswith(name + ".") for p in conv_paths):
            skipped.append((name, "a convolution between its attention and MLP residuals lies outside the block"))
            continue
        attn_path = module_path(attn_res.attn_node) or ""
        rel = attn_path[len(name) + 1:].split(".")[0] if attn_path.startswith(name + ".") else ""
        if not rel:
            skipped.append((name, "the attention is not computed inside a child module of the block"))
            continue
        shape = shape_of(attn_res.skip)
        if not shape or len(shape) not in (3, 4):
            skipped.append((name, f"the block does not work on a token sequence or a 2-D map (shape {shape})"))
            continue
        if any(name == e or name.startswith(e + ".") for e in excluded):
            skipped.append((name, "excluded by the user"))
            continue
        tokens, dim = (shape[1], shape[2]) if len(shape) == 3 else (0, 0)  # 2-D maps: set from the FFN site
        blocks.append(BlockMatch(name=name, attn_child=rel, index=len(blocks), tokens_with_prefix=tokens, dim=dim))
        if convs:
            between[name] = f"a depth-wise convolution ({conv_paths[0][len(name) + 1:]})"
        block_adds.append((attn_res.skip, r.add))
        pairs.append((attn_res, r))
    return Analysis(model_class=type(model).__name__, input_size=input_size, facts=facts, blocks=blocks,
                    block_adds=block_adds, pairs=pairs, skipped=skipped,
                    attention_residuals=sum(r.kind == "attention" for r in found), modules=modules, between=between)


def no_blocks_error(analysis: Analysis) -> UnsupportedModelError:
    from ltm_convert.analysis.layouts import known_layout_reason

    known = known_layout_reason(analysis.modules.values())
    if known:
        return UnsupportedModelError(f"not supported yet: {analysis.model_class}: {known}")
    what = (f"found {analysis.attention_residuals} attention residual(s) but none followed by an MLP residual"
            if analysis.attention_residuals else "found no residual branch containing attention")
    reasons = "; ".join(f"{n}: {w}" for n, w in analysis.skipped[:2])
    return UnsupportedModelError(
        f"not supported yet: no transformer block (attention residual, then MLP residual) in "
        f"{analysis.model_class}: {what}" + (f" ({reasons})" if reasons else ""))
