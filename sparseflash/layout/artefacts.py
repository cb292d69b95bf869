"""Artefact directories (profile, predictors) are written whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sparseflash.paths import output_dir, sweep_stale_temps

T = TypeVar("T")


def write_dir_atomically(out_dir: str | os.PathLike, fill: Callable[[Path], T]) -> T:
    """Run ``fill(tmp)`` on a fresh sibling temp directory, then swap it into ``out_dir``.

    On any failure (interrupts included) the temp directory is removed and ``out_dir`` is left as
    it was; an existing ``out_dir`` is replaced only once the new one is complete, and only if it is a
    directory (an existing file is refused with a SparseflashError before anything is written).
    Temporaries left by an earlier writer that was killed (its pid no longer runs) are removed first.
    An OSError without a path (ENOSPC while writing) is raised again naming ``out_dir``.
    """
    out_dir = Path(out_dir)
    output_dir(out_dir)
    sweep_stale_temps(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    moved_old = False
    try:
        tmp.mkdir(parents=True)
        result = fill(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
            moved_old = True
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous artefact back
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from None
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    return result
