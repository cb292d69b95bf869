"""Input and output paths, checked before anything is opened or written; used by every stage.

Reading a FIFO blocks forever in ``open()`` and a character device never ends, so inputs must be
regular files (``input_file``) or folders of them (``input_folder``). Outputs are checked up front so a
long job does not fail at its last step (``output_file``, ``output_dir``), and an ``OSError`` becomes
one line naming the path and the errno text (``os_error_line``). Writers put their data in a
temporary next to the target (``.NAME.tmp-PID``, ``.NAME.PID.tmp``, ``.NAME.old-PID``) and rename it;
``sweep_stale_temps`` removes the ones whose writer no longer runs (it was killed with SIGKILL).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from sparseflash.errors import SparseflashError


def note(message: str) -> None:
    """One line on stderr that is not an error: ``sparseflash: note: ...``."""
    print(f"sparseflash: note: {message}", file=sys.stderr)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: str | os.PathLike, what: str, hint: str = "") -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise SparseflashError(f"{path}: {what} not found{hint}") from None
    except OSError as e:
        raise SparseflashError(f"{path}: cannot read the {what} ({e.strerror})") from None


def input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """``path`` if it is a regular file (symlinks followed); anything else (missing, a directory, a
    FIFO, a device) is one SparseflashError line naming the path and what was expected."""
    st = _stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise SparseflashError(f"{path}: is {_kind(st.st_mode)}, expected a {what}")
    return Path(path)


def input_folder(path: str | os.PathLike, what: str = "folder",
                 suffixes: tuple[str, ...] = (".json", ".safetensors", ".gguf"), hint: str = "") -> Path:
    """``path`` if it is a directory whose entries ending in ``suffixes`` are all regular files
    (``hint`` is added to the not-found message, e.g. the command that makes the folder)."""
    st = _stat(path, what, hint)
    if not stat.S_ISDIR(st.st_mode):
        raise SparseflashError(f"{path}: is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}, "
                               f"expected a {what}")
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise SparseflashError(f"{path}: cannot list the {what} ({e.strerror})") from None
    for entry in entries:
        if entry.name.endswith(suffixes):
            input_file(entry.path, f"file ({entry.name} of the {what})")
    return Path(path)


def input_model(path: str | os.PathLike | None) -> None:
    """A model argument: a .gguf or .sflash file, or a checkpoint folder (None: the bundled model). A
    path that does not exist is left to the model's reader, whose message names the command to run."""
    if path is None or not os.path.lexists(path):
        return
    if str(path).endswith((".gguf", ".sflash")):
        input_file(path, "GGUF file" if str(path).endswith(".gguf") else "layout file")
    else:
        input_folder(path, "checkpoint folder")


def output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse an output file path that cannot be written: its folder missing or not a folder, read-only,
    or the path itself an existing directory (nothing is created here)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise SparseflashError(f"{path}: is a directory, expected a {what} path")
    if not parent.is_dir():
        raise SparseflashError(f"{parent}: folder for the {what} does not exist")
    _writable(parent, path, what)
    return path


def output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse an output folder path that is an existing file (or other non-directory), or whose nearest
    existing ancestor cannot be written; a folder that exists is replaced whole by the writer."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparseflashError(f"{path}: exists and is not a directory; remove it or choose another {what}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SparseflashError(f"{ancestor}: is a file, so the {what} {path} cannot be made")
    _writable(ancestor, path, what)
    return path


def _writable(folder: Path, path: Path, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(folder) else "permission denied"
        raise SparseflashError(f"{path}: cannot write the {what} in {folder} ({reason})")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def os_error_line(e: OSError, context: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path(s) it names (or ``context``) and the errno text."""
    text = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) for p in paths) if paths else (os.fspath(context) if context else None)
    return f"{where}: {text}" if where else text


# ---- temporaries of writers that no longer run -------------------------------------------------

def pid_running(pid: int) -> bool:
    """True if a process ``pid`` exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_pid(target_name: str, name: str) -> int | None:
    """The writer pid of ``name`` if it is a temporary for ``target_name``, else None."""
    e = re.escape(target_name)
    for pattern in (rf"\.{e}\.tmp-(\d+)", rf"\.{e}\.(\d+)\.tmp", rf"\.{e}\.old-(\d+)"):
        m = re.fullmatch(pattern, name)
        if m:
            return int(m.group(1))
    return None


def sweep_stale_temps(target: str | os.PathLike, report: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporaries (files or folders) left next to ``target`` by writers that no longer run
    (killed before they could clean up); returns what was removed, and tells ``report`` of each. A
    folder that was being swapped in (``.NAME.old-PID``) while the target is missing is put back."""
    target = Path(target).absolute()
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _temp_pid(target.name, entry.name)
        if pid is None or pid == os.getpid() or pid_running(pid):
            continue
        path = Path(entry.path)
        try:
            if entry.name.startswith(f".{target.name}.old-") and not os.path.lexists(target):
                os.replace(path, target)  # the writer died between its two renames: the old one is the target
                if report is not None:
                    report(f"restored {target} from {path.name}, left by a writer (pid {pid}) that no longer runs")
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            if report is not None:
                report(f"removed {path}, a temporary left by a writer (pid {pid}) that no longer runs")
        except OSError:
            continue  # not ours to remove (permissions): leave it
    return removed
