"""convert(): one straight pipeline for every model family.

    analyse (one torch.export walk) -> the first family that can convert the model -> its merge
    modules built in -> the schedule solved for the FLOPs target (or a saved one replayed)

The pipeline never branches on the family: what differs lives in rewriters/<family>.py.
Conversion takes a process-wide lock: torch.export and FlopCounterMode use process-global
dispatch modes, so two threads converting at once would corrupt each other's mode stacks.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import threading
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ltm_convert.config import (
    DEFAULT_RATIO,
    DEFAULT_SCHEDULE,
    DEFAULT_TOPK,
    LtmConfig,
    check_input_size,
    is_ltm_name,
)
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.flops import count_flops, meta_copy
from ltm_convert.ltm_block import LtmBlockMixin, is_converted, ltm_blocks
from ltm_convert.merge.grid import GridMerge
from ltm_convert.model_inputs import _configs, default_input_size, example_input, input_frames, is_hf_model, run_model
from ltm_convert.rewriters import family_named, plan_for
from ltm_convert.schedule import Schedule, full_keep, solve
from ltm_convert.tracer import ConversionPlan, RecordedAnalysis, analyse, check_recorded_plan

__all__ = ["convert", "find_blocks", "describe", "is_converted", "ltm_blocks", "ltm_parameters", "merge_counts",
           "disable_merging", "unmerged_copy", "schedule_of"]

_CONVERT_LOCK = threading.RLock()
_HALF = (torch.float16, torch.bfloat16)


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    return check_input_size(tuple(size) if isinstance(size, (list, tuple)) else size)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise LtmError(f"convert() needs a torch.nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise LtmError("this model is already converted; convert the original model instead")
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise LtmError(f"{type(model).__name__} has weights on the meta device (shapes without data); load its "
                       "weights first (to_empty() + load_state_dict) or build it with ltm_convert.load_model")


def find_blocks(model: nn.Module, *, input_size: tuple[int, int] | int | None = None,
                exclude: Iterable[str] | None = None) -> ConversionPlan:
    """What ``convert`` would change, without changing anything. Print it, or read ``.blocks``."""
    if is_converted(model):
        raise LtmError("this model is already converted; inspect it with ltm_convert.api.describe(model)")
    with _CONVERT_LOCK:
        return plan_for(analyse(model, _hw(input_size), list(exclude or [])))[1]


def _fit_resolution(model: nn.Module, size: tuple[int, int]) -> None:
    """A timm model built for one fixed resolution is resized to the requested one (timm's own
    ``set_input_size`` resamples the position embedding), as ``timm.create_model(img_size=...)``
    would; otherwise a converted model could not run at the size its schedule was solved for."""
    if getattr(model, "patch_embed", None) is None and type(model).__module__.startswith("timm.") \
            and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # timm's features_only wrapper (FeatureGetterNet): the ViT inside
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is None or not hasattr(model, "set_input_size") or not getattr(embed, "strict_img_size", False):
        return
    if tuple(img_size) != tuple(size):
        model.set_input_size(img_size=tuple(size))


def _check_clip_size(model: nn.Module, size: tuple[int, int]) -> None:
    """An HF model runs at its config's (H, W) (a video model on clips of its config's frames): many
    size their position tables for exactly that and raise deep inside the trace at another size
    (ViTPose, VideoMAE). Say so in one line; a model that resamples its tables (TimeSformer, ViT
    with interpolation) converts at the size asked."""
    frames = input_frames(model)
    own = default_input_size(model)
    if (frames is None and not is_hf_model(model)) or tuple(size) == tuple(own):
        return
    counted = meta_copy(model)
    try:
        with torch.no_grad():
            run_model(counted, example_input(counted, size, device="meta"))
    except LtmError:
        raise  # ours, already one clear line (an image size that is not a multiple of the patch)
    except Exception as exc:  # noqa: BLE001 - the model's own refusal, quoted
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        if "meta" in why:  # a model that computes on values cannot run weightless: the trace will tell
            return
        what = f"clips of {frames} frames of" if frames is not None else "images of"
        raise LtmError(f"{type(model).__name__} takes {what} {own[0]}x{own[1]} pixels (its config's image size) and "
                       f"cannot run at {size[0]}x{size[1]} ({why}); leave out --input-size, or build the model with "
                       f"image_size={size[0] if size[0] == size[1] else list(size)}") from None


def _resolve_config(config: LtmConfig | None, **given: Any) -> LtmConfig:
    """The config to convert with: a new object, never the caller's. ``given`` holds the keyword
    arguments the caller set; with ``config=`` each must agree with it."""
    defaults = {"ratio": DEFAULT_RATIO, "input_size": None, "exclude": None, "topk": DEFAULT_TOPK, "method": "ltm",
                "schedule": DEFAULT_SCHEDULE, "dense": False}
    if config is None:
        return LtmConfig(ratio=given["ratio"], input_size=_hw(given["input_size"]), exclude=given["exclude"] or [],
                         topk=given["topk"], method=given["method"], schedule=given["schedule"], dense=given["dense"])
    if not isinstance(config, LtmConfig):
        raise LtmError(f"config must be an LtmConfig, got {type(config).__name__}")
    ours = dataclasses.replace(config, exclude=list(config.exclude), keep=dict(config.keep))
    for name, value in given.items():
        if value is None or value == defaults[name]:
            continue
        mine = getattr(ours, name)
        value = _hw(value) if name == "input_size" else value
        if (list(value) if name == "exclude" else value) != mine:
            raise LtmError(f"convert() got config= and {name}={value!r}, which disagrees with the config's "
                           f"{name}={mine!r}; pass one or the other")
    return ours


def convert(model: nn.Module, ratio: float = DEFAULT_RATIO, *, input_size: tuple[int, int] | int | None = None,
            exclude: Iterable[str] | str | None = None, inplace: bool = False, topk: int = DEFAULT_TOPK,
            method: str = "ltm", schedule: str = DEFAULT_SCHEDULE, dense: bool = False, config: LtmConfig | None = None,
            calibration_images: Any = None, plan: ConversionPlan | None = None) -> nn.Module:
    """Return the model (same class, same state-dict keys plus ``ltm_*``) with merging blocks.

    ratio is the fraction of the original FLOPs the converted model may use at ``input_size``
    (default: the model's own resolution); 1.0 reproduces the original outputs exactly.
    ``config`` (an :class:`LtmConfig`, e.g. a saved one with its schedule) replaces the keyword
    arguments; giving both with different values is an error. The caller's model and config are
    never changed (unless ``inplace=True`` for the model).

    ``schedule="calibrated"`` measures where merging costs least on ``calibration_images`` (paths,
    a folder, PIL images, arrays, or an (N, 3, H, W) tensor in [0, 1]; default: eight views of
    four bundled photos) and spends the budget there (calibrate.py); the result is a static
    schedule like any other, saved with the model.

    ``plan`` (a saved file's recorded :class:`ConversionPlan`, with the config's saved schedule)
    replays that conversion with the family the file names, without tracing the model again; a
    plan that does not fit the model is refused.

    ``dense=True`` is for heads that read the patch grid (``forward_intermediates`` maps or tokens,
    segmentation, depth): every block keeps patch tokens, even the last one of a class-token model
    (which otherwise merges them all into one, since its classifier reads only the class token).
    """
    config = _resolve_config(config, ratio=ratio, input_size=input_size, exclude=exclude, topk=topk, method=method,
                             schedule=schedule, dense=dense)
    _check_model(model)
    with _CONVERT_LOCK, _collection_paused():
        if not inplace:
            source = getattr(model, "ltm_source", None)
            model = copy.deepcopy(model)
            if source is not None:
                model.ltm_source = source
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if dtype in _HALF:  # torch.export and the merge's index math want float32; hand back the model's own
            model.float()
        was_training = model.training
        model.eval()
        try:
            _convert(model, config, calibration_images, plan)
        finally:
            model.train(was_training)
            if dtype in _HALF:
                model.to(dtype)
    return model


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while converting: the trace and the counts allocate hundreds of
    thousands of short-lived objects, and the full collection they trigger walks every object in
    the process (torch, timm, the model's modules), about 0.2 s of a ViT-B's 1 s conversion on a
    small CPU. Nothing is lost: what the conversion leaves in cycles is collected at the next
    collection after it (and no more than one conversion's worth piles up meanwhile)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_attention_backend(model: nn.Module) -> None:
    """HF models run flex / flash attention kernels that take no additive bias (and that the block
    finder does not recognise as attention): refuse in one line naming the fix, before tracing."""
    if not is_hf_model(model):
        return
    for holder in _configs(model):
        impl = getattr(holder, "_attn_implementation", None)
        if isinstance(impl, str) and impl not in ("eager", "sdpa"):
            raise UnsupportedModelError(
                f"not supported yet: {type(model).__name__} runs attn_implementation {impl!r}; merged tokens need "
                "attention that takes the token-size bias: call model.set_attn_implementation('sdpa') (or load it "
                "with attn_implementation='sdpa') before converting")


def _convert(model: nn.Module, config: LtmConfig, calibration_images: Any = None,
             recorded: ConversionPlan | None = None) -> None:
    clock = _Clock()
    size = config.input_size or default_input_size(model)
    config.input_size = check_input_size(tuple(size), "the model's input size")
    _fit_resolution(model, config.input_size)
    _check_clip_size(model, config.input_size)
    _check_attention_backend(model)
    if recorded is None:
        analysis = analyse(model, config.input_size, config.exclude)
        clock.lap("trace")
        _check_exclude(config.exclude, analysis)
        family, plan = plan_for(analysis)
    else:  # a saved file's plan: its family, its blocks, no trace
        if not config.keep or tuple(recorded.input_size) != tuple(config.input_size):
            raise LtmError("a recorded plan replays with its saved schedule at its input size; the file is corrupt")
        family, plan = family_named(recorded.family), copy.deepcopy(recorded)
        analysis = RecordedAnalysis(model, plan)
        check_recorded_plan(model, plan, analysis, "the saved model")
        clock.lap("trace")
    clock.lap("match")
    family.build(model, plan, analysis, config)
    clock.lap("build")
    sites = family.sites(model, plan)
    base = None
    if config.keep:
        unknown = sorted(set(config.keep) - {s.name for s in sites})
        if unknown:
            raise LtmError(f"the schedule names blocks this model does not have ({', '.join(unknown[:3])}); "
                           "the file belongs to another model")
        family.apply(model, plan, config.keep)
    else:
        counted = meta_copy(model)  # solve on a weightless copy
        cost = family.cost_model(counted, plan)
        clock.lap("flops")
        weights = None
        if config.schedule == "calibrated":
            weights = _calibrate(model, family, plan, sites, cost, config, calibration_images)
            clock.lap("calibrate")
        solved = solve(sites, cost, config.ratio, config.schedule, model_class=plan.model_class, weights=weights)
        solved.weights = weights
        clock.lap("solve")
        note = solved.note(plan.model_class)
        if note:
            warnings.warn(note, stacklevel=4)
        family.apply(model, plan, solved.keep)
        config.keep = dict(solved.keep)
        base = int(cost.base)
        model.ltm_schedule = solved
    model.ltm_config = config
    model.ltm_plan = plan
    model.ltm_family = family
    model.ltm_base_flops = base
    _update_data_config(model, config.input_size)
    _record_hf_recipe(model)
    _refuse_torchscript(model)
    clock.lap("finish")
    model.ltm_timings = clock.laps


def _calibrate(model: nn.Module, family: Any, plan: Any, sites: list, cost: Any, config: LtmConfig,
               images: Any) -> dict[str, float]:
    """The calibrated schedule's per-site weights, measured with the model's own merge method."""
    from ltm_convert.calibrate import AgreementLoss, calibrate, calibration_batch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = calibration_batch(model, images, config.input_size).to(device)
    loss = AgreementLoss(model, lambda keep: family.apply(model, plan, keep), full_keep(sites), inputs)
    return calibrate(sites, cost, config.ratio, loss)


class _Clock:
    """Seconds spent in each conversion phase (``model.ltm_timings``; benchmarks/bench_convert.py)."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = now - self._last
        self._last = now


SCRIPT_REFUSAL = ("torch.jit.script cannot compile a converted model (its merge modules use Python that TorchScript "
                  "does not support); use torch.jit.trace(model, example), torch.export.export or torch.compile instead")


def _script_refused() -> nn.Module:
    raise LtmError(SCRIPT_REFUSAL)


def _refuse_torchscript(model: nn.Module) -> None:
    """``torch.jit.script`` asks every module for ``__prepare_scriptable__`` before compiling it: the
    converted model and each of its merging modules answer with one clear line instead of the compiler's
    "Unknown type annotation: 'Any'" deep inside. Tracing, export and torch.compile are unaffected."""
    for module in (model, *(m for m in model.modules() if isinstance(m, (LtmBlockMixin, GridMerge)))):
        module.__prepare_scriptable__ = _script_refused


def _record_hf_recipe(model: nn.Module) -> None:
    """An HF model carries its LTM recipe in its config, so ``save_pretrained`` writes it next to the
    weights and ``ltm_convert.load(directory)`` can rebuild the converted model from there."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "save_pretrained"):
        return
    from ltm_convert.recipe import recipe_of

    try:
        config.ltm_recipe = recipe_of(model)
    except LtmError:  # a model whose base cannot be named (a user subclass): save() will say so
        pass


def _check_exclude(exclude: list[str], analysis: Any) -> None:
    if not exclude:
        return
    names = [b.name for b in analysis.blocks] + [n for n, why in analysis.skipped if why == "excluded by the user"]
    unmatched = [e for e in exclude if not any(n == e or n.startswith(e + ".") for n in names)]
    if unmatched:
        raise LtmError(f"--exclude {unmatched[0]!r} matches no block; the blocks are "
                       f"{', '.join(b.name for b in analysis.blocks[:4])}{' ...' if len(analysis.blocks) > 4 else ''}")


def _update_data_config(model: nn.Module, size: tuple[int, int]) -> None:
    """timm's data config (``resolve_model_data_config``) reads pretrained_cfg['input_size']: make it
    the resolution the model was converted for, so client transforms feed it what it expects."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size") is not None and tuple(cfg["input_size"][-2:]) != tuple(size):
        cfg = dict(cfg)
        cfg["input_size"] = (cfg["input_size"][0], *size)
        model.pretrained_cfg = cfg
        if hasattr(model, "default_cfg"):
            model.default_cfg = cfg


