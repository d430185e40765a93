"""Rotary position tables for merged tokens: the model's own rope evaluated where a merged token is.

A merged token stands for a set of original patches (``TokenState.source``). Its position is the
mean of its members' coordinates, in the coordinates the model's rope module defines (timm's
index / pixel / centred grids, HF DINOv3's patch centres in [-1, 1]), and its rotation is the
model's own rope function at that continuous position: a valid rotation, the function the model
was trained with (DINOv3 trains on jittered, rescaled coordinates). Two cheaper variants are kept
for measurement: the size-weighted mean of the members' sin/cos rows ("rows": not a rotation, its
norm shrinks with the members' spread) and the row of the token it was merged into ("target").

One adapter per rope module: ``patch_coords(grid)`` gives the original patches' coordinates
(P, 2) as the model computes them, ``table(coords, like, block_index)`` the table at arbitrary
coordinates (B, N, 2) in the layout the block receives (``like``), with a leading batch dim that
broadcasts over heads. At the original coordinates the table equals the model's own table exactly
(tests/test_rotary.py). Adapters hold a reference to the model's rope module (never a tensor), so
they follow the model through deepcopy and pickling. Prefix tokens (class, registers) get no row:
the models rotate only the patch tokens (HF MLCD rotates its class token too, and is refused).
"""
from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import nn

# models whose rope the merge cannot follow, with the reason (rewriters/rotary.py refuses them)
REFUSED = {
    "MLCDRotaryEmbedding": (
        "MLCD's attention turns its (cos, sin) into one table for the whole batch (unsqueeze(0)) and "
        "rotates the class token with a learned angle, so merged tokens, which sit at other positions "
        "in every image, cannot get their own rotation"),
    "VJEPA2RopeAttention": (
        "V-JEPA 2's attention derives each token's rotary position from its index in the sequence "
        "(VJEPA2RopeAttention.get_position_ids splits torch.arange(tokens) into frame, row and column), not from "
        "a table the block receives, so merged tokens would silently rotate as the first tokens of the clip; the "
        "vjepa2 family (rewriters/vjepa2.py) hands each block the merged tokens' positions, other families cannot"),
}


def _module_function(module: nn.Module, name: str) -> Any:
    """A function from the module's own source file (the model's code, not a copy of it)."""
    return getattr(importlib.import_module(type(module).__module__), name)


class RopeAdapter:
    """How one kind of rope module places patches and evaluates its table (see the module docstring)."""

    param = "rope"  # the block parameter that receives the table
    functions: tuple[str, ...] = ()  # the model's own helpers the adapter calls, from the rope module's file

    def __init__(self, rope: nn.Module) -> None:
        self.rope = rope
        # resolved once: a module look-up inside forward would stop torch.compile's graph capture
        self.fn = {name: _module_function(rope, name) for name in self.functions}

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def table(self, coords: torch.Tensor, like: Any, block_index: int) -> Any:
        raise NotImplementedError


class TimmAxialRope(RopeAdapter):
    """timm ``RotaryEmbeddingCat`` (EVA02, PE, ``vit_*_rope_*``): sin/cos of coordinate x band."""

    functions = ("_build_grid", "_rope_layout")

    def _grid(self, grid: tuple[int, int], device: torch.device, grid_type: str, **extra: Any) -> torch.Tensor:
        r = self.rope
        return self.fn["_build_grid"](list(grid), grid_type=grid_type, grid_offset=r.grid_offset, grid_indexing=r.grid_indexing,
                     normalize_coords=r.normalize_coords, device=device, **extra).flatten(0, -2)

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return self._grid(grid, device, self.rope.grid_type, ref_feat_shape=self.rope.ref_feat_shape)

    def table(self, coords: torch.Tensor, like: Any, block_index: int) -> torch.Tensor:
        layout = self.fn["_rope_layout"]
        bands = self.rope.bands.to(coords.device)
        pos = coords.unsqueeze(-1) * bands  # (B, N, 2, bands), as build_fourier_pos_embed
        sin = layout(pos.sin().float().flatten(-2), self.rope.rotate_half)
        cos = layout(pos.cos().float().flatten(-2), self.rope.rotate_half)
        return torch.cat([sin, cos], -1).to(like.dtype).unsqueeze(1)  # (B, 1, N, 2 dim): broadcasts over heads


class TimmDinoV3Rope(TimmAxialRope):
    """timm ``RotaryEmbeddingDinoV3``: centred coordinates in [-1, 1], periods instead of bands."""

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return self._grid(grid, device, "centered", ndim=2)

    def table(self, coords: torch.Tensor, like: Any, block_index: int) -> torch.Tensor:
        B, N, _ = coords.shape
        sin, cos = self.rope._get_pos_embed_from_coords(coords.reshape(B * N, 2))
        return torch.cat([sin, cos], -1).to(like.dtype).reshape(B, 1, N, -1)


class TimmMixedRope(RopeAdapter):
    """timm ``RotaryEmbeddingMixed`` (RoPE-Mixed): learned frequencies per block and head."""

    functions = ("get_mixed_grid", "get_mixed_freqs")

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        t_x, t_y = self.fn["get_mixed_grid"](list(grid), grid_indexing=self.rope.grid_indexing, device=device)
        return torch.stack([t_x, t_y], -1)

    def table(self, coords: torch.Tensor, like: Any, block_index: int) -> torch.Tensor:
        freqs = self.rope.freqs[:, block_index]  # (2, heads, head_dim / 2)
        mixed = self.fn["get_mixed_freqs"]
        # (B, 1, N) coordinates against (heads, 1, head_dim / 2) frequencies: (B, heads, N, 2 head_dim)
        return mixed(freqs, coords[..., 0].unsqueeze(1), coords[..., 1].unsqueeze(1), dtype=like.dtype)


