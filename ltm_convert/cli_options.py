"""Argument parsing helpers and the option aliases every `ltm-convert` command shares.

Kept apart from ``cli.py`` so that each command words the same flag the same way and the entry
module stays small. Importing this module stays light: no torch, timm or transformers.
"""
import re
from pathlib import Path
from typing import Annotated, List, Optional, Tuple

import typer

from ltm_convert.errors import LtmError

DEFAULT_RATIO = 0.8

# --------------------------------------------------------------------------------------------
# Argument parsing helpers


def _ratio_callback(value: Optional[str]) -> Optional[float]:
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
    if h <= 0 or w <= 0:
        raise typer.BadParameter(f"height and width must be positive, got {value!r}")
    return (h, w)


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
        callback=_ratio_callback,
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


def _method_callback(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    from ltm_convert.methods import method_names

    if value not in method_names():
        raise typer.BadParameter(f"unknown method {value!r}; choose one of {', '.join(method_names())}")
    return value


MethodOpt = Annotated[
    Optional[str],
    typer.Option(
        "--method",
        "-m",
        metavar="METHOD",
        help="Mask module: ltm (learnable, the default) or a training-free baseline: tome, tofu, ltmp.",
        callback=_method_callback,
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
        "(default 4; 0 = every target, slower).",
    ),
]
