"""Save and load converted models as a recipe plus weights; nothing is ever unpickled.

A file holds where the base model comes from (ModelSource), the LtmConfig with its solved
schedule, and the state dict. Loading checks the recipe (sources/options.py allow-lists, config
types and ranges) *before* any model code runs, rebuilds the base model, replays the conversion
with the saved schedule and loads the weights strictly (finite floats of the expected dtype), so
the result is bit-identical and a downloaded file cannot run code. Two layouts:

* ``model.pt``: one ``torch.save`` of plain containers and tensors (read with weights_only=True);
* a directory: ``ltm_config.json`` + ``model.safetensors``.

Writes never leave a mix: a file is written beside its target and renamed over it; a directory
is written whole beside its target and swapped in with one atomic exchange, so a reader sees the
old output or the new one. Files get the user's umask, like any file they create.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ltm_convert.config import LtmConfig, is_int
from ltm_convert.errors import LtmError

FILE_FORMAT = 1
CONFIG_NAME = "ltm_config.json"
WEIGHTS_NAME = "model.safetensors"
OUR_FILES = {CONFIG_NAME, WEIGHTS_NAME, "config.json", "README.md"}


# --------------------------------------------------------------------------------------------
# writing files safely


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def check_writable(path: Path | str) -> Path:
    """Refuse, before any work is done, an output path that cannot be written: a directory where a
    file goes, a parent that is a file, a folder without write permission."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".onnx", ".png") and path.is_dir():
        raise LtmError(f"{path} is an existing directory; give a file name that does not exist or is a file")
    parent = path.parent if path.suffix or not path.is_dir() else path
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LtmError(f"cannot write {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LtmError(f"cannot write {path}: no write permission in {probe}; choose another output location")
    return path


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_directory(path: Path, write: Callable[[Path], None]) -> None:
    """Write the whole directory beside ``path`` and swap it in atomically (the previous output is
    removed afterwards). A directory holding files that are not an ltm_convert output is refused."""
    if path.exists():
        if not path.is_dir():
            raise LtmError(f"{path} exists and is not a directory; give a .pt file name or a directory")
        foreign = [p.name for p in path.iterdir() if p.name not in OUR_FILES and not p.name.startswith(".")]
        if foreign:
            raise LtmError(f"{path} already holds other files ({', '.join(sorted(foreign)[:3])}); give a new or "
                           "empty directory, or one written by ltm_convert (it is replaced whole)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~_umask())
        try:
            os.rename(tmp, path)  # no previous output (or an empty directory)
            return
        except OSError:
            pass
        if not _exchange(tmp, path):  # no atomic exchange here: two renames (a moment without output)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def recipe_of(model: nn.Module, source: Any = None) -> dict[str, Any]:
    """What a saved file records: the base model's source (an HF model as its class + config, so
    the file loads on any machine) and the conversion config with its schedule."""
    from ltm_convert import __version__
    from ltm_convert.api import is_converted
    from ltm_convert.sources import ModelSource, source_of

    if not is_converted(model):
        raise LtmError("save() needs a converted model; call ltm_convert.convert(model) first")
    src = source if source is not None else source_of(model)
    if not isinstance(src, ModelSource):
        raise LtmError(f"source= must be a ModelSource (ltm_convert.sources.parse_source(spec)), got {type(src).__name__}")
    if src.kind == "hf":  # never an absolute path or a hub id that may not be reachable: the config itself
        src = ModelSource("hf-config", type(model).__name__, False, None, {"config": hf_config_dict(model)})
    return {"ltm_format": FILE_FORMAT, "ltm_version": __version__, "source": src.check("the model source").to_dict(),
            "config": model.ltm_config.to_dict()}


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    for key in ("ltm_recipe", "auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    return config


def save(model: nn.Module, path: str | os.PathLike, *, source: Any = None) -> Path:
    """Write the converted model to ``path`` (``.pt`` file, or a directory); returns the path."""
    path = check_writable(Path(path))
    recipe = recipe_of(model, source)
    state = _plain_state_dict(model)
    if path.suffix in (".pt", ".pth"):
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
    if path.suffix in (".pt", ".pth"):
        return True
    return (path / CONFIG_NAME).is_file() or _hf_recipe(path) is not None


def _hf_recipe(path: Path) -> dict | None:
    """The LTM recipe an HF ``save_pretrained`` directory of a converted model carries in config.json."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    recipe = data.get("ltm_recipe") if isinstance(data, dict) else None
    return recipe if isinstance(recipe, dict) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LtmError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); the file is corrupt") from None
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
        except (TypeError, json.JSONDecodeError):
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
    if fmt > FILE_FORMAT:
        raise LtmError(f"{path} was written by a newer ltm_convert ({recipe.get('ltm_version')}); upgrade ltm_convert to load it")
    return recipe, state


def check_recipe(recipe: dict[str, Any], where: str = "the file") -> tuple[Any, LtmConfig]:
    """(ModelSource, LtmConfig) of a recipe, every field checked; nothing is built yet."""
    from ltm_convert.sources import ModelSource

    source = ModelSource.from_dict(recipe["source"])
    config = LtmConfig.from_dict(recipe["config"])
    return source, config


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the base model, replay the saved conversion and load the saved weights."""
    from ltm_convert.api import convert
    from ltm_convert.sources import ModelSource, build_model

    recipe, state = read_file(path)
    source, config = check_recipe(recipe)
    if Path(path).is_dir() and not (Path(path) / CONFIG_NAME).is_file():
        model = _load_hf_directory(Path(path), source, config, state)
    else:
        rebuild = ModelSource(source.kind, source.name, False, None, dict(source.kwargs))
        model = convert(build_model(rebuild), config=config, inplace=True)
        load_weights(model, state, str(path))
    model.ltm_source = source
    model.eval()
    return model


def _load_hf_directory(path: Path, source: Any, config: LtmConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A converted HF model written by ``save_pretrained``: transformers reads its own weights (it
    renames some on save), ltm_convert converts with the saved schedule and loads the ltm_* tensors."""
    import transformers
    from transformers.utils import logging as hf_logging

    from ltm_convert.api import convert, is_ltm_name

    cls = getattr(transformers, source.name, None) if source.kind == "hf-config" else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LtmError(f"{path}: its recipe names {source.name!r}, not a transformers model class; the file is corrupt")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the ltm_* tensors are "unused" to transformers: expected
    try:
        base = cls.from_pretrained(str(path), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = convert(base, config=config, inplace=True)
    ours = {k: v for k, v in state.items() if is_ltm_name(k)}
    load_weights(model, {**{k: v for k, v in model.state_dict().items() if not is_ltm_name(k)}, **ours}, str(path))
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load of a saved state dict: same keys, same shapes, floating tensors of a floating
    dtype and finite (a file with int64 or NaN weights is damaged, not a model)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    missing = [k for k in missing if not k.endswith((".ltm_schedule", ".ltm_mask.schedule"))]  # none in 0.1.0 files
    if missing or unexpected:
        raise LtmError(f"{where} does not match the model rebuilt from its recipe ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:2]}); the file is damaged")
    for key, value in state.items():
        own = expected[key]
        if own.is_floating_point() and not value.is_floating_point():
            raise LtmError(f"{where}: {key} holds {value.dtype} values where the model has {own.dtype} weights; "
                           "the file is damaged")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LtmError(f"{where}: {key} holds NaN or infinite values; the file is damaged (was it saved "
                           "from a diverged run?)")
    try:
        model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state}, strict=True)
    except RuntimeError as exc:
        raise LtmError(f"{where} has weights of the wrong shape ({str(exc).splitlines()[-1].strip()[:160]})") from None
