"""The ``sparseflash`` command line: parse arguments, call one library function, print.

Each command module registers its subcommands; the modules import the library lazily so that
``sparseflash --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from sparseflash.errors import SparseflashError
from sparseflash.layout.format import LayoutError
from sparseflash.tools import (
    cmd_gguf,
    cmd_layout,
    cmd_model,
    cmd_plugins,
    cmd_predictors,
    cmd_profile,
    cmd_stream,
    cmd_trend,
)

COMMAND_MODULES = [cmd_model, cmd_profile, cmd_gguf, cmd_predictors, cmd_layout, cmd_stream, cmd_trend, cmd_plugins]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseflash", description="Stream only the active FFN neurons of sparse LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SparseflashError, LayoutError) as e:
        print(f"sparseflash: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparseflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
