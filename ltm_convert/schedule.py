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
          measure: Callable[[], int], base_flops: int, tolerance: float = 0.001, steps: int = 24) -> float:
    """Find the keep fraction whose measured FLOPs are closest to ratio x base_flops.

    The tolerance is tight (0.1% of the original FLOPs) so that two methods converted to the same
    ratio really cost the same: their mask modules differ in FLOPs, and a loose tolerance let one
    land 0.5% above the target and another 0.5% below it, which then shows up as a speed difference.

    FLOPs grow smoothly with the fraction, so regula falsi (Illinois variant) needs a handful of
    measurements where bisection needs a dozen; each measurement is a real FlopCounterMode run.
    """
    if ratio >= 1.0:
        apply_fraction(blocks, 1.0, num_tokens, prefix)
        return 1.0
    target = ratio * base_flops
    seen: dict[tuple[int, ...], float] = {}  # token counts are integers: many fractions share them

    def error(fraction: float) -> float:
        counts = tuple(apply_fraction(blocks, fraction, num_tokens, prefix))
        if counts not in seen:
            seen[counts] = (measure() - target) / base_flops
        return seen[counts]

    lo, hi = 1e-9, 1.0
    e_lo, e_hi = error(lo), 1.0 - ratio
    if e_lo > 0.02 * ratio:
        apply_fraction(blocks, 1.0, num_tokens, prefix)
        floor = e_lo + ratio
        raise LtmError(
            f"ratio {ratio} is out of reach for this model: merging down to one token per block still "
            f"costs {floor:.3f} of the original FLOPs; choose --ratio >= {floor:.2f}"
        )
    best = min((abs(e_lo), lo), (abs(e_hi), hi))
    side = 0
    for _ in range(steps):
        if best[0] <= tolerance:
            break
        mid = hi - e_hi * (hi - lo) / (e_hi - e_lo) if e_hi != e_lo else (lo + hi) / 2
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        e_mid = error(mid)
        best = min(best, (abs(e_mid), mid))
        if e_mid > 0:
            hi, e_hi = mid, e_mid
            if side == 1:
                e_lo /= 2
            side = 1
        else:
            lo, e_lo = mid, e_mid
            if side == -1:
                e_hi /= 2
            side = -1
        if hi - lo < 1e-4:
            break
    apply_fraction(blocks, best[1], num_tokens, prefix)
    return best[1]
