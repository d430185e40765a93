"""Turn a FLOPs ratio into static token counts: one solver for every family.

A family exposes its merge sites (``Site`` below: how many mergeable tokens enter,
which counts it may keep, whether it passes its output to the next site) and a cost model that
gives the FLOPs of any schedule (``CostModel.flops``, built from per-module FlopCounterMode counts
on a weightless copy of the model, so no schedule needs a full counted forward). The solver
picks, within a schedule *shape*, the schedule whose FLOPs land closest to ratio x the original:

* ``fraction``: every site keeps the same fraction of the tokens it receives;
* ``constant``: every site removes the same number of tokens (ToMe's constant r);
* ``calibrated``: a measured profile (calibrate.py: each site's weight says how hard it merges),
  scaled to the target.

The counts depend only on the configuration and the input resolution, so batching,
``torch.compile`` and export keep working.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from ltm_convert.config import (
    GRID_TOLERANCE,
    REACH_TOLERANCE,
    SCHEDULE_TOLERANCE,
    SCHEDULES,
)
from ltm_convert.errors import LtmError

@dataclass
class Site:
    """One place where a converted model merges: ``mergeable`` tokens enter it at the planned
    resolution (for a chained site: when no earlier site merged) and it may keep any of
    ``options`` of them. Chained sites (token sequences) pass their output on to the next site, so
    the next one receives what this one kept; grid sites are independent."""

    name: str
    mergeable: int  # tokens that may merge (prefix tokens excluded)
    options: list[int] = field(default_factory=list)  # allowed kept counts, ascending; empty = 1..mergeable
    chained: bool = True
    prefix: int = 0
    # nothing reads this site's mergeable tokens afterwards (the last block before a class-token
    # head): merging them all into one costs nothing in quality, so it keeps 1 whatever the shape
    free: bool = False

    def allowed(self, tokens_in: int) -> list[int]:
        return [k for k in self.options if k <= tokens_in] if self.options else list(range(1, tokens_in + 1))


class CostModel(Protocol):
    """FLOPs of any schedule, without counting the whole model again (the solver calls it often)."""

    base: float  # FLOPs of the model with merging off (the original's)

    def flops(self, keep: dict[str, int]) -> float: ...


@dataclass
class Schedule:
    """A solved schedule and the library's verdict on it (the CLI only prints it)."""

    keep: dict[str, int]
    flops: float
    flops_ratio: float
    target: float
    reachable: bool  # within REACH_TOLERANCE x target of the target
    weights: dict[str, float] | None = None  # the calibrated profile it was scaled from (calibrate.py)

    def note(self, model_class: str) -> str | None:
        if self.reachable:
            return None
        return (f"ratio {self.target} is not reachable with the merges {model_class} allows (the merged parts hold "
                f"too few of the FLOPs, or the grids are too coarse); the closest schedule reaches {self.flops_ratio:.3f}")


def full_keep(sites: Sequence["Site"]) -> dict[str, int]:
    """The schedule that merges nothing (the original computation, free sites included)."""
    return {s.name: s.mergeable for s in sites}


def _nearest(site: "Site", tokens_in: int, want: float) -> int:
    allowed = site.allowed(tokens_in)
    return min(allowed, key=lambda k: (abs(k - want), -k))


def shaped(sites: Sequence["Site"], shape: str, t: float, weights: dict[str, float] | None = None) -> dict[str, int]:
    """The schedule of ``shape`` at strength ``t``: the kept fraction for ``fraction`` (1 keeps all),
    the tokens removed per site for ``constant`` (a fractional t removes one more token in the
    first sites, so the FLOPs move in small steps, not a whole token per site at once), and for
    ``calibrated`` each site keeps 1 - t x its weight of what it receives (0 keeps all)."""
    keep: dict[str, int] = {}
    m = None
    n = sum(not s.free for s in sites)
    for i, site in enumerate(sites):
        tokens_in = m if (site.chained and m is not None) else site.mergeable
        if site.free:
            keep[site.name] = 1
            m = 1 if site.chained else None
            continue
        if shape == "calibrated":
            want = tokens_in * max(0.0, 1.0 - t * (weights or {}).get(site.name, 0.0))
        elif shape == "fraction":
            want = t * tokens_in
        else:
            want = tokens_in - math.floor(t + (n - 1 - i) / n)
        k = max(1, min(tokens_in, int(round(want)))) if not site.options else _nearest(site, tokens_in, want)
        keep[site.name] = k
        m = k if site.chained else None
    return keep


