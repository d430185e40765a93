"""Save and load converted models as a recipe plus weights; nothing is ever unpickled.

A file holds where the base model comes from (ModelSource), the LtmConfig with its solved
schedule, and the state dict. Loading checks the recipe (sources/options.py allow-lists, config
types and ranges) *before* any model code runs, rebuilds the base model, replays the conversion
with the saved schedule and loads the weights strictly (finite floats where the model has floats,
integers where it has integers, the schedule buffers present and equal to the recipe's schedule),
checks that the schedule reaches the FLOPs ratio the recipe claims, and gives the model back in
the dtype it was saved in, so the result is bit-identical and a downloaded file cannot run code
or pass off another schedule. Two layouts:

* ``model.pt``: one ``torch.save`` of plain containers and tensors (read with weights_only=True);
* a directory: ``ltm_config.json`` + ``model.safetensors``.

Writes go through safe_write.py: atomic, and never over something ltm_convert did not write. A
recipe records no local path (a checkpoint's file name at most): the weights are in the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltm_convert.config import LtmConfig, is_int
from ltm_convert.errors import LtmError
from ltm_convert.plan import ConversionPlan
from ltm_convert.recipe import FILE_FORMAT, recipe_of
from ltm_convert.safe_write import (  # check_writable and replace_atomically are also imported from here
    CONFIG_NAME,
    MODEL_SUFFIXES,
    WEIGHTS_NAME,
    check_writable,
    replace_atomically,
    replace_directory,
)

# how far (relative to the ratio) a saved schedule may land further from its ratio than a fresh
# solve does: FLOPs accounting moves between versions (a 0.1.0 ToMe file at 0.6 counts 0.617
# today, its solver 0.595); an edited ratio or schedule is off by far more
CLAIM_TOLERANCE = 0.05
_TAMPERED = "the file is damaged or was tampered with"


# --------------------------------------------------------------------------------------------
# recipe and weights


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU tensors, each with storage of its own (safetensors refuses shared storage)."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ptr in seen or tensor.numel() != tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1):
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        state[key] = tensor
    return state


def save(model: nn.Module, path: str | os.PathLike, *, source: Any = None) -> Path:
    """Write the converted model to ``path`` (``.pt`` file, or a directory); returns the path."""
    path = check_writable(Path(path))
    recipe = recipe_of(model, source)
    state = _plain_state_dict(model)
    if path.suffix in MODEL_SUFFIXES:
        payload = {"ltm_recipe": json.dumps(recipe), "state_dict": state}
        replace_atomically(path, lambda tmp: torch.save(payload, tmp))
        return path
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"ltm_format": str(FILE_FORMAT)})
        (folder / CONFIG_NAME).write_text(json.dumps(recipe, indent=2, sort_keys=True))

    replace_directory(path, write)
    return path


def is_saved_model(path: str | os.PathLike) -> bool:
    """A path that names a saved model (whether or not it exists yet): a .pt/.pth file, or a
    directory holding ltm_config.json (or an HF directory whose config carries an LTM recipe)."""
    path = Path(path)
    if path.suffix in MODEL_SUFFIXES:
        return True
    return (path / CONFIG_NAME).is_file() or _hf_recipe(path) is not None


def _hf_recipe(path: Path) -> dict | None:
    """The LTM recipe an HF ``save_pretrained`` directory of a converted model carries in config.json."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested past the parser's depth
        return None
    recipe = data.get("ltm_recipe") if isinstance(data, dict) else None
    return recipe if isinstance(recipe, dict) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
        why = getattr(exc, "msg", None) or ("nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8")
        raise LtmError(f"{path} is not valid JSON ({why}); the file is corrupt") from None
    except OSError as exc:
        raise LtmError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LtmError(f"{path} cannot be read ({str(exc).splitlines()[0][:120]}); the file is missing or corrupt") from None


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The recipe and the state dict of a saved model, validated; raises LtmError on bad files."""
    path = Path(path)
    if not path.exists():
        raise LtmError(f"{path} does not exist; give a file written by `ltm-convert convert -o`")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            recipe = _read_json(path / CONFIG_NAME)
            state = _read_safetensors(path / WEIGHTS_NAME)
        elif _hf_recipe(path) is not None:  # HF save_pretrained of a converted model
            recipe = _hf_recipe(path)
            files = sorted(path.glob("model*.safetensors"))
            if not files:
                raise LtmError(f"{path} has no model.safetensors; save with save_pretrained(..., safe_serialization=True)")
            state = {}
            for f in files:
                state.update(_read_safetensors(f))
        else:
            raise LtmError(f"{path} is not a saved ltm_convert model (no {CONFIG_NAME}); save one with ltm_convert.save")
    else:
        from ltm_convert.sources.checkpoints import load_weights_only

        payload = load_weights_only(path, what="saved model")
        if not isinstance(payload, dict) or "ltm_recipe" not in payload or "state_dict" not in payload:
            raise LtmError(f"{path} is a torch file but not an ltm_convert model; save one with ltm_convert.save")
        try:
            recipe = json.loads(payload["ltm_recipe"])
        except (TypeError, ValueError, RecursionError):
            raise LtmError(f"{path} has a corrupt recipe; the file is damaged") from None
        state = payload["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise LtmError(f"{path} does not hold a state dict of tensors; the file is damaged")
    if not isinstance(recipe, dict) or "source" not in recipe or "config" not in recipe:
        raise LtmError(f"{path} is missing its recipe (source and config); the file is not an ltm_convert model")
    fmt = recipe.get("ltm_format")
    if not is_int(fmt):
        raise LtmError(f"{path} has format {fmt!r}, not an integer; the file is corrupt")
    if fmt < 1:
        raise LtmError(f"{path} has format {fmt}, which no ltm_convert writes; the file is corrupt")
    if fmt > FILE_FORMAT:
        from ltm_convert import __version__

        raise LtmError(f"{path} is in file format {fmt}; this ltm_convert ({__version__}) reads formats up to "
                       f"{FILE_FORMAT}: upgrade ltm_convert (pip install -U ltm_convert) to load it")
    return recipe, state


def check_recipe(recipe: dict[str, Any], where: str = "the file") -> tuple[Any, LtmConfig]:
    """(ModelSource, LtmConfig) of a recipe, every field checked; nothing is built yet."""
    from ltm_convert.sources import ModelSource

    source = ModelSource.from_dict(recipe["source"])
    config = LtmConfig.from_dict(recipe["config"])
    return source, config


def recorded_plan(recipe: dict[str, Any], where: str) -> ConversionPlan | None:
    """The plan the file recorded (files written before 2026-12-07 have none: they are re-planned)."""
    if "plan" not in recipe:
        return None
    return ConversionPlan.from_dict(recipe["plan"], where)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the base model, replay the saved conversion and load the saved weights; the model
    comes back in the dtype it was saved in."""
    from ltm_convert.api import convert
    from ltm_convert.sources import ModelSource, build_model

    recipe, state = read_file(path)
    source, config = check_recipe(recipe)
    where = str(path)
    plan = recorded_plan(recipe, where)
    if Path(path).is_dir() and not (Path(path) / CONFIG_NAME).is_file():
        model = _load_hf_directory(Path(path), source, config, state, plan)
    else:
        rebuild = ModelSource(source.kind, source.name, False, None, dict(source.kwargs))
        model = convert(build_model(rebuild), config=config, inplace=True, plan=plan)
        load_weights(model, state, where, schedule_required=config.mask_version >= 2)
    check_ratio_claim(model, where)
    restore_dtypes(model, state)
    model.ltm_source = source
    model.eval()
    if len({v.dtype for v in state.values() if v.is_floating_point()}) > 1:
        check_runs(model, where)
    return model


