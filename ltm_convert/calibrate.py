"""The calibrated schedule: spend the FLOPs budget where merging costs least, as measured.

A fixed shape (``fraction``, ``constant``) guesses where merging hurts. This measures it: on a few
images, a greedy search lowers one site's kept fraction at a time, always the step that costs the
least agreement with the original per FLOP it saves, until the budget is met. Its result is a
profile of how hard each site merges (a weight per site); the solver then scales that profile to
land on the exact FLOPs target (``schedule.shaped`` with ``weights``), so the calibrated
schedule costs what any other schedule at that ratio costs and comparisons stay fair.

Measured, not modelled: each candidate step is a real forward of the converted model (its own
merge method) at that schedule, so the interactions between sites (a token merged early is not
there to be merged later) are in the numbers. The search is lazy (a step's stale price is only
recomputed when it is the cheapest on offer), so it needs about three forwards per step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn as nn

from ltm_convert.errors import LtmError
from ltm_convert.metrics import agreement, compared_output

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.rewriters.base import Site
    from ltm_convert.schedule import CostModel

CALIBRATION_STEP = 0.05  # a step lowers one site's kept fraction by this much
MAX_CALIBRATION_IMAGES = 64  # more images cost forwards, not quality of the profile


def default_calibration_images() -> list[Any]:
    """Four real photos from scikit-image and their mirror images: enough to rank where merging
    costs (the profile is a property of the model more than of the images)."""
    try:
        import numpy as np
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LtmError("the calibrated schedule's default images need scikit-image; run `pip install scikit-image` "
                       "or pass calibration images") from exc
    photos = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    return photos + [np.ascontiguousarray(p[:, ::-1]) for p in photos]


def calibration_batch(model: nn.Module, images: Any, size: tuple[int, int]) -> torch.Tensor:
    """Images (paths, a folder, PIL, arrays, or a (N, 3, H, W) tensor in [0, 1]) -> the model's input."""
    from pathlib import Path

    from ltm_convert.images import folder_photos, model_input

    if images is None:
        images = default_calibration_images()
    elif isinstance(images, (str, Path)) and not Path(images).is_dir():
        images = [images]
    elif isinstance(images, (str, Path)):
        images = folder_photos(Path(images), "the calibration folder")
    if isinstance(images, torch.Tensor):
        items = list(images) if images.dim() == 4 else [images]
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise LtmError("the calibrated schedule got no calibration images; pass some, or none for the default photos")
    return model_input(model, items[:MAX_CALIBRATION_IMAGES], size)


class AgreementLoss:
    """1 - mean :func:`ltm_convert.metrics.agreement` of the model's output at a schedule with its
    output with no merging."""

    def __init__(self, model: nn.Module, apply: Callable[[dict[str, int]], None], full: dict[str, int],
                 inputs: torch.Tensor) -> None:
        self.model, self.apply, self.inputs = model, apply, inputs
        self.reference = self._output(full)
        self.calls = 0

    def _output(self, keep: dict[str, int]) -> torch.Tensor:
        self.apply(keep)
        with torch.no_grad():
            return compared_output(self.model, self.inputs)

    def __call__(self, keep: dict[str, int]) -> float:
        self.calls += 1
        return float(1 - agreement(self._output(keep), self.reference).mean())


def calibrate(sites: Sequence["Site"], cost: "CostModel", ratio: float, loss: Callable[[dict[str, int]], float],
              step: float = CALIBRATION_STEP) -> dict[str, float]:
    """Per-site merge weights (1 - kept fraction after a lazy greedy search down to ``ratio``).

    Each step lowers one site's kept fraction by ``step``; the chosen step is the one with the
    least measured loss per FLOP saved. Prices are recomputed lazily: a step whose stale price
    is the lowest is measured again, and taken if it still is.
    """
    from ltm_convert.schedule import shaped

    names = [s.name for s in sites if not s.free]
    if not names or ratio >= 1.0:
        return {n: 0.0 for n in names}
    target = ratio * cost.base
    weights = {n: 0.0 for n in names}

    def keep_of(w: dict[str, float]) -> dict[str, int]:
        return shaped(sites, "calibrated", 1.0, w)

    current = keep_of(weights)
    here_flops, here_loss = cost.flops(current), loss(current)

    def price(name: str) -> tuple[float, float, dict[str, int], float, float] | None:
        """(loss per FLOP saved, new weight, schedule, its FLOPs, its loss) of one more step at
        ``name``; a step too small to change a count is lengthened until it does."""
        trial = dict(weights)
        keep = current
        while keep == current and trial[name] < 1.0:
            trial[name] = min(1.0, trial[name] + step)
            keep = keep_of(trial)
        if keep == current:  # the site is already at one token (or on its coarsest option)
            return None
        flops = cost.flops(keep)
        saved = here_flops - flops
        if saved <= 0:
            return None
        value = loss(keep)
        return (value - here_loss) / saved, trial[name], keep, flops, value

    # name -> (price, steps taken when it was measured, the measured step); a price measured at
    # the current state is fresh and is taken without measuring it again
    offers: dict[str, tuple[float, int, tuple]] = {}
    taken = 0
    for n in names:
        p = price(n)
        if p is not None:
            offers[n] = (p[0], taken, p)
    while here_flops > target and offers:
        name = min(offers, key=lambda n: offers[n][0])
        value, when, p = offers[name]
        if when != taken:  # stale: measure again, and take it only if it is still the cheapest
            fresh = price(name)
            if fresh is None:
                del offers[name]
                continue
            offers[name] = (fresh[0], taken, fresh)
            rivals = [v[0] for k, v in offers.items() if k != name]
            if rivals and fresh[0] > min(rivals):
                continue
            p = fresh
        _, weights[name], current, here_flops, here_loss = p
        taken += 1
        nxt = price(name)
        if nxt is None:
            del offers[name]
        else:
            offers[name] = (nxt[0], taken, nxt)
    return weights
