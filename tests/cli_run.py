"""Run the command line in-process under a deadline, so that a hang fails the test instead of
blocking the suite, and check the one-line error contract (exit 2, one line on stderr)."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys

from sparseflash.tools.cli import main


class Hung(BaseException):
    """The command did not finish in time (not an OSError, so the CLI cannot turn it into exit 2)."""


def run_cli(*args, timeout: float = 60.0) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sparseflash ARGS``; raises Hung after ``timeout`` seconds
    (SIGALRM interrupts even a blocking open() of a FIFO)."""
    argv = [str(a) for a in args]

    def alarm(signum, frame):
        raise Hung(f"`sparseflash {' '.join(argv)}` did not finish in {timeout} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The stderr lines a person sees, less notes (``sparseflash: note: ...``): of each line the text after
    its last carriage return (a progress bar redraws, and blanks, itself with ``\r``), blanks dropped."""
    seen = (line.split("\r")[-1] for line in err.split("\n"))
    return [line for line in seen if line.strip() and not line.startswith("sparseflash: note:")]


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one error line on stderr, holding every needle; returns the line."""
    lines = error_lines(err)
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_subprocess(*args, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m sparseflash.tools.cli ARGS`` with a deadline (a hang raises TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