def check_runs(model: nn.Module, where: str) -> None:
    """A file of mixed floating dtypes (fp32 norms in a bf16 model is legitimate) must still give a
    model whose layers fit together: one small forward, refused in one line if it fails (a float64
    head behind float32 blocks would otherwise fail later, in every command that runs it)."""
    from ltm_convert.model_inputs import example_input, run_model

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            run_model(model, example_input(model, batch=1).to(dtype))
    except (RuntimeError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LtmError(f"{where}: the model rebuilt from it does not run with its weights' dtypes ({first}); "
                       f"{_TAMPERED}") from None


def _load_hf_directory(path: Path, source: Any, config: LtmConfig, state: dict[str, torch.Tensor],
                       plan: ConversionPlan | None = None) -> nn.Module:
    """A converted HF model written by ``save_pretrained``: transformers reads its own weights (it
    renames some on save), ltm_convert converts with the saved schedule and loads the ltm_* tensors
    under the names transformers' own load-time renaming gives them."""
    import transformers

    from ltm_convert.api import convert, is_ltm_name
    from ltm_convert.sources.build import from_pretrained_checked

    cls = getattr(transformers, source.name, None) if source.kind == "hf-config" else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LtmError(f"{path}: its recipe names {source.name!r}, not a transformers model class; the file is corrupt")
    # the directory's config.json is checked like a saved recipe (allow-lists, size, offline) and
    # transformers' messages stay quiet (the ltm_* tensors are "unused" to it: expected)
    base = from_pretrained_checked(cls, path, quiet=True)
    model = convert(base.float(), config=config, inplace=True, plan=plan)  # float32 until restore_dtypes, like load()
    rename = _hf_key_renamer(model)
    saved = {rename(k): v for k, v in state.items()}
    own = {k: v for k, v in model.state_dict().items() if not is_ltm_name(k)}
    load_weights(model, {**own, **{k: v for k, v in saved.items() if is_ltm_name(k)}}, str(path),
                 schedule_required=config.mask_version >= 2)
    state.clear()
    state.update({k: v for k, v in saved.items() if k in own or is_ltm_name(k)})  # saved dtypes, model names
    return model


def _hf_key_renamer(model: nn.Module) -> Any:
    """checkpoint key -> the model's key, by transformers' own load-time renaming (the conversion
    mapping ``from_pretrained`` applied to this model's weights; ``save_pretrained`` writes its
    reverse, e.g. ViT's in-memory ``layers.N`` as ``encoder.layer.N``). Identity where this
    transformers has no such mapping."""
    import copy

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: checkpoint names are the module names
        return lambda key: key
    mapping = getattr(model, "_weight_conversions", None)
    try:
        mapping = copy.deepcopy(mapping if mapping is not None else get_model_conversion_mapping(model))
    except (AttributeError, TypeError):  # an internal API that moved: the names as saved
        return lambda key: key
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    names = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, names)
        return key if renamed not in names and key in names else renamed

    return rename


