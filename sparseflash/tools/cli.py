"""The ``sparseflash`` command line: parse arguments, call one library function, print.

Each command module registers its subcommands; the modules import the library lazily so that
``sparseflash --help`` stays fast. Every way a command can fail on bad input ends here as one line
on stderr and exit code 2: argument errors, SparseflashError/LayoutError, and OSError (with the
path and the errno text). SIGTERM, like SIGINT, unwinds the command so that writers remove their
temporaries, and exits 128 + the signal number.
"""

from __future__ import annotations

import argparse
import re
import signal
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


class ArgumentError(SparseflashError):
    """A command-line argument that does not parse: one line naming it and what it accepts."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ArgumentError (one line, with a pointer to --help) instead of printing
    its usage block and exiting."""

    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: {message} (see `{self.prog} --help`)")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT: unwinds the command like Ctrl-C so that `except BaseException` cleanups run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sparseflash", description="Stream only the active FFN neurons of sparse LLMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


_DASH_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # what argparse itself takes as a value (nargs="+" too)


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--budget -5%`` -> ``--budget=-5%``: argparse takes a value that starts with a dash for an
    option unless it is a plain negative number, and would report a missing value instead of the
    value's own error. Options never start with a dash and a digit, so nothing else changes; a plain
    negative number is left to argparse, which takes it (also as one of several values)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("-") and "=" not in out[-1] and _DASH_VALUE.match(arg) and \
                not _NEGATIVE_NUMBER.fullmatch(arg) and not _DASH_VALUE.match(out[-1]):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _on_signal(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    argv = _attach_dash_values(list(sys.argv[1:] if argv is None else argv))
    # a signal the caller ignores (SIGINT of a background job) stays ignored
    previous = {s: h for s in (signal.SIGTERM, signal.SIGINT) if (h := signal.getsignal(s)) != signal.SIG_IGN}
    try:
        for s in previous:
            signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (SparseflashError, LayoutError) as e:
        print(f"sparseflash: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from sparseflash.paths import os_error_line

        print(f"sparseflash: error: {os_error_line(e, _main_path(args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"sparseflash: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + int(signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main_path(args) -> str | None:
    """The path an OSError without one most likely concerns: the command's output, else its input."""
    for key in ("out", "output", "model", "file", "text", "corpus"):
        value = getattr(args, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value:
            return str(value)
    return None


if __name__ == "__main__":
    sys.exit(main())
