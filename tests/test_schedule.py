"""The static schedule solver: tight landing on the FLOPs target, and no schedule costed twice."""
from __future__ import annotations

import pytest

from ltm_convert.rewriters.base import Site
from ltm_convert.schedule import shaped, solve


class VitCost:
    """A ViT-like cost: each block pays for the tokens it receives (quadratic part included) and for
    the tokens it keeps; records every schedule it is asked about."""

    def __init__(self, sites: list[Site], prefix: int) -> None:
        self.sites, self.prefix, self.asked = sites, prefix, []
        self.base = self._cost({s.name: s.mergeable for s in sites})

    def _cost(self, keep: dict[str, int]) -> float:
        m, total = self.sites[0].mergeable, 0.0
        for s in self.sites:
            n = self.prefix + m
            total += 1000 * n + n ** 2 + 2000 * (self.prefix + keep[s.name])
            m = keep[s.name]
        return total

    def flops(self, keep: dict[str, int]) -> float:
        self.asked.append(tuple(keep.values()))
        return self._cost(keep)


def chain(n: int, tokens: int) -> list[Site]:
    return [Site(name=f"blocks.{i}", mergeable=tokens, chained=True, prefix=1) for i in range(n)]


@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
@pytest.mark.parametrize("shape", ["fraction", "constant"])
def test_lands_within_a_thousandth_of_the_target(ratio, shape):
    cost = VitCost(chain(12, 256), 1)
    result = solve(cost.sites, cost, ratio, shape)
    tolerance = 0.001
    assert abs(cost._cost(result.keep) / cost.base - ratio) <= tolerance
    assert result.reachable and abs(result.flops_ratio - cost._cost(result.keep) / cost.base) < 1e-12


def test_coarse_counts_are_costed_once_each():
    """With few tokens many fractions give the same integer counts; each distinct schedule is
    costed once (for grid families a cost is built from counted forwards)."""
    cost = VitCost(chain(6, 16), 1)
    solve(cost.sites, cost, 0.55)
    assert len(cost.asked) == len(set(cost.asked)) + 1  # the chosen schedule is costed again for its verdict
    result = solve(cost.sites, cost, 0.55)
    assert abs(result.flops_ratio - 0.55) < 0.05


def test_shapes_keep_what_they_say():
    sites = chain(4, 100)
    assert list(shaped(sites, "fraction", 0.5).values()) == [50, 25, 12, 6]
    assert list(shaped(sites, "constant", 10).values()) == [90, 80, 70, 60]
    assert list(shaped(sites, "constant", 10.5).values()) == [89, 78, 68, 58]


def test_out_of_reach_is_one_clear_error():
    from ltm_convert.errors import LtmError

    cost = VitCost(chain(2, 16), 1)
    with pytest.raises(LtmError, match="out of reach"):
        solve(cost.sites, cost, 0.05)


@pytest.mark.parametrize("method", ["ltm", "ltm-dense", "tome", "tome_odd", "tofu", "ltmp"])
def test_mask_flops_formulas_match_flop_counter(method):
    """The schedule costs every mask by its own formula instead of counting each candidate schedule:
    the formula must be exactly what FlopCounterMode counts, for every token count and kept count."""
    import torch
    from timm.models.vision_transformer import Block

    from ltm_convert.flops import count_call
    from ltm_convert.merge.methods import MaskSpec, mask_factory

    block = Block(dim=48, num_heads=4).eval()
    spec = MaskSpec(dim=48, block=block, attn=block.attn, pre_norm="norm1", first=False,
                    topk=0 if method == "ltm-dense" else 4, index=5)
    mask = mask_factory(method.replace("-dense", ""))(spec).eval()  # inference FLOPs (training relaxes the merge)
    for n, keep, prefix in [(17, 12, 1), (65, 40, 1), (65, 10, 1), (197, 150, 1), (197, 30, 2), (50, 49, 0)]:
        z = torch.empty(1, n, 48, device="meta")
        sizes = torch.empty(1, n, device="meta")
        counted = count_call(lambda: mask.to("meta")(z, sizes, prefix, keep, False))
        assert mask.flops(n, keep, prefix) == counted, (n, keep, prefix)
