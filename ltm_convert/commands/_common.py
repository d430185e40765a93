"""What every `ltm-convert` command shares: option aliases, argument parsing, output, model loading.

Each command words the same flag the same way (huggingface_hub's habit), prints through the same
helpers, and resolves "a saved model or a model source" through :func:`resolve_model`. Importing
this module stays light: no torch, timm or transformers.
"""
import contextlib
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, List, Optional, Tuple

import typer

from ltm_convert.config import DEFAULT_RATIO
from ltm_convert.errors import LtmError

# --------------------------------------------------------------------------------------------
# Argument parsing helpers


def ratio_callback(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    from ltm_convert.config import validate_ratio

    try:
        return validate_ratio(value)
    except LtmError as exc:
        raise typer.BadParameter(str(exc)) from None


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[x×X,]\s*(\d+))?\s*$")


def parse_input_size(value: Optional[str]) -> Optional[Tuple[int, int]]:
    """'224' -> (224, 224); '224x160' / '224,160' -> (224, 160). Two separate numbers
    (``--input-size 224 160``) are joined into '224x160' by :func:`_join_input_size` first."""
    if value is None:
        return None
    match = _SIZE_RE.match(str(value))
    if not match:
        raise typer.BadParameter(f"expected H W, HxW or one integer (e.g. 224), got {value!r}")
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) is not None else h
    from ltm_convert.config import check_input_size

    try:
        return check_input_size((h, w), "--input-size")
    except LtmError as exc:
        raise typer.BadParameter(str(exc)) from None


def _input_size_callback(value: Optional[str]) -> Optional[Tuple[int, int]]:
    return parse_input_size(value)


_INPUT_SIZE_FLAGS = ("--input-size", "-s")


def _join_input_size(argv: List[str]) -> List[str]:
    """Let ``--input-size 224 160`` mean ``--input-size 224x160`` (click options take a fixed
    number of values, and ``--input-size 224`` must keep working)."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if (
            arg in _INPUT_SIZE_FLAGS
            and i + 2 < len(argv)
            and argv[i + 1].isdigit()
            and argv[i + 2].isdigit()
        ):
            out.extend([arg, f"{argv[i + 1]}x{argv[i + 2]}"])
            i += 3
            continue
        out.append(arg)
        i += 1
    return out


# Shared option aliases: every command words the same flag the same way.
RatioOpt = Annotated[
    Optional[str],  # parsed by validate_ratio, whose message says what the number means
    typer.Option(
        "--ratio",
        "-r",
        metavar="R",
        help="Fraction of the original FLOPs the converted model may use, in (0, 1]. "
        f"Default {DEFAULT_RATIO}.",
        callback=ratio_callback,
        show_default=False,
    ),
]
NoPretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--no-pretrained",
        help="Build the architecture with random weights (no download; for trying things out).",
    ),
]
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--checkpoint",
        "-c",
        metavar="FILE",
        help="Load the base model's weights from a local state-dict file (.safetensors, or a "
        "torch file such as .pt / .bin; never unpickled) instead of downloading them.",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]
InputSizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--input-size",
        "-s",
        metavar="H W|HxW|N",
        help="Input resolution the token schedule and FLOPs are computed for "
        "(default: the model's own).",
        callback=_input_size_callback,
    ),
]
ExcludeOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--exclude",
        "-x",
        metavar="NAME",
        help="Leave this block (name or name prefix, e.g. blocks.0) unconverted. Repeatable.",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document on stdout (the model description) and nothing else.",
    ),
]


def _one_of(value: Optional[str], choices: "list[str] | tuple[str, ...]", what: str) -> Optional[str]:
    if value is not None and value not in choices:
        raise typer.BadParameter(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def method_callback(value: Optional[str]) -> Optional[str]:
    if value is None:  # not given: nothing to check (the method registry loads torch)
        return None
    from ltm_convert.merge.methods import method_names

    return _one_of(value, method_names(), "method")


MethodOpt = Annotated[
    Optional[str],
    typer.Option(
        "--method",
        "-m",
        metavar="METHOD",
        help="Mask module: ltm (learnable, the default) or a training-free baseline: tome, tofu, ltmp.",
        callback=method_callback,
    ),
]
NumClassesOpt = Annotated[
    Optional[int],
    typer.Option(
        "--num-classes",
        metavar="N",
        min=0,
        help="Classes of the model's head (timm spelling; HF: num_labels). Default: read from --checkpoint, "
        "else the model's own.",
    ),
]


def model_kwargs_callback(values: Optional[List[str]]) -> Optional[dict]:
    """``key=value`` pairs; values are JSON (numbers, true/false, lists) or plain strings."""
    if not values:
        return None
    out: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value (e.g. global_pool=avg), got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
        except RecursionError:
            raise typer.BadParameter(f"the value of {key.strip()!r} is nested too deeply; give a number, "
                                     "true/false, a short list or a string") from None
    return out


def _check_model_kwargs(values: Optional[List[str]]) -> Optional[List[str]]:
    model_kwargs_callback(values)  # raises for a malformed pair; the command parses them (typer keeps lists)
    return values


ModelKwargsOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--model-kwargs",
        metavar="KEY=VALUE",
        callback=_check_model_kwargs,
        help="A constructor option of the base model in timm's spelling (e.g. global_pool=avg, img_size=384). "
        "Repeatable. Recorded in the saved recipe.",
    ),
]


def schedule_callback(value: Optional[str]) -> Optional[str]:
    from ltm_convert.config import SCHEDULES

    return _one_of(value, SCHEDULES, "schedule")


ScheduleOpt = Annotated[
    Optional[str],
    typer.Option(
        "--schedule",
        metavar="SHAPE",
        callback=schedule_callback,
        help="How the FLOPs budget is spread over the blocks: fraction (each keeps the same fraction), "
        "constant (each removes the same number, ToMe's r) or calibrated (measured on a few images: "
        "merge where it costs least; slower to convert).",
    ),
]
CalibrationImagesOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--calibration-images",
        metavar="DIR",
        help="With --schedule calibrated: a folder of photos to measure on (the first 64; default: eight "
        "views of four bundled photos).",
    ),
]
TopkOpt = Annotated[
    Optional[int],
    typer.Option(
        "--topk",
        "-k",
        metavar="K",
        min=0,
        help="LTM only: each merged-away token spreads over its K most similar targets "
        "(default 2; 0 = every target, slower).",
    ),
]
DenseOpt = Annotated[
    bool,
    typer.Option(
        "--dense",
        help="Keep patch tokens to the last block, for heads that read the patch grid (feature maps, "
        "segmentation, depth): a class-token model otherwise merges its last block's patches into one.",
    ),
]


# --------------------------------------------------------------------------------------------
# Output


def _typer_exception(name: str) -> type:
    """typer's own usage-error classes: click's before typer 0.20-ish, a vendored copy after."""
    for klass in typer.BadParameter.__mro__:
        if klass.__name__ == name:
            return klass
    raise ImportError(f"typer has no {name}")  # pragma: no cover


_ClickException = _typer_exception("ClickException")
_UsageError = _typer_exception("UsageError")


# Output


def console(stderr: bool = False):
    """A rich console; written to a file or pipe (a log, CI) it is wide, since rich would otherwise
    assume 80 columns and cut table cells to "…" (a terminal's own width, or COLUMNS, still rules)."""
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=200 if piped else None)