def schedule_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the buffers that record a converted model's schedule (per merge site)."""
    from ltm_convert.ltm_block import LtmBlockMixin
    from ltm_convert.merge.grid import GridMerge

    keys = []
    for name, module in model.named_modules():
        attr = "ltm_schedule" if isinstance(module, LtmBlockMixin) else None
        attr = "schedule" if isinstance(module, GridMerge) else attr
        if attr is not None:
            keys.append(f"{name}.{attr}" if name else attr)
    return keys


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str, *,
                 schedule_required: bool = True) -> None:
    """Strict load of a saved state dict: same keys, same shapes, floats where the model has floats
    (finite) and integers where it has integers. The schedule buffers must equal the schedule the
    model was rebuilt with (the recipe's): a file whose recipe and weights disagree, or that lost
    some of them, is refused. Only files from before the buffers existed (0.1.0, mask version 1)
    may lack them all; the recipe's FLOPs claim is checked separately (check_ratio_claim)."""
    expected = model.state_dict()
    scheduled = schedule_keys(model)
    absent = [k for k in scheduled if k not in state]
    if absent and (schedule_required or len(absent) < len(scheduled)):
        raise LtmError(f"{where} lacks the schedule buffer{'s' if len(absent) > 1 else ''} {', '.join(absent[:2])}"
                       f"{' ...' if len(absent) > 2 else ''}; {_TAMPERED}")
    missing, unexpected = sorted(set(expected) - set(state) - set(absent)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LtmError(f"{where} does not match the model rebuilt from its recipe ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:2]}); the file is damaged")
    for key, value in state.items():
        own = expected[key]
        if value.layout != torch.strided or value.is_quantized:
            raise LtmError(f"{where}: {key} is a {str(value.layout).replace('torch.', '')} tensor where the model has "
                           f"dense weights; {_TAMPERED}")
        if own.is_floating_point() != value.is_floating_point() or value.is_complex():
            kind = "floating-point" if own.is_floating_point() else "integer"
            raise LtmError(f"{where}: {key} holds {value.dtype} values where the model has {kind} ({own.dtype}) "
                           f"values; {_TAMPERED}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LtmError(f"{where}: {key} holds NaN or infinite values; the file is damaged (was it saved "
                           "from a diverged run?)")
    for key in scheduled:
        theirs = state.get(key)
        if theirs is not None and (theirs.shape != expected[key].shape or not torch.equal(theirs.long(), expected[key])):
            raise LtmError(f"{where}: the schedule in its recipe ({key.rsplit('.', 1)[0]}: {expected[key].tolist()}) "
                           f"disagrees with its weights' ({theirs.flatten().tolist()[:4]}); {_TAMPERED}")
    try:
        model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state}, strict=True)
    except RuntimeError as exc:
        raise LtmError(f"{where} has weights of the wrong shape ({str(exc).splitlines()[-1].strip()[:160]})") from None


