"""The static schedule solver: tight landing on the FLOPs target, and no FLOP count done twice."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ltm_convert.schedule import solve


def blocks(n: int) -> list:
    return [SimpleNamespace(ltm_tokens_in=0, ltm_keep=0, ltm_prop_attn=False) for _ in range(n)]


def flops_of(bs: list, prefix: int) -> int:
    """A ViT-like cost: each block pays for the tokens it receives (quadratic part included)."""
    return sum(1000 * (b.ltm_tokens_in) + (b.ltm_tokens_in ** 2) for b in bs) + sum(
        2000 * (prefix + b.ltm_keep) for b in bs)


@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
def test_lands_within_a_thousandth_of_the_target(ratio):
    bs = blocks(12)
    base = 12 * (1000 * 257 + 257 ** 2 + 2000 * 257)
    solve(bs, ratio, 257, 1, measure=lambda: flops_of(bs, 1), base_flops=base)
    assert abs(flops_of(bs, 1) / base - ratio) <= 0.001


def test_coarse_counts_are_measured_once_each():
    """With few tokens many fractions give the same integer counts; each distinct schedule is
    counted once (a real count is a whole FlopCounterMode forward)."""
    bs = blocks(6)
    seen: list[tuple] = []

    def measure() -> int:
        seen.append(tuple(b.ltm_keep for b in bs))
        return flops_of(bs, 1)

    base = 6 * (1000 * 17 + 17 ** 2 + 2000 * 17)
    solve(bs, 0.55, 17, 1, measure=measure, base_flops=base)
    assert len(seen) == len(set(seen))
    assert abs(flops_of(bs, 1) / base - 0.55) < 0.05
