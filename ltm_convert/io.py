"""Save and load converted models as a recipe plus weights; nothing is ever unpickled.

A file holds: where the base model comes from (ModelSource), the LtmConfig with its solved
schedule, and the state dict. Loading rebuilds the base model, replays the conversion with the
saved schedule and loads the weights strictly, so the result is bit-identical and a downloaded
file cannot run code. Two layouts:

* ``model.pt``: one ``torch.save`` of plain containers and tensors (loads with weights_only=True);
* a directory: ``ltm_config.json`` + ``model.safetensors``.

Every write goes to a temporary file first and is moved into place with ``os.replace``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltm_convert.config import LtmConfig
from ltm_convert.errors import LtmError

FILE_FORMAT = 1
CONFIG_NAME = "ltm_config.json"
WEIGHTS_NAME = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def recipe_of(model: nn.Module, source: Any = None) -> dict[str, Any]:
    from ltm_convert import __version__
    from ltm_convert.api import is_converted
    from ltm_convert.sources import source_of

    if not is_converted(model):
        raise LtmError("save() needs a converted model; call ltm_convert.convert(model) first")
    src = source if source is not None else source_of(model)
    return {
        "ltm_format": FILE_FORMAT,
        "ltm_version": __version__,
        "source": src.to_dict(),
        "config": model.ltm_config.to_dict(),
    }


def save(model: nn.Module, path: str | os.PathLike, *, source: Any = None) -> Path:
    """Write the converted model to ``path`` (``.pt`` file, or a directory); returns the path."""
    path = Path(path)
    recipe = recipe_of(model, source)
    state = _plain_state_dict(model)
    if path.suffix in (".pt", ".pth"):
        payload = {"ltm_recipe": json.dumps(recipe), "state_dict": state}
        _atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path
    from safetensors.torch import save_file

    if path.exists() and not path.is_dir():
        raise LtmError(f"{path} exists and is not a directory; give a .pt file name or a directory")
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"ltm_format": str(FILE_FORMAT)}))
    # the config goes last: a directory without it is not a saved model
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(recipe, indent=2, sort_keys=True)))
    return path


def is_saved_model(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path.is_file() and path.suffix in (".pt", ".pth")) or (path / CONFIG_NAME).is_file()


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The recipe and the state dict of a saved model, validated; raises LtmError on bad files."""
    path = Path(path)
    if not path.exists():
        raise LtmError(f"{path} does not exist; give a file written by `ltm-convert convert -o`")
    if path.is_dir():
        cfg = path / CONFIG_NAME
        if not cfg.is_file():
            raise LtmError(f"{path} is not a saved ltm_convert model (no {CONFIG_NAME}); save one with ltm_convert.save")
        try:
            recipe = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LtmError(f"{cfg} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); the file is corrupt") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path / WEIGHTS_NAME)
        except (SafetensorError, OSError, ValueError) as exc:
            raise LtmError(f"{path / WEIGHTS_NAME} cannot be read ({str(exc).splitlines()[0][:120]}); the file is missing or corrupt") from None
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad files; all mean the same to a user
            text = str(exc)
            if ("Weights only load failed" in text or "weights_only" in text) and _looks_like_torch_file(path):
                raise LtmError(
                    f"{path} contains pickled Python objects, refusing to load it (it could run code); "
                    "ltm_convert files hold only tensors and JSON"
                ) from None
            raise LtmError(f"{path} is not a readable torch file ({text.splitlines()[0][:120] if text else type(exc).__name__}); the file is corrupt") from None
        if not isinstance(payload, dict) or "ltm_recipe" not in payload or "state_dict" not in payload:
            raise LtmError(f"{path} is a torch file but not an ltm_convert model; save one with ltm_convert.save")
        try:
            recipe = json.loads(payload["ltm_recipe"])
        except (TypeError, json.JSONDecodeError):
            raise LtmError(f"{path} has a corrupt recipe; the file is damaged") from None
        state = payload["state_dict"]
    if not isinstance(recipe, dict) or recipe.get("ltm_format") is None or "source" not in recipe or "config" not in recipe:
        raise LtmError(f"{path} is missing its recipe (source and config); the file is not an ltm_convert model")
    if int(recipe["ltm_format"]) > FILE_FORMAT:
        raise LtmError(f"{path} was written by a newer ltm_convert ({recipe.get('ltm_version')}); upgrade ltm_convert to load it")
    return recipe, state


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the base model, replay the saved conversion and load the saved weights."""
    from ltm_convert.api import convert
    from ltm_convert.sources import ModelSource, build_model

    recipe, state = read_file(path)
    source = ModelSource.from_dict(recipe["source"])
    config = LtmConfig.from_dict(recipe["config"])
    rebuild = ModelSource.from_dict({**source.to_dict(), "pretrained": False, "checkpoint": None})
    model = build_model(rebuild)
    model = convert(model, config=config, inplace=True)
    missing, unexpected = _compare_keys(model, state)
    if missing or unexpected:
        raise LtmError(
            f"{path} does not match the model rebuilt from its recipe "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:2]}); the file is damaged"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LtmError(f"{path} has weights of the wrong shape ({str(exc).splitlines()[-1].strip()[:160]})") from None
    model.ltm_source = source
    model.eval()
    return model


def _compare_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save) or a raw pickle stream: only then is "pickled objects" the cause."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"
