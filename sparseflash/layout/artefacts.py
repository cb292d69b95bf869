"""Artefact directories (profile, predictors) are written whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def write_dir_atomically(out_dir: str | os.PathLike, fill: Callable[[Path], T]) -> T:
    """Run ``fill(tmp)`` on a fresh sibling temp directory, then swap it into ``out_dir``.

    On any failure (interrupts included) the temp directory is removed and ``out_dir`` is left as
    it was; an existing ``out_dir`` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
