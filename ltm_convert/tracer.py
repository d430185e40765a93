"""Find a model's transformer blocks by what they compute, not by class names.

The whole model is traced once with ``torch.export`` (non-strict), which works on every timm and
HF vision model measured (model-coverage.md). On that graph a block is "a residual add whose branch
holds attention, followed on the residual stream by a residual add whose branch holds two or more
linear layers". Node ``nn_module_stack`` metadata maps each match back to its module. The same
graph tells how many prefix tokens lead the sequence and what the head does with the tokens.

The tracer never mutates the model.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from ltm_convert.errors import UnsupportedModelError
from ltm_convert.ffn_trace import FfnSite, common_prefix, find_ffn_site, passthrough_source
from ltm_convert.model_inputs import call_kwargs, default_input_size, example_input

aten = torch.ops.aten

_ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._softmax.default,
    aten.softmax.int,
    aten._safe_softmax.default,
}
_MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.mm.default}
_LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_SHAPE_ONLY = {aten.sym_size.int, operator.mul, operator.add, operator.floordiv}


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


# ----------------------------------------------------------------------------------------------
# tracing


def export_graph(model: nn.Module, input_size: tuple[int, int] | None = None) -> torch.export.ExportedProgram:
    """torch.export the model on a batch of one image; the graph the matcher reads."""
    images = example_input(model, input_size)
    args, kwargs = call_kwargs(model, images)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export failures carry long messages; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"not supported yet: torch.export could not trace {type(model).__name__} ({first[:200]})"
        ) from exc
    finally:
        model.train(was_training)


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # export paths look like "blocks.0.attn" or "L['self'].blocks[0]"; normalise the latter
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").split("["):
        out.extend(p for p in part.split(".") if p)
    return ".".join(p.strip("'\"") for p in out)


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


class _GraphFacts:
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
            elif n.op == "call_function" and n.target not in _SHAPE_ONLY:
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
            if n.target in _ATTENTION_OPS:
                return n
            if n.target in _MATMUL_OPS and len(n.args) >= 2:
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
        return any(m.op == "call_function" and m.target in _MATMUL_OPS | {torch.matmul, operator.matmul}
                   for m in sub.graph.nodes)

    def linears(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        found = []
        for n in nodes:
            if n.op != "call_function":
                continue
            if n.target in _LINEAR_OPS and any(a in self.params for a in n.all_input_nodes):
                found.append(n)
            elif n.target == aten.conv2d.default and len(n.args) > 1 and _shape(n.args[1]) is not None:
                w = _shape(n.args[1])
                groups = n.args[6] if len(n.args) > 6 else 1
                if w and w[-1] == 1 and w[-2] == 1 and groups == 1:
                    found.append(n)
        return found


@dataclass
class _Residual:
    add: fx.Node
    skip: fx.Node
    branch_out: fx.Node
    kind: str  # "attention" | "mlp" | "other"
    attn_node: fx.Node | None
    linears: list[fx.Node]


def _residuals(facts: _GraphFacts) -> list[_Residual]:
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
        found.append(_Residual(n, skip, out, kind, attn, lins))
    return found


def _prefix_tokens(facts: _GraphFacts, first_block_input: fx.Node, num_tokens: int) -> int:
    """Tokens that lead the sequence and do not come from image patches (class, distillation, registers)."""
    patches = None
    for n in facts.nodes:
        if n.op == "call_function" and n.target in (aten.conv2d.default, aten.conv2d.padding) and n.args[0] in facts.data:
            shape = _shape(n)
            if shape and len(shape) == 4:
                patches = shape[2] * shape[3]
            break
    if patches is None:
        raise UnsupportedModelError("not supported yet: no convolutional patch embedding found before the blocks")
    prefix = num_tokens - patches
    if prefix < 0:
        raise UnsupportedModelError(
            f"not supported yet: the blocks see {num_tokens} tokens but the patch grid has {patches}"
        )
    if prefix:
        # the sequence is assembled by a cat along the token axis; its last part must be the patches
        cats = [n for n in facts.ancestors(first_block_input) | {first_block_input}
                if n.op == "call_function" and n.target == aten.cat.default and n in facts.data and _shape(n)
                and len(_shape(n)) == 3 and _shape(n)[1] == num_tokens]
        if cats:
            last_cat = max(cats, key=lambda n: facts.order[n])
            last_part = last_cat.args[0][-1]
            if last_part not in facts.data:
                raise UnsupportedModelError(
                    "not supported yet: extra tokens are appended after the patch tokens (as in YOLOS)"
                )
    return prefix


def _classify_heads(facts: _GraphFacts, seq: fx.Node, prefix: int) -> list[str]:
    """What consumes the final token sequence: token pool, average pool, attention pool, a 2-D grid..."""
    heads: set[str] = set()
    frontier = [seq]
    seen = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                heads.add("sequence")
                continue
            if user.op != "call_function":
                continue
            t = user.target
            shape = _shape(node)
            if t == aten.select.int and user.args[1] in (1, -2):
                idx = user.args[2]
                heads.add(f"token:{idx}")
                if not (0 <= idx < max(prefix, 1)) or prefix == 0:
                    raise UnsupportedModelError(
                        f"not supported yet: the head reads token {idx}, which is not a protected prefix token"
                    )
                continue
            if t == aten.slice.Tensor and (user.args[1] if len(user.args) > 1 else 0) in (1, -2):
                start = user.args[2] if len(user.args) > 2 else 0
                end = user.args[3] if len(user.args) > 3 else None
                if start is not None and end is not None and end <= max(prefix, 0) and end - start == 1:
                    heads.add(f"token:{start}")
                    continue
                frontier.append(user)
                continue
            if t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.max.dim):
                dims = user.args[1] if len(user.args) > 1 else None
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if any(d in (1, -2) for d in dims):
                    heads.add("max" if t in (aten.amax.default, aten.max.dim) else "avg")
                    continue
            if t in _ATTENTION_OPS or t in _MATMUL_OPS:
                heads.add("attention-pool")
                continue
            if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and shape:
                out = _shape(user)
                if out and len(out) == 4:
                    raise UnsupportedModelError(
                        "not supported yet: the tokens are reshaped to a 2-D grid after the blocks"
                    )
            frontier.append(user)
    return sorted(heads)


def find_blocks(model: nn.Module, input_size: tuple[int, int] | None = None,
                exclude: Iterable[str] | None = None) -> ConversionPlan:
    """Trace the model and list its convertible transformer blocks (no mutation)."""
    input_size = tuple(input_size) if input_size else default_input_size(model)
    ep = export_graph(model, input_size)
    facts = _GraphFacts(ep)
    residuals = _residuals(facts)
    by_add = {r.add: r for r in residuals}
    modules = dict(model.named_modules())
    excluded = [e for e in (exclude or [])]

    blocks: list[BlockMatch] = []
    block_adds: list[tuple[fx.Node, fx.Node]] = []  # (attention add input, MLP add) per block
    residual_pairs: list[tuple[_Residual, _Residual]] = []  # (attention residual, MLP residual) per block
    skipped: list[tuple[str, str]] = []
    attn_count = sum(r.kind == "attention" for r in residuals)
    for r in residuals:
        if r.kind != "mlp":
            continue
        # the MLP residual's skip is the attention residual's sum, up to re-layouts and dropout
        attn_res = by_add.get(r.skip) or by_add.get(passthrough_source(r.skip))
        if attn_res is None or attn_res.kind != "attention":
            continue
        paths = [_module_path(attn_res.attn_node)] + [_module_path(n) for n in r.linears]
        name = common_prefix([p for p in paths if p])
        block = modules.get(name)
        if not name or block is None or isinstance(block, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            skipped.append((name or "?", "attention and MLP are not inside one block module"))
            continue
        attn_path = _module_path(attn_res.attn_node) or ""
        rel = attn_path[len(name) + 1:].split(".")[0] if attn_path.startswith(name + ".") else ""
        if not rel:
            skipped.append((name, "the attention is not computed inside a child module of the block"))
            continue
        shape = _shape(attn_res.skip)
        if not shape or len(shape) not in (3, 4):
            skipped.append((name, f"the block does not work on a token sequence or a 2-D map (shape {shape})"))
            continue
        if any(name == e or name.startswith(e + ".") for e in excluded):
            skipped.append((name, "excluded by the user"))
            continue
        tokens, dim = (shape[1], shape[2]) if len(shape) == 3 else (0, 0)  # 2-D maps: set from the FFN site
        blocks.append(BlockMatch(name=name, attn_child=rel, index=len(blocks), tokens=tokens, dim=dim))
        block_adds.append((attn_res.skip, r.add))
        residual_pairs.append((attn_res, r))

    if not blocks:
        what = (f"found {attn_count} attention residual(s) but none followed by an MLP residual"
                if attn_count else "found no residual branch containing attention")
        reasons = "; ".join(f"{n}: {w}" for n, w in skipped[:2])
        raise UnsupportedModelError(
            f"not supported yet: no transformer block (attention residual, then MLP residual) in "
            f"{type(model).__name__}: {what}" + (f" ({reasons})" if reasons else "")
        )

    tokens = {b.tokens for b in blocks}
    on_maps = any(len(_shape(a.skip) or ()) == 4 for a, _ in residual_pairs)
    if on_maps or len(tokens) != 1:
        if not on_maps:
            try:  # MobileViT: runs of blocks on patches unfolded from a feature map
                grids = _grid_groups(facts, blocks, block_adds, sorted(tokens))
                return ConversionPlan(model_class=type(model).__name__, input_size=input_size,
                                      num_tokens=blocks[0].tokens, prefix_tokens=0,
                                      heads=["grid (unmerged before the fold)"], blocks=blocks, skipped=skipped,
                                      grids=grids)
            except UnsupportedModelError as exc:
                unfold_error = str(exc)
        else:
            unfold_error = ""
        return _ffn_plan(model, input_size, facts, blocks, residual_pairs, skipped, unfold_error)
    num_tokens = blocks[0].tokens
    prefix = _prefix_tokens(facts, block_adds[0][0], num_tokens)
    last_add = block_adds[-1][1]
    heads = _classify_heads(facts, last_add, prefix)
    return ConversionPlan(
        model_class=type(model).__name__,
        input_size=input_size,
        num_tokens=num_tokens,
        prefix_tokens=prefix,
        heads=heads,
        blocks=blocks,
        skipped=skipped,
    )


_LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
               aten.permute.default, aten.clone.default, aten.contiguous.default, aten.flatten.using_ints,
               aten.alias.default}


def _layout_source(node: fx.Node) -> fx.Node:
    """Follow pure layout ops (views, transposes, copies) back to the tensor they rearrange."""
    while (node.op == "call_function" and node.target in _LAYOUT_OPS and node.args
           and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def _patch_layout(seq: tuple[int, ...], fmap: tuple[int, ...]) -> tuple[tuple[int, int], int] | None:
    """(n_h, n_w), patch_area such that a (1, C, H, W) map unfolds to (patch_area, n_h * n_w, C)."""
    if len(seq) != 3 or len(fmap) != 4 or fmap[0] != 1 or seq[2] != fmap[1]:
        return None
    area, n, (H, W) = seq[0], seq[1], fmap[2:]
    # several patch shapes can fit the numbers; the squarest one is what every known unfold uses
    for ph in sorted(range(1, area + 1), key=lambda p: (abs(p - area / p), p)):
        if area % ph or H % ph or W % (area // ph):
            continue
        nh, nw = H // ph, W // (area // ph)
        if nh * nw == n:
            return (nh, nw), area
    return None


def _grid_groups(facts: _GraphFacts, blocks: list[BlockMatch], block_adds: list[tuple[fx.Node, fx.Node]],
                 token_counts: list[int]) -> list[GridGroup]:
    """Group blocks into runs that start from an unfolded feature map, or say why the model is not one."""
    groups: list[GridGroup] = []
    prev_out: fx.Node | None = None
    for block, (block_in, block_out) in zip(blocks, block_adds):
        source = _layout_source(block_in)
        if groups and prev_out is not None and source is _layout_source(prev_out):
            groups[-1].blocks.append(block.name)
        else:
            layout = _patch_layout(_shape(block_in) or (), _shape(source) or ())
            if layout is None:
                raise UnsupportedModelError(
                    f"not supported yet: blocks see different token counts {token_counts} (a hierarchical model) "
                    f"and {block.name} does not run on patches unfolded from a feature map"
                )
            groups.append(GridGroup(blocks=[block.name], tokens=block.tokens, grid=layout[0], patch_area=layout[1]))
        prev_out = block_out
    return groups


def _ffn_plan(model: nn.Module, input_size: tuple[int, int], facts: _GraphFacts, blocks: list[BlockMatch],
              pairs: list[tuple[_Residual, _Residual]], skipped: list[tuple[str, str]],
              unfold_error: str) -> ConversionPlan:
    """Hierarchical grid models (Swin, EfficientViT): each block merges inside its own FFN."""
    sites, kept = [], []
    paths = {n: _module_path(n) for n in facts.nodes if n.op == "call_function"}
    for block, (attn_res, mlp_res) in zip(blocks, pairs):
        site = find_ffn_site(facts, paths, block.name, block.attn_child,
                             [attn_res.skip, *facts.branch(attn_res.skip, attn_res.branch_out)],
                             mlp_res.skip, mlp_res.branch_out)
        if isinstance(site, str):
            skipped.append((block.name, site))
            continue
        if site.layout == "tokens" and _ffn_is_spatial(facts, mlp_res, site):
            skipped.append((block.name, "its FFN lays the tokens out on the 2-D grid itself (a convolution inside "
                                        "the MLP, as in PVTv2), which merged tokens cannot feed"))
            continue
        block.tokens, block.dim = site.grid[0] * site.grid[1], site.dim
        block.index = len(kept)
        sites.append(site)
        kept.append(block)
    if not sites:
        reasons = "; ".join(f"{n}: {w}" for n, w in skipped[:2])
        raise UnsupportedModelError(
            f"not supported yet: {type(model).__name__} runs its blocks on 2-D grids and no block's FFN could be "
            f"merged safely ({reasons or unfold_error})"
        )
    return ConversionPlan(model_class=type(model).__name__, input_size=input_size, num_tokens=kept[0].tokens,
                          prefix_tokens=0, heads=["grid (each FFN unmerges onto its full grid)"], blocks=kept,
                          skipped=skipped, ffn_grids=sites)


def _ffn_is_spatial(facts: _GraphFacts, mlp_res: _Residual, site: FfnSite) -> bool:
    h, w = site.grid
    for n in facts.branch(mlp_res.skip, mlp_res.branch_out):
        s = _shape(n)
        if s and len(s) == 4 and ((s[1], s[2]) == (h, w) or (s[2], s[3]) == (h, w)):
            return True
    return False
