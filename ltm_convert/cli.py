"""`ltm-convert`: the command line, a thin layer over the Python API.

    ltm-convert convert MODEL --ratio 0.8 -o OUT      convert and save
    ltm-convert inspect OUT.pt                        show what a saved model holds
    ltm-convert train MODEL --data DIR -o OUT.pt       train from scratch (labels only)
    ltm-convert finetune | bench | export | visualize

Each command lives in ``ltm_convert/commands/`` (one module each, sharing ``_common.py``); this
module builds the app and runs it. Errors a user can fix (:class:`LtmError`, bad arguments) print
as one line ``error: ...`` on stderr (``{"error": ...}`` on stdout with ``--json``) and exit with
status 2; so do the other failures an input can cause (commands/_errors.py: memory, nesting, paths,
options the model library rejects while building or loading the model). Anything else is a bug in
ltm_convert: one line, exit status 1. ``LTM_DEBUG=1`` adds the full traceback (the exit status stays
the same).

Importing this module stays light: torch, timm and transformers load inside the commands.
"""
import atexit
import gc
import json
import logging
import os
import sys
import traceback
import warnings
from typing import Annotated, List, Optional

import typer

from ltm_convert import __version__
from ltm_convert.commands._common import _ClickException, _join_input_size, _UsageError
from ltm_convert.commands._errors import user_error as _user_error

PROG = "ltm-convert"
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


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.",
                                          callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Convert pretrained vision transformers (timm, HuggingFace, or the bundled DINOv2 ViT-S/14)
    into Learnable Token Merging models that use a chosen fraction of the original FLOPs.

    Set LTM_DEBUG=1 to see full tracebacks.
    """


def _register_commands() -> None:
    from ltm_convert.commands import bench, convert, export, finetune, train, visualize

    for module in (convert, finetune, train, bench, export, visualize):
        module.register(app)


_register_commands()


# --------------------------------------------------------------------------------------------
# Entry point: one line per error


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _error(message: str, json_mode: bool) -> None:
    text = _one_line(message)
    if json_mode:
        sys.stdout.write(json.dumps({"error": text}) + "\n")
        sys.stdout.flush()
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def _flush_warnings(messages: List[str]) -> None:
    seen = set()
    for message in messages:
        text = _one_line(message)
        if text not in seen:
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


def _quiet_progress_bars() -> None:
    """HF's download / "Loading weights" tqdm bars would write lines to stderr: off, also when the
    libraries were imported before ``main`` ran (the environment variable is read at import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and hasattr(hub, "disable_progress_bars"):
        hub.disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and hasattr(hf_logging, "disable_progress_bar"):
        hf_logging.disable_progress_bar()


_EXIT_FREEZE: List[bool] = []


def _freeze_heap_at_exit() -> None:
    """At exit, Python's last garbage collections walk every object still alive (torch's and timm's
    modules, the model: half a million objects after a dry run) only to free memory the operating
    system takes back anyway: about 1 s of a dry run's wall time on a busy 2-core machine. Freezing
    the heap in an exit handler skips that walk (objects caught in reference cycles then go without
    their finalizers, which exit does not promise anyway). Registered once; it runs only when the
    process ends, after the command has printed and closed its (atomically written) files, so
    callers of :func:`main` in a longer-lived process lose nothing before then."""
    if not _EXIT_FREEZE:
        _EXIT_FREEZE.append(True)
        atexit.register(gc.freeze)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 unexpected failure, 2 user error)."""
    _freeze_heap_at_exit()
    args = _join_input_size(list(sys.argv[1:] if argv is None else argv))
    json_mode = "--json" in args
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")
    # Library chatter on stderr would break "one error line"; keep only real warnings.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_progress_bars()
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
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, _UsageError) and not isinstance(exc, typer.BadParameter) and ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            if debug:
                traceback.print_exc()
            _error(exc.format_message() + hint, json_mode)
            return 2
        except typer.Abort:
            _error("aborted", json_mode)
            return 130
        except KeyboardInterrupt:
            _error("interrupted", json_mode)
            return 130
        except BrokenPipeError:
            # stdout closed early (e.g. piped into `head`): not an error worth a traceback.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return 1
        except Exception as exc:  # noqa: BLE001 - the one place that turns failures into one line
            message = _user_error(exc)
            if message is None and debug:
                raise  # a bug: the full traceback, as Python prints it
            if debug:
                traceback.print_exc()
            if message is not None:
                _error(message, json_mode)
                return 2
            _error(f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)", json_mode)
            return 1
        finally:
            root.removeHandler(buffer)
    if not debug:
        caught = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    _flush_warnings([str(w.message) for w in caught] + buffer.messages)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