def _fmt_flops(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n):,} FLOPs"


def _fmt_params(n: Optional[float]) -> str:
    if n is None:
        return "?"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{int(n):,}"


def render_summary(info: dict, *, title: Optional[str] = None) -> None:
    """Print ``describe``'s dict as two rich tables: per-block tokens, then totals."""
    from rich.table import Table

    out = console()
    blocks = info.get("blocks") or []
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("block", overflow="fold")
    table.add_column("tokens in", justify="right")
    table.add_column("tokens out", justify="right")
    table.add_column("kept", justify="right")
    for block in blocks:
        t_in, t_out = block.get("tokens_in"), block.get("tokens_out")
        kept = f"{100.0 * t_out / t_in:.0f}%" if t_in and t_out is not None else ""
        table.add_row(str(block.get("name", "?")), str(t_in), str(t_out), kept)
    out.print(table)

    totals = Table(show_header=False, box=None, pad_edge=False)
    totals.add_column(style="bold")
    totals.add_column()
    f0, f1 = info.get("flops_original"), info.get("flops_converted")
    size = info.get("input_size")
    size_txt = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) and len(size) == 2 else "?"
    if info.get("frames"):
        size_txt = f"clips of {info['frames']} frames at {size_txt}"
    totals.add_row("model", f"{info.get('model', '?')}  ({_source_text(info.get('source'))})")
    totals.add_row("input size", size_txt)
    if info.get("dense"):
        totals.add_row("dense", "patch tokens kept to the last block (full-grid maps)")
    if info.get("method"):
        method = info["method"] + (f" (top-{info['topk']} targets)" if info.get("topk") else "")
        totals.add_row("method", method)
    totals.add_row("FLOPs before", _fmt_flops(f0))
    totals.add_row("FLOPs after", _fmt_flops(f1))
    ratio_txt = f"{info.get('flops_ratio', float('nan')):.3f}"
    if info.get("ratio") is not None:
        ratio_txt += f"  (target {info['ratio']:g})"
        if info.get("grids") and abs(info.get("flops_ratio", 0) - info["ratio"]) > 0.02 * info["ratio"]:
            ratio_txt += "  closest reachable with grid-preserving merges"
    totals.add_row("FLOPs ratio", ratio_txt)
    if info.get("flops_for"):
        totals.add_row("FLOPs for", str(info["flops_for"]))
    if info.get("grids"):
        totals.add_row("patch grids", ", ".join("{}x{} -> {}x{}".format(*g["grid"], *g["grid_out"]) for g in info["grids"]))
    p0, added = info.get("params_original"), info.get("params_added")
    added_txt = f"{int(added):,}" if added is not None else "?"
    if p0 and added is not None:
        added_txt += f"  (+{100.0 * added / p0:.3f}% of {_fmt_params(p0)})"
    totals.add_row("params added", added_txt)
    totals.add_row("prefix tokens", str(info.get("prefix_tokens", "?")))
    totals.add_row("head", str(info.get("head", "?")))
    totals.add_row("blocks converted", f"{len(blocks)}")
    out.print(totals)


