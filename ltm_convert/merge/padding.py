"""Merging a padded batch (NaFlex inputs): real tokens and padding tokens never share a merged token.

A NaFlex batch packs images of different patch counts into one (B, N) sequence and marks the
padding with a validity mask. A merge must keep every image's sequence at the same static length
(``prefix + keep`` tokens), and a real token must never absorb a padding token (nor the reverse):
the merged token would be masked out of attention, or leak padding into the image's features.

Per image with ``v`` real and ``p`` padding mergeable tokens, ``r`` slots go to the real tokens:
as many as the block keeps for that image alone (``share(v)``, the block's ``keep_for``), so an
image's tokens, and its output, do not depend on how much padding the batch adds (otherwise a short
image in a long batch would fit its tokens into the spare slots and merge less than alone); at most
``keep - 1`` when there is padding. The block's own merge method merges the real tokens into r; the
remaining ``keep - r`` slots go to the padding (the first padding tokens keep a slot each, the rest
share the last one). Where the planned count leaves a padded image no slot for its padding (a few
tokens per block), the batch keeps one token more in that block than planned. Images with equal ``v`` are merged together, one mask call per distinct count,
so a batch without padding costs one call, as without a mask. The merged sequence is laid out
[prefix, real tokens, padding] with its validity, from which later blocks rebuild their attention
mask (rewriters/naflex.py).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ltm_convert.errors import LtmError
from ltm_convert.merge.rows import take_rows


_SHARE = threading.local()


@contextmanager
def image_share(share: Callable[[int], int]) -> Iterator[None]:
    """Within: an image of ``v`` real mergeable tokens keeps ``share(v)`` of them (the merging block
    sets it: what it keeps for an unpadded input of that length)."""
    previous = getattr(_SHARE, "fn", None)
    _SHARE.fn = share
    try:
        yield
    finally:
        _SHARE.fn = previous


def merge_padded(mask: Any, z: torch.Tensor, sizes: torch.Tensor | None, valid: torch.Tensor, prefix: int,
                 keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge z (B, N, C) with validity ``valid`` (B, N) bool (prefix tokens valid) to prefix + keep tokens.

    Returns (tokens (B, prefix + keep, C), sizes (B, prefix + keep) float32, dest (B, N) int64: the
    output row of every input token, validity (B, prefix + keep) bool). ``mask`` is the block's
    sequence mask (merge/state.py ``SequenceMask``), called on the real tokens only.
    """
    B, N, C = z.shape
    M = N - prefix
    if sizes is None:
        sizes = z.new_ones(B, N, dtype=torch.float32)
    if mask.soft():
        raise LtmError("the relaxed merge of training keeps every token and cannot hold padding apart from real "
                       "patches; fine-tune on NaFlex batches with the hard merge (--training-merge hard, or the mask "
                       "in eval mode)")
    real = valid[:, prefix:]
    counts = real.sum(1)
    share = getattr(_SHARE, "fn", None)
    values = counts.unique().tolist()

    def real_slots(v: int, room: int) -> int:
        return min(v, share(v)) if share is not None else min(v, room - (1 if v < M else 0))

    # every padded image needs one slot beyond its real tokens: where the planned count leaves none (a
    # few tokens per block), this batch keeps one more token here than planned
    keep = max([keep] + [real_slots(v, keep) + 1 for v in values if v < M])
    out = z.new_empty(B, prefix + keep, C)
    out_sizes = sizes.new_empty(B, prefix + keep, dtype=torch.float32)
    dest = torch.empty(B, N, dtype=torch.long, device=z.device)
    new_valid = torch.zeros(B, prefix + keep, dtype=torch.bool, device=z.device)
    new_valid[:, :prefix] = True
    front = torch.arange(prefix, device=z.device)
    for v in values:
        rows = (counts == v).nonzero().squeeze(1)
        b, p = rows.numel(), M - v
        r = min(real_slots(v, keep), keep - (1 if p else 0))
        # real tokens first, each part in its original order
        order = torch.argsort((~real[rows]).to(torch.int8), dim=1, stable=True)
        real_idx, pad_idx = order[:, :v], order[:, v:]
        zb, sb = z[rows], sizes[rows].float()
        z_real = torch.cat([zb[:, :prefix], take_rows(zb[:, prefix:], real_idx)], dim=1)
        s_real = torch.cat([sb[:, :prefix], sb[:, prefix:].gather(1, real_idx)], dim=1)
        if r < v:
            m_z, m_s, d = mask(z_real, s_real, prefix, r, True)
            if d is None:
                raise LtmError(f"merge method {type(mask).__name__} did not report where its tokens went; "
                               "it cannot merge padded NaFlex batches")
        else:
            m_z, m_s, d = z_real, s_real, torch.arange(prefix + v, device=z.device).expand(b, prefix + v)
        q = keep - r  # padding slots (an unpadded image may get an empty one: size 0, never valid)
        slot = (torch.arange(p, device=z.device).clamp_max(q - 1) if p else
                torch.empty(0, dtype=torch.long, device=z.device))
        ps = sb[:, prefix:].gather(1, pad_idx)
        pz = take_rows(zb[:, prefix:], pad_idx)
        pad_sizes = ps.new_zeros(b, q).index_add_(1, slot, ps)
        pad_sum = pz.new_zeros(b, q, C).index_add_(1, slot, pz * ps.unsqueeze(-1).to(pz.dtype))
        pad_out = pad_sum / pad_sizes.clamp_min(1e-6).unsqueeze(-1).to(pz.dtype)
        out[rows] = torch.cat([m_z.to(z.dtype), pad_out], dim=1)
        out_sizes[rows] = torch.cat([m_s.float(), pad_sizes], dim=1)
        new_valid[rows, prefix:prefix + r] = True
        row_dest = torch.empty(b, N, dtype=torch.long, device=z.device)
        row_dest[:, :prefix] = front
        row_dest.scatter_(1, real_idx + prefix, d[:, prefix:])
        row_dest.scatter_(1, pad_idx + prefix, (prefix + r + slot).expand(b, p))
        dest[rows] = row_dest
    return out, out_sizes, dest, new_valid