def check_ratio_claim(model: nn.Module, where: str) -> None:
    """Refuse a recipe whose schedule does not reach the FLOPs ratio it claims.

    The saved ratio is only a label; the schedule (``keep``) decides what runs. A conversion at
    that ratio lands as close to it as the solver can (within CLAIM_TOLERANCE of the best schedule
    of its shape), so a recipe whose schedule is further off had its ratio or its schedule edited.
    The FLOPs come from the family's cost model on a weightless copy (what convert solves with),
    so this costs a fraction of a conversion; it also fills in the original FLOPs for describe().
    """
    from ltm_convert.flops import meta_copy
    from ltm_convert.schedule import shaped, solve

    config, plan, family = model.ltm_config, model.ltm_plan, model.ltm_family
    sites = family.sites(model, plan)
    cost = family.cost_model(meta_copy(model), plan)
    reached = cost.flops(config.keep) / cost.base
    try:
        best = solve(sites, cost, config.ratio, config.schedule, model_class=plan.model_class).flops_ratio
    except LtmError:  # out of reach: the closest any schedule gets merges the most
        best = cost.flops(shaped(sites, "fraction", 1e-9)) / cost.base
    if abs(reached - config.ratio) > abs(best - config.ratio) + CLAIM_TOLERANCE * config.ratio:
        raise LtmError(f"{where} claims FLOPs ratio {config.ratio:g}, but its schedule uses {reached:.3f} of the "
                       f"original FLOPs (a conversion at {config.ratio:g} reaches {best:.3f}); {_TAMPERED}")
    model.ltm_base_flops = int(cost.base)


def restore_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the model back in the floating dtypes it was saved in (the rebuild is float32): a model
    saved in one dtype (``model.half()``) is cast whole, as its owner did; a mixed one per tensor."""
    saved = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    kinds = set(saved.values())
    if not kinds or kinds == {torch.float32}:
        return
    if len(kinds) == 1:
        model.to(kinds.pop())
        return
    for key, dtype in saved.items():
        owner, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if name in module._parameters and module._parameters[name].dtype != dtype:
            module._parameters[name].data = module._parameters[name].data.to(dtype)
        elif name in module._buffers and module._buffers[name].dtype != dtype:
            module._buffers[name] = module._buffers[name].to(dtype)