def _source_text(source: Any) -> str:
    if not source:
        return "source unknown"
    if isinstance(source, dict):
        spec = source.get("spec") or source.get("name") or source.get("model")
        if spec:
            return f"source {spec}"
        return "source " + ", ".join(f"{k}={v}" for k, v in source.items())
    return f"source {source}"


def emit_json(info: dict) -> None:
    sys.stdout.write(json.dumps(info, indent=2, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        return item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def quiet_stdout(enabled: bool) -> Iterator[None]:
    """In --json mode nothing but the document may reach stdout: send stray prints to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def say(message: str, json_mode: bool) -> None:
    """A status line for people; goes to stdout so that stderr holds only warnings and errors."""
    if not json_mode:
        console().print(message)


# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Models


def resolve_model(target: str, *, no_pretrained: bool = False, checkpoint: Optional[Path] = None,
                  model_kwargs: Optional[dict] = None, given: Optional[dict] = None) -> Tuple[Any, bool]:
    """(model, is_saved): a saved LTM model (.pt or a directory) loaded as is, or the base model of
    a model source (timm name, hf:..., bundled; ``ltm_NAME`` builds NAME) built to be converted. ``given``
    maps the flags a command got to whether they were given: for a saved model they are ignored, with a
    warning."""
    from ltm_convert.io import is_saved_model, load

    path = Path(target)
    if target.startswith("hf:") and Path(target[3:]).expanduser().is_dir() and is_saved_model(Path(target[3:]).expanduser()):
        path = Path(target[3:]).expanduser()  # save_pretrained of a converted model: its recipe is in config.json
    if is_saved_model(path):
        if not path.exists():
            raise LtmError(f"no such file or directory: {target}")
        ignored = [flag for flag, was_given in (given or {}).items() if was_given]
        if no_pretrained:
            ignored.append("--no-pretrained")
        if checkpoint is not None:
            ignored.append("--checkpoint")
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: {target} is a saved model and keeps its own settings",
                          UserWarning, stacklevel=2)
        return load(str(path)), True
    from ltm_convert.sources import load_model, ltm_base

    target = ltm_base(target) or target  # ltm_NAME: the command converts NAME itself
    return load_model(target, pretrained=not no_pretrained, checkpoint=str(checkpoint) if checkpoint else None,
                      **(model_kwargs or {})), False


def check_output(path: Optional[Path], replace: bool = True, model: bool = False) -> None:
    """Refuse an output that cannot be written before any work starts: the permission checks of
    ``io.check_writable`` (``replace``: the output replaces what is there, so that must be ours),
    then a real file created (and removed) where the output will go, since some folders refuse new
    files whatever their permissions say (/proc, /sys, for root too). ``model``: the output is a
    saved model (a .pt file, or else a directory), so an existing file of another name is refused
    now, not after the conversion."""
    if path is None:
        return
    import os
    import tempfile

    from ltm_convert.io import MODEL_SUFFIXES, check_writable

    if model and Path(path).suffix not in MODEL_SUFFIXES and Path(path).exists() and not Path(path).is_dir():
        raise LtmError(f"{path} exists and is not a directory; give a .pt file name or a directory")

    path = check_writable(path, replace)
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".ltm-write-check.", dir=probe)
    except OSError as exc:
        raise LtmError(f"cannot write {path}: {probe} does not accept new files ({exc.strerror or exc}); "
                       "choose another output location") from None
    os.close(fd)
    os.unlink(name)
