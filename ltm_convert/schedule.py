"""Turn a FLOPs ratio into static token counts per block.

Every converted block keeps the same fraction f of the mergeable tokens it receives; f is found by
bisection so that the FLOPs measured with torch.utils.flop_counter (mask modules included) land
within tolerance of ratio x the original FLOPs. The counts depend only on the configuration and
the input resolution, so batching, torch.compile and export keep working.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ltm_convert.errors import LtmError
from ltm_convert.ltm_block import LtmBlock


def apply_fraction(blocks: Sequence[LtmBlock], fraction: float, num_tokens: int, prefix: int) -> list[int]:
    """Set each block's kept token count for keep-fraction ``fraction``; returns the counts."""
    m = num_tokens - prefix
    merged_before = False
    counts = []
    for block in blocks:
        keep = m if fraction >= 1.0 else max(1, min(m, int(round(fraction * m))))
        block.ltm_tokens_in = prefix + m
        block.ltm_keep = keep
        block.ltm_prop_attn = merged_before
        merged_before = merged_before or keep < m
        counts.append(keep)
        m = keep
    return counts


def solve(blocks: Sequence[LtmBlock], ratio: float, num_tokens: int, prefix: int,
          measure: Callable[[], int], base_flops: int, tolerance: float = 0.005, steps: int = 24) -> float:
    """Find the keep fraction whose measured FLOPs are closest to ratio x base_flops."""
    if ratio >= 1.0:
        apply_fraction(blocks, 1.0, num_tokens, prefix)
        return 1.0
    target = ratio * base_flops
    lo, hi = 0.0, 1.0
    apply_fraction(blocks, 1e-9, num_tokens, prefix)
    floor = measure()
    if floor > target * 1.02:
        apply_fraction(blocks, 1.0, num_tokens, prefix)
        raise LtmError(
            f"ratio {ratio} is out of reach for this model: merging down to one token per block still "
            f"costs {floor / base_flops:.3f} of the original FLOPs; choose --ratio >= {floor / base_flops:.2f}"
        )
    best = (abs(floor - target), 1e-9)
    for _ in range(steps):
        mid = (lo + hi) / 2
        apply_fraction(blocks, mid, num_tokens, prefix)
        flops = measure()
        err = abs(flops - target)
        if err < best[0]:
            best = (err, mid)
        if err <= tolerance * base_flops:
            break
        if flops > target:
            hi = mid
        else:
            lo = mid
    apply_fraction(blocks, best[1], num_tokens, prefix)
    return best[1]
