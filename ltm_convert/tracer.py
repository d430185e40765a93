"""Find a model's transformer blocks by what they compute, not by class names.

On the export graph (analysis/graph.py) a block is "a residual add whose branch holds attention,
followed on the residual stream by a residual add whose branch holds two or more linear layers".
:func:`analyse` lists those blocks with the graph facts around them; each model family
(rewriters/) then reads the analysis and says whether and how it can convert the model, in a
:class:`ConversionPlan` that is printable and JSON-able. ``api.find_blocks`` is both steps.

The tracer never mutates the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from torch import fx, nn

from ltm_convert.analysis.ffn_sites import FfnSite
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
)
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.model_inputs import default_input_size


@dataclass
class BlockMatch:
    """One transformer block found in the graph."""

    name: str  # module path of the block, e.g. "blocks.3"
    attn_child: str  # the block's child that computes attention, e.g. "attn"
    index: int  # position along the residual stream
    tokens: int  # tokens entering the block at the traced resolution
    dim: int


@dataclass
class GridGroup:
    """Consecutive blocks that run on patches unfolded from one 2-D feature map (MobileViT).

    The tokens are the n_h x n_w patch positions in raster order; the batch dimension holds
    batch x patch_area sequences, one per pixel position inside a patch, which must all merge the
    same way so that the feature map can be folded back.
    """

    blocks: list[str]
    tokens: int
    grid: tuple[int, int]  # (n_h, n_w)
    patch_area: int


@dataclass
class ConversionPlan:
    """What a conversion would change: printable, JSON-able, computed without touching the model."""

    model_class: str
    input_size: tuple[int, int]
    num_tokens: int
    prefix_tokens: int
    heads: list[str]
    blocks: list[BlockMatch] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    grids: list[GridGroup] = field(default_factory=list)  # set for models whose blocks run on 2-D grids
    ffn_grids: list[FfnSite] = field(default_factory=list)  # Swin / EfficientViT: merge inside each FFN
    family: str = "sequence"  # the rewriters/ family that converts it
    carry: list[str] = field(default_factory=list)  # modules between the last block and the head

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    def __str__(self) -> str:
        lines = [
            f"{self.model_class} at {self.input_size[0]}x{self.input_size[1]}: {self.num_tokens} tokens "
            f"({self.prefix_tokens} prefix), head: {', '.join(self.heads) or 'none'}",
        ]
        lines += [f"  {b.name:<32} attention={b.attn_child:<16} tokens={b.tokens}" for b in self.blocks]
        lines += [f"  grid group {g.grid[0]}x{g.grid[1]} patches x {g.patch_area} positions: {', '.join(g.blocks)}"
                  for g in self.grids]
        lines += [f"  FFN on a {f.grid[0]}x{f.grid[1]} grid ({f.layout}): {f.block}.{f.ffn_in} .. {f.ffn_out}"
                  for f in self.ffn_grids]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


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
    _calls: dict[str, tuple[tuple, dict]] | None = None

    @property
    def calls(self) -> dict[str, tuple[tuple, dict]]:
        """module path -> (args, kwargs) of its first call in one eager forward (run on first use:
        families that hook modules instead of cutting blocks never need it)."""
        if self._calls is None:
            from ltm_convert.flops import meta_copy

            model = self.modules[""]
            try:  # a weightless copy runs in no time and calls every module as the real one does
                self._calls = module_calls(meta_copy(model), self.input_size)
            except Exception:  # noqa: BLE001 - some models compute on values (.item()): run the real one
                self._calls = module_calls(model, self.input_size)
        return self._calls

    @property
    def on_maps(self) -> bool:
        """Blocks that work on (B, C, H, W) / (B, H, W, C) maps rather than token sequences."""
        return any(len(shape_of(a.skip) or ()) == 4 for a, _ in self.pairs)

    @property
    def token_counts(self) -> list[int]:
        return sorted({b.tokens for b in self.blocks})


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
    for r in found:
        if r.kind != "mlp":
            continue
        # the MLP residual's skip is the attention residual's sum, up to re-layouts and dropout
        attn_res = by_add.get(r.skip) or by_add.get(passthrough_source(r.skip))
        if attn_res is None or attn_res.kind != "attention":
            continue
        paths = [module_path(attn_res.attn_node)] + [module_path(n) for n in r.linears]
        name = common_prefix([p for p in paths if p])
        block = modules.get(name)
        if not name or block is None or isinstance(block, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            skipped.append((name or "?", "attention and MLP are not inside one block module"))
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
        blocks.append(BlockMatch(name=name, attn_child=rel, index=len(blocks), tokens=tokens, dim=dim))
        block_adds.append((attn_res.skip, r.add))
        pairs.append((attn_res, r))
    return Analysis(model_class=type(model).__name__, input_size=input_size, facts=facts, blocks=blocks,
                    block_adds=block_adds, pairs=pairs, skipped=skipped,
                    attention_residuals=sum(r.kind == "attention" for r in found), modules=modules)


def no_blocks_error(analysis: Analysis) -> UnsupportedModelError:
    what = (f"found {analysis.attention_residuals} attention residual(s) but none followed by an MLP residual"
            if analysis.attention_residuals else "found no residual branch containing attention")
    reasons = "; ".join(f"{n}: {w}" for n, w in analysis.skipped[:2])
    return UnsupportedModelError(
        f"not supported yet: no transformer block (attention residual, then MLP residual) in "
        f"{analysis.model_class}: {what}" + (f" ({reasons})" if reasons else ""))