def schedule_of(model: nn.Module) -> Schedule | None:
    """The solver's verdict on the model's schedule (None for a model converted from a saved one)."""
    return getattr(model, "ltm_schedule", None)


def _plan(model: nn.Module) -> ConversionPlan:
    plan = getattr(model, "ltm_plan", None)
    if not is_converted(model) or not isinstance(plan, ConversionPlan):
        raise LtmError("this needs a converted model; call ltm_convert.convert(model) first")
    return plan


def family_of(model: nn.Module) -> Any:
    """The family that converted the model (kept on it, so a family registered only for the
    conversion still describes it later)."""
    family = getattr(model, "ltm_family", None)
    return family if family is not None else family_named(_plan(model).family)


def describe(model: nn.Module) -> dict[str, Any]:
    """A JSON-able summary of a converted model: schedule, FLOPs before/after, parameters added."""
    plan = _plan(model)
    config: LtmConfig = model.ltm_config
    size = tuple(config.input_size)
    solved = getattr(model, "ltm_schedule", None)
    base = getattr(model, "ltm_base_flops", None)
    if solved is not None and base is not None and solved.keep == dict(config.keep or {}):
        # just solved in this process: the family's cost model counted this very schedule (its pieces
        # are FlopCounterMode counts; tests hold it equal to counting the whole converted model)
        converted_flops = round(solved.flops)
    else:
        counted = _float_meta_copy(model)  # FLOPs do not depend on the dtype; the example input is float32
        converted_flops = count_flops(counted, size)
        if base is None:
            base = model.ltm_base_flops = _original_flops(counted, size)
    added = sum(p.numel() for _, p in ltm_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    family = family_of(model)
    info = family.describe(model, plan)
    source = getattr(model, "ltm_source", None)
    ratio = converted_flops / base if base else 1.0
    from ltm_convert.config import REACH_TOLERANCE

    out = {
        "model": type(model).__name__,
        "source": source.to_dict() if source is not None else None,
        "ratio": config.ratio,
        "input_size": list(size),
        "method": config.method,
        "topk": config.topk if config.method == "ltm" else None,
        "schedule": config.schedule,
        "dense": bool(config.dense or plan.data.get("dense")),
        "family": plan.family,
        "prefix_tokens": plan.prefix_tokens,
        "head": ", ".join(plan.heads),
        "blocks": info["blocks"],
        "flops_original": int(base),
        "flops_converted": int(converted_flops),
        "flops_ratio": ratio,
        "reachable": abs(ratio - config.ratio) <= REACH_TOLERANCE * config.ratio,
        "params_original": int(total - added),
        "params_added": int(added),
    }
    if "grids" in info:
        out = {"grids": info["grids"], **out}
    frames = input_frames(model)
    if frames is not None:  # a video model: every input is a clip of this many frames at input_size
        out["frames"] = frames
    if "flops_for" in info:  # what the FLOPs target was computed for, where inputs vary (NaFlex batches)
        out["flops_for"] = info["flops_for"]
    return out


def merge_counts(model: nn.Module) -> list[dict[str, Any]]:
    """Per merge site: its name and the tokens it receives and passes on (to its FFN, for grid
    blocks that merge inside the FFN)."""
    plan = _plan(model)
    return family_of(model).describe(model, plan)["blocks"]


def _original_flops(model: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of the model with merging switched off (identical to the original model)."""
    counted = _float_meta_copy(model)
    disable_merging(counted)
    return count_flops(counted, size)


def _float_meta_copy(model: nn.Module) -> nn.Module:
    """A weightless float32 copy for counting: a half-precision model (``model.half()``) would meet a
    float32 example input, and counting needs only shapes."""
    counted = meta_copy(model)
    if counted is model:
        counted = copy.deepcopy(model)
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in (*counted.parameters(), *counted.buffers())):
        counted.float()
    return counted


def disable_merging(model: nn.Module) -> None:
    """Make every merge site keep all its tokens: the original model's computation, same weights."""
    plan = _plan(model)
    family = family_of(model)
    family.apply(model, plan, full_keep(family.sites(model, plan)))


def unmerged_copy(model: nn.Module) -> nn.Module:
    """A copy of a converted model that merges nothing (teacher for fine-tuning, bench baseline)."""
    original = copy.deepcopy(model)
    disable_merging(original)
    return original


def ltm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters conversion added (all live under an ``ltm_`` name)."""
    return [(n, p) for n, p in model.named_parameters() if is_ltm_name(n)]
