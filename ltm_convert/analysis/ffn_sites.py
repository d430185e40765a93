"""Find where a grid block's FFN starts and ends, from the export graph (Swin, EfficientViT).

Swin partitions its tokens into windows with a relative position bias and a shift mask, and
EfficientViT runs attention and a depth-wise-convolution FFN on (B, C, H, W) maps: neither block
can take a shorter token sequence into its attention. What they can take is a merged grid in the
FFN, which holds most of their FLOPs. So for these blocks the LTM merge sits between the
attention residual and the FFN: the FFN runs on an h' x w' sub-grid of merged tokens and its
output is unmerged back onto the full grid before the residual add (ffn_grid.py).

This module finds, for one block, the modules to hook: the first module the FFN branch feeds the
residual stream into and the module whose output ends the branch. Both must belong to the FFN
alone (a module shared with the attention, such as HF Swin's layer dropout, cannot be hooked);
a branch that is one module (EfficientViT's MBConv) hooks that module on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ltm_convert.analysis.graph import (
    LAYOUT_ONLY_OPS,
    PASSTHROUGH_OPS,
    common_prefix,
    passthrough_source,
    shape_of,
)

aten = torch.ops.aten

@dataclass
class FfnSite:
    """One block whose FFN runs on merged grid tokens."""

    block: str  # module path of the block
    ffn_in: str  # module whose input is the residual stream (merge before it)
    ffn_out: str  # module whose output ends the FFN branch (unmerge after it)
    grid: tuple[int, int]  # (H, W) of the block's tokens
    dim: int
    layout: str  # "tokens" (B, N, C), "nhwc" (B, H, W, C) or "nchw" (B, C, H, W) at ffn_in
    attn_child: str


def _under(path: str | None, prefix: str) -> bool:
    return bool(path) and (path == prefix or path.startswith(prefix + "."))  # type: ignore[union-attr]


def _is_passthrough(node: fx.Node) -> bool:
    return node.op != "call_function" or node.target in PASSTHROUGH_OPS or node.target in LAYOUT_ONLY_OPS


def find_ffn_site(facts, paths: dict[fx.Node, str | None], block: str, attn_child: str,
                  attn_branch: list[fx.Node], ffn_skip: fx.Node, ffn_out: fx.Node,
                  between: list[fx.Node] = ()) -> FfnSite | str:
    """The hook points and grid of one block's FFN, or the reason it cannot be merged safely.

    ``facts`` is the tracer's graph index, ``paths`` every call node's module path (computed
    once per model, shared by all blocks),
    ``attn_branch`` the attention residual's branch, ``ffn_skip`` / ``ffn_out`` the FFN residual's
    skip input and branch output, ``between`` what runs from the attention residual to the FFN's
    (TinyViT's local convolution, on a (B, C, H, W) map).
    """
    branch = [n for n in facts.branch(ffn_skip, ffn_out) if n.op == "call_function"]
    in_branch = set(branch)
    owned = [paths[n] for n in branch if paths.get(n) and _under(paths[n], block)]
    if not owned:
        return "its FFN is not computed inside the block's modules"
    prefix = common_prefix(owned)

    def exclusive(path: str) -> bool:
        """Every real op of the module runs in the FFN branch (so a hook on it fires only there)."""
        return all(n in in_branch for n, p in paths.items() if _under(p, path) and not _is_passthrough(n))

    if prefix != block and exclusive(prefix):
        first = last = prefix
    else:
        children: list[str] = []
        for n in branch:
            p = paths.get(n)
            if _under(p, prefix) and p != prefix:
                child = prefix + "." + p[len(prefix) + 1:].split(".")[0]
                if child not in children:
                    children.append(child)

        def only_passthrough(path: str) -> bool:
            return all(_is_passthrough(n) for n, p in paths.items() if _under(p, path))

        while children and only_passthrough(children[-1]):
            children.pop()
        while children and only_passthrough(children[0]):
            children.pop(0)
        if not children:
            return "no module of the block computes its FFN"
        first, last = children[0], children[-1]
        for path in {first, last}:
            if not exclusive(path):
                return f"{path} also runs outside the FFN, so it cannot mark where the FFN starts or ends"
    # the first module must read the residual stream itself, the last must end the branch
    stream = passthrough_source(ffn_skip)
    entry = [n for n in branch if _under(paths.get(n), first)]
    if not entry or not any(passthrough_source(a) is stream for a in entry[0].all_input_nodes):
        return f"{first} does not read the residual stream directly"
    end = passthrough_source(ffn_out, layout_too=False)
    if not _under(paths.get(end), last):
        return f"the FFN branch ends after {last} with more computation"
    # layout and grid at the FFN input
    shape = shape_of(ffn_skip)
    if shape is None:
        return "the FFN input has no known shape"
    if len(shape) == 4:
        weighted = [n for n in branch if n.target in (aten.conv2d.default, aten.conv2d.padding, aten.linear.default,
                                                      aten.addmm.default, aten.mm.default, aten.matmul.default)]
        if weighted and weighted[0].target in (aten.conv2d.default, aten.conv2d.padding):
            layout, c, grid = "nchw", shape[1], (shape[2], shape[3])
        else:
            layout, c, grid = "nhwc", shape[3], (shape[1], shape[2])
    elif len(shape) == 3:
        n_tokens, c = shape[1], shape[2]
        grid = None
        for node in [ffn_skip, *attn_branch]:
            s = shape_of(node)
            if s and len(s) == 4 and s[3] == c and s[1] * s[2] == n_tokens:
                grid = (s[1], s[2])
                break
        for node in between if grid is None else ():
            s = shape_of(node)
            if node.target in (aten.conv2d.default, aten.conv2d.padding) and s and len(s) == 4 \
                    and s[1] == c and s[2] * s[3] == n_tokens:
                grid = (s[2], s[3])
                break
        if grid is None:
            return f"its {n_tokens} tokens are never laid out as a 2-D grid"
        layout = "tokens"
    else:
        return f"the FFN input has shape {shape}"
    rel = lambda p: p[len(block) + 1:] if p.startswith(block + ".") else p  # noqa: E731
    return FfnSite(block=block, ffn_in=rel(first), ffn_out=rel(last), grid=grid, dim=c, layout=layout,
                   attn_child=attn_child)