def solve(sites: Sequence["Site"], cost: CostModel, ratio: float, shape: str = "fraction",
          tolerance: float = SCHEDULE_TOLERANCE, model_class: str = "the model",
          max_combinations: int = 200_000, weights: dict[str, float] | None = None) -> Schedule:
    """The schedule of ``shape`` whose FLOPs land closest to ``ratio`` x the original.

    The tolerance is tight (0.1% of the original FLOPs) so that two methods converted to the same
    ratio really cost the same: their masks differ in FLOPs, and a loose tolerance let one land
    0.5% above the target and another 0.5% below it, which then showed up as a speed difference.
    """
    if shape not in SCHEDULES:
        raise LtmError(f"unknown schedule {shape!r}; choose one of {', '.join(SCHEDULES)}")
    if shape == "calibrated" and not any(w > 0 for w in (weights or {}).values()):
        shape = "fraction"  # nothing measured to merge (ratio 1, or no site can merge): any shape is the same
    target = ratio * cost.base

    def result(keep: dict[str, int]) -> Schedule:
        flops = cost.flops(keep)
        return Schedule(keep, flops, flops / cost.base, ratio, abs(flops / cost.base - ratio) <= REACH_TOLERANCE * ratio)

    if ratio >= 1.0:
        return result(full_keep(sites))
    if all(s.free for s in sites):
        return result(shaped(sites, shape, 1.0))
    independent = all(not s.chained for s in sites)
    if independent and math.prod(len(s.options or range(s.mergeable)) for s in sites) <= max_combinations:
        return result(_exhaustive(sites, cost, target, max(tolerance, GRID_TOLERANCE)))
    seen: dict[tuple[int, ...], float] = {}

    def error(t: float) -> float:
        keep = shaped(sites, shape, t, weights)
        key = tuple(keep.values())
        if key not in seen:
            seen[key] = (cost.flops(keep) - target) / cost.base
        return seen[key]

    # strength from "merge nothing" to "merge the most": fraction 1 -> 0, constant 0 -> max tokens
    if shape == "calibrated":
        lo, hi = 0.0, 1.0 / min(w for w in weights.values() if w > 0)  # type: ignore[union-attr]
    else:
        lo, hi = (1.0, 1e-9) if shape == "fraction" else (0.0, float(max(s.mergeable for s in sites)))
    e_lo, e_hi = error(lo), error(hi)
    if e_hi > REACH_TOLERANCE * ratio and not independent:
        floor = e_hi + ratio
        raise LtmError(
            f"ratio {ratio} is out of reach for this model: merging down to one token per block still "
            f"costs {floor:.3f} of the original FLOPs; choose --ratio >= {math.ceil(floor * 100) / 100:.2f}")
    best = min((abs(e_lo), lo), (abs(e_hi), hi))
    resolution = {"fraction": 1e-4, "calibrated": 1e-4 * abs(hi - lo)}.get(shape, 1.0 / (4 * len(sites)))
    side = 0
    for _ in range(40):  # regula falsi (Illinois): FLOPs fall smoothly as the strength grows
        if best[0] <= tolerance or abs(hi - lo) < resolution:
            break
        mid = hi - e_hi * (hi - lo) / (e_hi - e_lo) if e_hi != e_lo else (lo + hi) / 2
        if not min(lo, hi) < mid < max(lo, hi):
            mid = (lo + hi) / 2
        e_mid = error(mid)
        best = min(best, (abs(e_mid), mid))
        if e_mid < 0:  # too few FLOPs: move the "most merging" end in
            hi, e_hi = mid, e_mid
            if side == 1:
                e_lo /= 2
            side = 1
        else:
            lo, e_lo = mid, e_mid
            if side == -1:
                e_hi /= 2
            side = -1
    keep = shaped(sites, shape, best[1], weights)
    if shape == "calibrated" and best[0] > tolerance:
        keep = _trim(sites, cost, keep, target, tolerance)
    return result(keep)


def _trim(sites: Sequence["Site"], cost: CostModel, keep: dict[str, int], target: float,
          tolerance: float) -> dict[str, int]:
    """Close the last gap to the target by moving one site's count, latest sites first.

    A scaled profile moves several counts at once (a token fewer early is a token fewer in every
    later block), so its FLOPs can jump over the target; one late site's count moves them in
    small steps. Only counts that keep the chain valid (no site keeps more than it receives)
    are tried."""
    keep = dict(keep)
    inflow: dict[str, int] = {}
    m = None
    for site in sites:
        inflow[site.name] = m if (site.chained and m is not None) else site.mergeable
        m = keep[site.name] if site.chained else None
    for i in reversed(range(len(sites))):
        site = sites[i]
        if site.free:
            continue
        error = abs(cost.flops(keep) - target) / cost.base
        if error <= tolerance:
            break
        after = sites[i + 1] if i + 1 < len(sites) else None
        floor = keep[after.name] if after is not None and after.chained and site.chained and not after.free else 1
        choices = [k for k in site.allowed(inflow[site.name]) if k >= floor]
        best = min(choices, key=lambda k: abs(cost.flops({**keep, site.name: k}) - target))
        if abs(cost.flops({**keep, site.name: best}) - target) / cost.base < error:
            keep[site.name] = best
    return keep


