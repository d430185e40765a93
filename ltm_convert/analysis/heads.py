"""What surrounds the blocks of a token-sequence model: prefix tokens in front, and the head after.

Merging must never touch the class, distillation and register tokens (they lead the sequence),
and what reads the final sequence decides what else must change: token pooling needs nothing,
average pooling must weight tokens by size, attention pooling needs a log-size bias, and a
reshape to a 2-D grid cannot take merged tokens at all.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ltm_convert.analysis.graph import (
    ATTENTION_OPS,
    MATMUL_OPS,
    GraphFacts,
    module_path,
    shape_of,
)
from ltm_convert.errors import UnsupportedModelError

aten = torch.ops.aten
_PATCH_CONVS = (aten.conv2d.default, aten.conv2d.padding, aten.conv3d.default, aten.conv3d.padding)

_LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
               aten.flatten.using_ints, aten.contiguous.default, aten.clone.default, aten.transpose.int,
               aten.constant_pad_nd.default, aten.pad.default, aten.unsqueeze.default, aten.squeeze.dim,
               aten.to.dtype, aten._to_copy.default)  # HF SigLIP2 casts its patches to the weights' dtype


def _patch_count(facts: GraphFacts) -> int | None:
    """Patch tokens the embedding makes: a convolution's H x W (T x H x W for tubelets), or, for a linear patch embedding (timm
    NaFlexViT, HF SigLIP2: the image cut into patches by reshapes, then one Linear), its token count."""
    for n in facts.nodes:
        if n.op != "call_function" or n not in facts.data:
            continue
        shape = shape_of(n)
        if n.target in _PATCH_CONVS:  # a 2-D patch embedding, or a 3-D one cutting a clip into tubelets (video)
            return math.prod(shape[2:]) if shape and len(shape) in (4, 5) else None
        if n.target == aten.linear.default and shape and len(shape) == 3:
            # a linear layer fed only by re-layouts of the input image is a patch embedding
            ops = {a.target for a in facts.ancestors(n) if a.op == "call_function" and a in facts.data}
            if ops <= set(_LAYOUT_OPS):
                return shape[1]
    return None


def prefix_tokens(facts: GraphFacts, first_block_input: fx.Node, num_tokens: int) -> int:
    """Tokens that lead the sequence and do not come from image patches (class, distillation, registers)."""
    patches = _patch_count(facts)
    if patches is None:
        raise UnsupportedModelError("not supported yet: no patch embedding (a convolution, or a linear layer on "
                                    "the image cut into patches) found before the blocks")
    prefix = num_tokens - patches
    if prefix < 0:
        raise UnsupportedModelError(
            f"not supported yet: the blocks see {num_tokens} tokens but the patch grid has {patches}"
        )
    if prefix:
        # the sequence is assembled by a cat along the token axis; its last part must be the patches
        cats = [n for n in facts.ancestors(first_block_input) | {first_block_input}
                if n.op == "call_function" and n.target == aten.cat.default and n in facts.data and shape_of(n)
                and len(shape_of(n)) == 3 and shape_of(n)[1] == num_tokens]
        if cats:
            last_cat = max(cats, key=lambda n: facts.order[n])
            last_part = last_cat.args[0][-1]
            if last_part not in facts.data:
                raise UnsupportedModelError(
                    "not supported yet: extra tokens are appended after the patch tokens (as in YOLOS)"
                )
    return prefix


def classify_heads(facts: GraphFacts, seq: fx.Node, prefix: int, grid: bool = False,
                   full: bool = False) -> tuple[list[str], list[str]]:
    """What consumes the final token sequence (token pool, average pool, attention pool, the
    sequence itself; a reshape of the patch tokens to their 2-D grid is the head "grid" where the
    family can hand the head the full grid (``grid``), else refused), and the modules the sequence
    passes through on its way there keeping its tokens (the final norm): those must pass the token
    sizes on to the head (merge/state.py ``carry_state``)."""
    heads: set[str] = set()
    carry: list[str] = []
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
            shape = shape_of(node)
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
            if t in ATTENTION_OPS or t in MATMUL_OPS:
                heads.add("attention-pool")
                continue
            if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and shape:
                out = shape_of(user)
                if out and len(out) == 4:
                    if grid and (full or _patch_grid(out, shape_of(seq), prefix)):  # full: the family hands
                        # the head the whole original sequence, whatever it reshapes it to
                        heads.add("grid")
                        continue
                    raise UnsupportedModelError(
                        "not supported yet: the tokens are reshaped to a 2-D grid after the blocks"
                    )
            out_shape = shape_of(user)
            path = module_path(user)
            if path and shape and out_shape and len(out_shape) == 3 and out_shape[:2] == shape[:2] and path not in carry:
                carry.append(path)
            frontier.append(user)
    return sorted(heads), carry




def _patch_grid(out: tuple, seq: tuple | None, prefix: int) -> bool:
    """Whether a 4-D reshape lays the patch tokens of ``seq`` (B, prefix + P, C) out on their grid:
    (B, h, w, C) or (B, C, h, w) with h * w = P."""
    if not seq or len(seq) != 3:
        return False
    patches = seq[1] - prefix
    return (out[1] * out[2] == patches and out[3] == seq[2]) or (out[2] * out[3] == patches and out[1] == seq[2])


def read_as_grid(facts: GraphFacts, seq: fx.Node, inside: list[str]) -> bool:
    """Whether anything outside the blocks (module paths ``inside``) lays this intermediate block
    output out as a 2-D grid (an HF Backbone reshaping its stage outputs, DPT's reassembly): the
    block then hands out its tokens spread over the full grid (a dense model)."""
    frontier, seen = [seq], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            path = module_path(user) or ""
            if any(path == b or path.startswith(b + ".") for b in inside):
                continue
            out = shape_of(user)
            if user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and out \
                    and len(out) == 4:
                return True
            frontier.append(user)
    return False
