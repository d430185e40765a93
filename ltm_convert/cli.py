"""`ltm-convert`: a thin command line over the Python API.

    ltm-convert convert MODEL --ratio 0.8 -o OUT      convert and save
    ltm-convert convert MODEL --ratio 0.8 --dry-run   show the plan, write nothing
    ltm-convert inspect OUT.pt                        show what a saved model holds

Every decision lives in the API (``ltm_convert.sources``, ``ltm_convert.api``, ``ltm_convert.io``);
this module only parses arguments and prints. Errors a user can fix (:class:`LtmError`, bad
arguments) print as one line ``error: ...`` on stderr and exit with status 2; anything else prints
one line and exits with status 1. ``LTM_DEBUG=1`` re-raises with the full traceback.

Importing this module stays light: torch, timm and transformers load inside the commands.
"""
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, List, Optional

import typer

if __name__ == "__main__":  # `python -m ltm_convert.cli`: the sub-commands import this module by name
    sys.modules.setdefault("ltm_convert.cli", sys.modules[__name__])

from ltm_convert import __version__
from ltm_convert.cli_options import (  # the commands use these as cli.<Opt>
    DEFAULT_RATIO,
    CheckpointOpt,
    ExcludeOpt,
    InputSizeOpt,
    JsonOpt,
    MethodOpt,
    NoPretrainedOpt,
    RatioOpt,
    TopkOpt,
    _join_input_size,
)
from ltm_convert.errors import LtmError

PROG = "ltm-convert"


def _typer_exception(name: str) -> type:
    """typer's own usage-error classes: click's before typer 0.20-ish, a vendored copy after."""
    for klass in typer.BadParameter.__mro__:
        if klass.__name__ == name:
            return klass
    raise ImportError(f"typer has no {name}")  # pragma: no cover


_ClickException = _typer_exception("ClickException")
_UsageError = _typer_exception("UsageError")

DEBUG_ENV = "LTM_DEBUG"