def _exhaustive(sites: Sequence["Site"], cost: CostModel, target: float, tolerance: float) -> dict[str, int]:
    """Rank every combination of independent grid sites: the smallest error wins, and among
    schedules within ``tolerance`` the one that keeps the most in its most-merged site."""
    options = [s.options or list(range(1, s.mergeable + 1)) for s in sites]

    def rank(combo: tuple[int, ...]) -> tuple[float, float]:
        keep = {s.name: k for s, k in zip(sites, combo)}
        err = abs(cost.flops(keep) - target) / cost.base
        least_kept = min(k / s.mergeable for s, k in zip(sites, combo))
        return (max(err, tolerance), -least_kept)

    best = min(itertools.product(*options), key=rank)
    return {s.name: k for s, k in zip(sites, best)}


def fit_linear(basis: Callable[[int], list[float]], samples: dict[int, float]) -> Callable[[int], float]:
    """The exact curve through ``samples`` in a small basis (FLOPs of linear layers and attention
    are polynomials in the token count): as many samples as basis terms."""
    import torch

    xs = sorted(samples)
    a = torch.tensor([basis(x) for x in xs], dtype=torch.float64)
    y = torch.tensor([samples[x] for x in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, y).solution
    return lambda x: float(torch.tensor(basis(x), dtype=torch.float64) @ coef)


class GridCost:
    """FLOPs of any schedule of independent grid sites, from a few counted forwards.

    A site's merge changes FLOPs only inside its own modules, so one FlopCounterMode forward of the
    weightless model with every site set to its i-th probe measures all sites at once (per-module
    counts); a few probes fix every site's savings curve exactly in ``basis`` (the count is a
    polynomial in the target grid's size and shape), however many sites there are.
    """

    def __init__(self, meta_model, sites: Sequence["Site"], modules: dict[str, list[str]],
                 apply: Callable[[dict[str, int]], None], basis: Callable[["Site", int], list[float]],
                 size: tuple[int, int]) -> None:
        from ltm_convert.flops import count_flops_by_module

        full = full_keep(sites)
        names = sorted({m for ms in modules.values() for m in ms})
        apply(full)
        base_counts = count_flops_by_module(meta_model, size, names)
        probes = {s.name: _probes(s, len(basis(s, s.mergeable))) for s in sites}
        measured: dict[str, dict[int, float]] = {s.name: {} for s in sites}
        for i in range(max((len(p) for p in probes.values()), default=0)):
            choice = {s.name: probes[s.name][i] if i < len(probes[s.name]) else s.mergeable for s in sites}
            apply(choice)
            counts = count_flops_by_module(meta_model, size, names)
            for s in sites:
                if i < len(probes[s.name]):
                    measured[s.name][choice[s.name]] = float(sum(base_counts[m] - counts[m] for m in modules[s.name]))
        apply(full)
        self.base = float(_total(meta_model, size))
        self.savings: dict[str, dict[int, float]] = {}
        for s in sites:
            curve = fit_linear(lambda k, s=s: basis(s, k), measured[s.name]) if measured[s.name] else (lambda k: 0.0)
            self.savings[s.name] = {k: (0.0 if k >= s.mergeable else curve(k)) for k in s.allowed(s.mergeable)}

    def flops(self, keep: dict[str, int]) -> float:
        return self.base - sum(self.savings[name][k] for name, k in keep.items())


def _probes(site: "Site", terms: int) -> list[int]:
    """Merged options of a site to count (as many as the basis has terms, spread out)."""
    merged = [k for k in site.allowed(site.mergeable) if k < site.mergeable]
    if len(merged) <= terms:
        return merged
    idx = [round(i * (len(merged) - 1) / (terms - 1)) for i in range(terms)]
    return [merged[i] for i in sorted(set(idx))]


def _total(meta_model, size: tuple[int, int]) -> int:
    from ltm_convert.flops import count_flops

    return count_flops(meta_model, size)
