"""Split a text file in two, for a held-out / evaluation pair that share no text (docs/fetchless.md):

    python bench/split_text.py ../shared/corpus/pydocs-eval.txt.zst --halves OUT_DIR
    python bench/split_text.py ../shared/corpus/pydocs-eval.txt.zst --interleave 40 OUT_DIR

``--halves``: the first half of the lines is ``heldout.txt.zst``, the second ``eval.txt.zst`` (the two
halves of a file may differ in kind). ``--interleave B``: alternate blocks of B lines go to each, so
both are drawn from the whole file. Lines are never cut.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zstandard  # noqa: E402

from sparseflash.model.text import read_text  # noqa: E402


def split_lines(text: str, interleave: int | None) -> tuple[str, str]:
    """(held-out, evaluation) text: halves of the lines, or alternate blocks of ``interleave`` lines."""
    lines = text.splitlines(keepends=True)
    if interleave is None:
        half = len(lines) // 2
        return "".join(lines[:half]), "".join(lines[half:])
    blocks = ["".join(lines[i : i + interleave]) for i in range(0, len(lines), interleave)]
    return "".join(blocks[0::2]), "".join(blocks[1::2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--halves", action="store_true")
    how.add_argument("--interleave", type=int, metavar="B")
    p.add_argument("out_dir")
    args = p.parse_args()
    if args.interleave is not None and args.interleave < 1:
        raise SystemExit("split_text: --interleave needs a block of at least 1 line")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("heldout.txt.zst", "eval.txt.zst"), split_lines(read_text(args.text), args.interleave)):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(zstandard.ZstdCompressor().compress(part.encode()))
        os.replace(tmp, out / name)
        print(f"{out / name}: {len(part)} characters")


if __name__ == "__main__":
    main()