app = typer.Typer(
    name=PROG,
    help=(
        "Convert pretrained vision transformers (timm, HuggingFace, or the bundled DINOv2 ViT-S/14) "
        "into Learnable Token Merging models that use a chosen fraction of the original FLOPs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --------------------------------------------------------------------------------------------
# Output


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


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

    console = _console()
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
    console.print(table)

    totals = Table(show_header=False, box=None, pad_edge=False)
    totals.add_column(style="bold")
    totals.add_column()
    f0, f1 = info.get("flops_original"), info.get("flops_converted")
    size = info.get("input_size")
    size_txt = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) and len(size) == 2 else "?"
    totals.add_row("model", f"{info.get('model', '?')}  ({_source_text(info.get('source'))})")
    totals.add_row("input size", size_txt)
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
    console.print(totals)


def _source_text(source: Any) -> str:
    if not source:
        return "source unknown"
    if isinstance(source, dict):
        spec = source.get("spec") or source.get("name") or source.get("model")
        if spec:
            return f"source {spec}"
        return "source " + ", ".join(f"{k}={v}" for k, v in source.items())
    return f"source {source}"


def _emit_json(info: dict) -> None:
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
def _quiet_stdout(enabled: bool) -> Iterator[None]:
    """In --json mode nothing but the document may reach stdout: send stray prints to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _say(message: str, json_mode: bool) -> None:
    """A status line for people; goes to stdout so that stderr holds only warnings and errors."""
    if not json_mode:
        _console().print(message)


# --------------------------------------------------------------------------------------------
# Commands


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Convert pretrained vision transformers (timm, HuggingFace, or the bundled DINOv2 ViT-S/14)
    into Learnable Token Merging models that use a chosen fraction of the original FLOPs.

    Set LTM_DEBUG=1 to see full tracebacks.
    """


def _load_source(spec: str, no_pretrained: bool, checkpoint: Optional[Path]):
    from ltm_convert.sources import load_model

    return load_model(spec, pretrained=not no_pretrained, checkpoint=str(checkpoint) if checkpoint else None)


def _is_saved_model(path: Path) -> bool:
    if path.is_dir():
        return (path / "ltm_config.json").is_file()
    return path.suffix in (".pt", ".pth")


CONVERT_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert convert bundled --ratio 0.8 -o out/dinov2_s_ltm.pt

  ltm-convert convert vit_base_patch16_224 --ratio 0.8 -o model.pt --no-pretrained

  ltm-convert convert deit_small_patch16_224 -r 0.6 --checkpoint deit_s.safetensors -o deit_ltm/

  ltm-convert convert hf:./my-local-vit --ratio 0.7 --input-size 384 --dry-run

  ltm-convert convert vit_tiny_patch16_224 --no-pretrained --exclude blocks.0 --dry-run --json
"""


@app.command(epilog=CONVERT_EPILOG, no_args_is_help=True)
def convert(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A timm model name, 'hf:<id or local dir>', or 'bundled' (DINOv2 ViT-S/14, offline).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Where to save: OUT.pt = one weights-only torch file; anything else = a directory "
            "(config JSON + safetensors). Required unless --dry-run.",
        ),
    ] = None,
    ratio: RatioOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    checkpoint: CheckpointOpt = None,
    input_size: InputSizeOpt = None,
    exclude: ExcludeOpt = None,
    method: MethodOpt = None,
    topk: TopkOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", "-n", help="Convert in memory and print the plan; write nothing."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert MODEL into an LTM model that uses --ratio of its FLOPs, and save it."""
    if output is None and not dry_run:
        raise _UsageError("missing option '--output' / '-o' (required unless --dry-run)")
    ratio = DEFAULT_RATIO if ratio is None else ratio
    with _quiet_stdout(json_out):
        _say(f"loading {model} ...", json_out)
        base = _load_source(model, no_pretrained, checkpoint)
        from ltm_convert.api import convert as api_convert, describe

        _say(f"converting at ratio {ratio:g} ...", json_out)
        converted = api_convert(
            base,
            ratio=ratio,
            input_size=input_size,  # already (H, W) or None
            exclude=list(exclude) if exclude else None,
            method=method or "ltm",
            **({} if topk is None else {"topk": topk}),
        )
        info = describe(converted)
        if not dry_run:
            from ltm_convert.io import save

            save(converted, str(output))
    if json_out:
        _emit_json(info)
        return
    render_summary(info, title=f"LTM plan for {model}")
    if dry_run:
        target = f" (would write {output})" if output is not None else ""
        _say(f"dry run: nothing written{target}", json_out)
    else:
        _say(f"saved to {output}", json_out)


INSPECT_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert inspect out/dinov2_s_ltm.pt

  ltm-convert inspect deit_ltm/ --json

  ltm-convert inspect vit_small_patch16_224 --no-pretrained --ratio 0.6 --input-size 224
"""


@app.command(epilog=INSPECT_EPILOG, no_args_is_help=True)
def inspect(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_OR_FILE",
            help="A saved LTM model (.pt file or a directory with ltm_config.json), or a model "
            "source as for convert (then it is converted in memory at --ratio).",
            show_default=False,
        ),
    ],
    ratio: RatioOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    checkpoint: CheckpointOpt = None,
    input_size: InputSizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show an LTM model's token schedule, FLOPs and added parameters."""
    path = Path(target)
    saved = _is_saved_model(path)
    if saved and not path.exists():
        raise LtmError(f"no such file or directory: {target}")
    with _quiet_stdout(json_out):
        from ltm_convert.api import describe

        if saved:
            from ltm_convert.io import load

            ignored = [
                flag
                for flag, given in (
                    ("--ratio", ratio is not None),
                    ("--no-pretrained", no_pretrained),
                    ("--checkpoint", checkpoint is not None),
                    ("--input-size", input_size is not None),
                )
                if given
            ]
            if ignored:
                warnings.warn(
                    f"{', '.join(ignored)} ignored: {target} is a saved model and keeps its own settings",
                    UserWarning,
                    stacklevel=1,
                )
            model = load(str(path))
        else:
            from ltm_convert.api import convert as api_convert

            base = _load_source(target, no_pretrained, checkpoint)
            model = api_convert(
                base, ratio=DEFAULT_RATIO if ratio is None else ratio, input_size=input_size
            )
        info = describe(model)
    if json_out:
        _emit_json(info)
        return
    render_summary(info, title=f"LTM model {target}")


# --------------------------------------------------------------------------------------------
# Entry point: one line per error


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _error(message: str) -> None:
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()


def _flush_warnings(messages: List[str]) -> None:
    seen = set()
    for message in messages:
        text = _one_line(message)
        if text in seen:
            continue
        seen.add(text)
        sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


class _Buffer(logging.Handler):
    """Holds library log warnings back until the command has succeeded (an error prints one line)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad log call must not break the command
            pass


def _register_commands() -> None:
    """finetune, bench, export and visualize live in ltm_convert.commands (one module each)."""
    from ltm_convert.commands import bench, export, finetune, visualize

    for module in (finetune, bench, export, visualize):
        module.register(app)


_register_commands()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 unexpected failure, 2 user error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = _join_input_size(args)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")
    # Library chatter on stderr would break "one error line"; keep only real warnings.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    command = typer.main.get_command(app)
    buffer = _Buffer()
    root = logging.getLogger()
    if not debug:
        root.addHandler(buffer)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            result = command.main(args=args, prog_name=PROG, standalone_mode=False)
        except _ClickException as exc:  # bad arguments: typer / click usage errors
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ltm-convert`: help was shown
                return 2
            if debug:
                raise
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, _UsageError) and not isinstance(exc, typer.BadParameter) and ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            _error(exc.format_message() + hint)
            return 2
        except typer.Abort:
            _error("aborted")
            return 130
        except LtmError as exc:
            if debug:
                raise
            _error(str(exc))
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            _error("interrupted")
            return 130
        except BrokenPipeError:
            # stdout closed early (e.g. piped into `head`): not an error worth a traceback.
            with contextlib.suppress(Exception):
                sys.stdout = open(os.devnull, "w")
            return 1
        except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
            if debug:
                raise
            _error(f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
            return 1
        finally:
            root.removeHandler(buffer)
    if not debug:
        caught = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    _flush_warnings([str(w.message) for w in caught] + buffer.messages)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