class HfDinoV3Rope(RopeAdapter):
    """HF ``DINOv3ViTRopePositionEmbedding``: patch centres in [-1, 1]; the block receives (cos, sin)."""

    param = "position_embeddings"
    functions = ("get_patches_center_coordinates",)

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return self.fn["get_patches_center_coordinates"](grid[0], grid[1], dtype=torch.float32, device=device)

    def table(self, coords: torch.Tensor, like: Any, block_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.rope.inv_freq.to(coords.device)
        angles = 2 * math.pi * coords[..., None] * inv_freq  # as the module's forward, with a batch dim
        angles = angles.flatten(-2).tile(2)
        cos, sin = like
        return angles.cos().to(cos.dtype).unsqueeze(1), angles.sin().to(sin.dtype).unsqueeze(1)


_ADAPTERS = {
    "RotaryEmbeddingCat": TimmAxialRope,
    "RotaryEmbeddingDinoV3": TimmDinoV3Rope,
    "RotaryEmbeddingMixed": TimmMixedRope,
    "DINOv3ViTRopePositionEmbedding": HfDinoV3Rope,
}
ROPE_PARAMS = frozenset(cls.param for cls in _ADAPTERS.values())  # block parameters that receive a table


def adapter_for(module: nn.Module) -> RopeAdapter | str | None:
    """The adapter of a rope module this file knows, the reason one cannot be followed, or None."""
    name = type(module).__name__
    origin = type(module).__module__
    if not origin.startswith(("timm.", "transformers.")):
        return None
    if name in REFUSED:
        return REFUSED[name]
    cls = _ADAPTERS.get(name)
    return cls(module) if cls is not None else None


def refused_positions(modules: Any) -> str | None:
    """Why the positions of one of these modules cannot follow merged tokens (:data:`REFUSED`), or None:
    every token-sequence family asks, since a rope computed inside the attention leaves no per-token
    table for them to notice."""
    return next((r for r in (adapter_for(m) for m in modules) if isinstance(r, str)), None)


def grid_for(patches: int, aspect: tuple[int, int]) -> tuple[int, int] | None:
    """(rows, columns) of a patch grid with ``patches`` patches and the planned grid's aspect."""
    rows = max(1, round(math.sqrt(patches * aspect[0] / aspect[1])))
    return (rows, patches // rows) if patches % rows == 0 else None


# --------------------------------------------------------------------------------------------
# member statistics from the source map (B, P0): original patch -> index of the token holding it


def _token_index(source: torch.Tensor, prefix: int) -> torch.Tensor:
    return source - prefix  # patch tokens only: prefix tokens are never merged


def member_counts(source: torch.Tensor, prefix: int, tokens: int) -> torch.Tensor:
    """(B, tokens) original patches each patch token holds (at least 1: no division by zero)."""
    idx = _token_index(source, prefix)
    ones = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    return torch.zeros(idx.shape[0], tokens, dtype=torch.float32, device=idx.device).scatter_add_(1, idx, ones) \
        .clamp_min(1.0)


def merged_coords(coords: torch.Tensor, source: torch.Tensor, prefix: int, tokens: int) -> torch.Tensor:
    """(B, tokens, 2) mean coordinates of each patch token's members (every original patch has size 1,
    so this is the size-weighted mean over the tokens it merged)."""
    idx = _token_index(source, prefix)
    B, P = idx.shape
    total = torch.zeros(B, tokens, coords.shape[-1], dtype=coords.dtype, device=coords.device)
    total.scatter_add_(1, idx.unsqueeze(-1).expand(B, P, coords.shape[-1]), coords.expand(B, P, coords.shape[-1]))
    return total / member_counts(source, prefix, tokens).unsqueeze(-1).to(coords.dtype)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A table (..., P, D) as (B, L, P, D): a batch dim in front and at least one dim (heads) before P."""
    t = t if t.dim() >= 3 else t.unsqueeze(0)
    return t.expand(batch, *t.shape) if t.dim() == 3 else t


def mean_rows(table: torch.Tensor, source: torch.Tensor, prefix: int, tokens: int) -> torch.Tensor:
    """(B, L, tokens, D): each patch token's row is the mean of its members' rows ("rows")."""
    idx = _token_index(source, prefix)
    t = _batched(table, idx.shape[0])
    B, L, P, D = t.shape
    index = idx[:, None, :, None].expand(B, L, P, D)
    total = torch.zeros(B, L, tokens, D, dtype=torch.float32, device=t.device).scatter_add_(2, index, t.float())
    return (total / member_counts(source, prefix, tokens)[:, None, :, None]).to(table.dtype)


def gather_rows(table: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """(B, L, N, D): the row of the original patch each token is (``origin`` (B, N)), ("target")."""
    t = _batched(table, origin.shape[0])
    B, L, _, D = t.shape
    return t.gather(2, origin[:, None, :, None].expand(B, L, origin.shape[1], D))
