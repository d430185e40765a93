"""Writing outputs without losing what was there: atomic replaces, only of our own outputs.

A file is written beside its target and renamed over it; a directory is written whole beside its
target and swapped in with one atomic exchange, so a reader sees the old output or the new one.
An existing target is replaced only when ltm_convert wrote it (a directory holding nothing but a
``ltm_config.json`` recipe and ``model.safetensors``; a ``.pt`` file holding an ``ltm_recipe``):
a user's HF model folder, checkpoint or notes are refused with one line, never overwritten.

Temporary names carry the host and pid of the writer (``.<target>.ltm-<host>-<pid>-<rand>.tmp``),
so the next save to the same target can remove what a killed writer left behind (its pid no
longer runs on this host) without touching a save still in progress. Files get the user's umask.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from ltm_convert.config import is_int
from ltm_convert.errors import LtmError

CONFIG_NAME = "ltm_config.json"
WEIGHTS_NAME = "model.safetensors"
OUR_DIRECTORY_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})  # all that save() writes into a directory
MODEL_SUFFIXES = (".pt", ".pth")
FILE_SUFFIXES = (*MODEL_SUFFIXES, ".onnx", ".png")
_TMP_TAG = "ltm"
_FOREIGN_HOST_STALE_S = 24 * 3600  # a temp of another host (shared disk): its pid cannot be checked here
_LEGACY_STALE_S = 3600  # temps of writers before pids were in the name (``.<target>.<rand>.tmp``)
_MARKER_MAX_BYTES = 1 << 20  # a recipe is a few KB; a bigger ltm_config.json was not written by us


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def check_writable(path: Path | str, replace: bool = True) -> Path:
    """Refuse, before any work is done, an output path that cannot be written (a directory where a
    file goes, a parent that is a file, a folder without write permission) or, when the output will
    ``replace`` what is there, that holds something ltm_convert did not write. A fine-tuning work
    directory is written into, never replaced (``replace=False``): a run resumes from it."""
    path = Path(path)
    if path.suffix in FILE_SUFFIXES and path.is_dir():
        raise LtmError(f"{path} is an existing directory; give a file name that does not exist or is a file")
    parent = path.parent if path.suffix or not path.is_dir() else path
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LtmError(f"cannot write {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LtmError(f"cannot write {path}: no write permission in {probe}; choose another output location")
    if replace:
        check_replaceable(path)
    return path


def check_replaceable(path: Path) -> None:
    """An existing saved-model target may be replaced only if ltm_convert wrote it."""
    if path.is_dir():
        _check_our_directory(path)
    elif path.suffix in MODEL_SUFFIXES and path.is_file() and path.stat().st_size > 0 and not _is_our_file(path):
        raise LtmError(f"{path} exists and is not a model saved by ltm_convert; it is never replaced: choose "
                       "another output name, or move the file away first")


def _check_our_directory(path: Path) -> None:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in OUR_DIRECTORY_FILES]
    if foreign:
        raise LtmError(f"{path} already holds other files ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
                       "); it is never replaced: give a new or empty directory, or one written by ltm_convert")
    if not _is_our_recipe(path / CONFIG_NAME):
        raise LtmError(f"{path} holds {', '.join(names)} without an ltm_convert recipe ({CONFIG_NAME} written by "
                       "ltm_convert.save); it is never replaced: give a new or empty directory")


def _is_our_recipe(path: Path) -> bool:
    """``ltm_config.json`` as save() writes it: a JSON object with an integer ltm_format, a source
    and a config (an HF folder's config.json or a stray file of that name is not one)."""
    try:
        if not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and is_int(data.get("ltm_format")) and "source" in data and "config" in data


def _is_our_file(path: Path) -> bool:
    """A ``torch.save`` zip whose pickle names an ``ltm_recipe`` (read as bytes, never unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
            return len(pickles) == 1 and pickles[0].file_size <= 64 * _MARKER_MAX_BYTES and \
                b"ltm_recipe" in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False


# --------------------------------------------------------------------------------------------
# temporary names, and what killed writers left behind


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_TMP_TAG}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot judge): leave its files alone
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files and folders an earlier, killed save to ``path`` left beside it:
    ours by name, and not in use (their writer's pid is gone from this host; another host's or an
    unnamed writer's after a day or an hour). Returns what was removed."""
    name = re.escape(path.name)
    ours = re.compile(rf"^\.{name}\.{_TMP_TAG}-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[a-z0-9_]+\.(tmp|old)$")
    legacy = re.compile(rf"^\.{name}\.[a-z0-9_]{{8}}\.(tmp|old)$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        match = ours.match(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match and match["host"] == host:
            stale = int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
        elif match:
            stale = age > _FOREIGN_HOST_STALE_S
        else:
            stale = bool(legacy.match(entry.name)) and age > _LEGACY_STALE_S
        if not stale:
            continue
        target = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        removed.append(target)
    return removed


# --------------------------------------------------------------------------------------------
# atomic replaces


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
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
    removed afterwards). A directory that ltm_convert did not write is refused."""
    if path.exists() and not path.is_dir():
        raise LtmError(f"{path} exists and is not a directory; give a .pt file name or a directory")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
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
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".old", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
