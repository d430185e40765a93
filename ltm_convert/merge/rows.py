"""Row gathers and row adds on (B, N, C) token tensors: the primitives every merge is written in.

All are flat ``index_select`` / ``index_add_`` / ``index_copy_`` over (B * N, C): several times faster than
``gather`` / ``scatter_add`` along dim 1 on CPU (whole rows move, not single elements), and they
export to ONNX as one Gather / ScatterElements each.
"""
from __future__ import annotations

import torch


def _flat(idx: torch.Tensor, rows: int) -> torch.Tensor:
    """Row indices idx (B, K) into a (B, rows, C) tensor, as indices into its (B * rows, C) view."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * rows).reshape(-1)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C). ONNX gets ``gather`` (GatherElements): the flat form's
    reshapes were exported with a batch-dependent shape that failed at another batch size."""
    B, N, C = x.shape
    if torch.onnx.is_in_onnx_export():
        return x.gather(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C))
    return x.reshape(B * N, C).index_select(0, _flat(idx, N)).view(B, idx.shape[1], C)


def add_rows(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) with rows src (B, K, C) added at rows idx (B, K); in place when x is contiguous
    (use the result). ONNX exports ``index_add`` as ScatterND, which *overwrites* repeated rows
    instead of summing them, so the export path takes ``scatter_add`` (ScatterElements, "add")."""
    B, T, C = x.shape
    if torch.onnx.is_in_onnx_export():
        return x.scatter_add_(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C), src)
    x = x.contiguous()  # a no-op for fresh tensors; strided inputs (every other row) get one copy
    return x.view(B * T, C).index_add_(0, _flat(idx, T), src.reshape(-1, C)).view(B, T, C)


def put_rows(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) with rows idx (B, K) overwritten by src (B, K, C); in place when x is contiguous
    (use the result). A row named twice must get the same value twice (which write wins is not
    defined); ONNX gets ``scatter`` (ScatterElements) as for :func:`add_rows`."""
    B, T, C = x.shape
    if torch.onnx.is_in_onnx_export():
        return x.scatter_(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C), src)
    x = x.contiguous()
    return x.view(B * T, C).index_copy_(0, _flat(idx, T), src.reshape(-1, C)).view(B, T, C)
