"""Reliability campaign: corrupted, lying and misused inputs against the command line, as subprocesses
with timeouts; prints cases, passes and failures by kind per category.

A case passes when the program does what a correct program does with that input (see
bench/campaign_cases.py): exit 0 with the clean file's tokens, or exit 2 with one line on stderr, and
no side effect (temporaries left, a user's file replaced). A failure is one of: silent wrong answer
(exit 0, different tokens), accepted bad input (exit 0 where only an error is right), traceback, hang,
not one line (exit 2 with more lines, e.g. argparse's usage), other exit code, or a side effect.

    python bench/campaign.py --work /tmp/campaign                  # every category (about 30 min, 2 cores)
    python bench/campaign.py --only "bit flips,lying index"        # some categories
    PYTHONPATH=/path/to/other/tree python bench/campaign.py ...     # another tree of the package
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign_cases import Case, bit_flips, checkpoints, lying_header, lying_index, truncation  # noqa: E402
from campaign_env import Mounts, atomicity, cli_misuse, io_faults, live_overwrite, reporting  # noqa: E402
from campaign_files import build_fixtures  # noqa: E402

CATEGORIES = ("truncation", "bit flips", "lying header", "lying index", "checkpoint/gguf", "cli misuse", "atomicity",
              "i/o faults", "live overwrite", "reporting")
UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _default_signals() -> None:
    """A campaign started in the background ignores SIGINT, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_case(case: Case, env: dict) -> tuple[int | None, str, str, bool, float]:
    """(exit code or None on a hang, stdout, stderr, signalled, seconds)."""
    if case.setup is not None:
        case.setup()
    cmd = [sys.executable, "-c", case.python, *case.args] if case.python else \
        [sys.executable, "-m", "sparseflash.tools.cli", *case.args]
    if case.expect == "rss":
        cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd]
    if case.unprivileged:
        cmd = UNPRIVILEGED + cmd
    t = time.perf_counter()
    # bytes, decoded below: text=True would turn a progress bar's carriage returns into line ends
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, **case.env}, start_new_session=True, preexec_fn=_default_signals)
    signalled = False
    if case.signal_when is not None:
        deadline = time.perf_counter() + case.timeout
        while proc.poll() is None and time.perf_counter() < deadline:
            if case.signal_when():
                proc.send_signal(case.signal)
                signalled = True
                break
            time.sleep(0.002)
    try:
        out, err = proc.communicate(timeout=max(1.0, case.timeout - (time.perf_counter() - t)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, _text(out), _text(err), signalled, time.perf_counter() - t
    return proc.returncode, _text(out), _text(err), signalled, time.perf_counter() - t


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def tokens_of(stdout: str) -> list[int] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)["tokens"]
        except (ValueError, KeyError, TypeError):
            continue
    return None


def error_lines(stderr: str) -> list[str]:
    """What a person sees on stderr, less notices (``sparseflash: note: ...``): of each line, the text
    after its last carriage return (a progress bar redraws itself with ``\r`` and, when it closes,
    blanks itself the same way), and only lines that are not blank."""
    seen = (line.split("\r")[-1] for line in stderr.split("\n"))
    return [line for line in seen if line.strip() and not line.startswith("sparseflash: note:")]


def classify(case: Case, rc, out: str, err: str, signalled: bool, ref_tokens) -> str | None:
    """None when the case passed, else the kind of failure."""
    if rc is None:
        return "hang"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    lines = error_lines(err)
    if case.expect == "rss":
        kb = [int(line.split()[1]) for line in err.splitlines() if line.startswith("MAXRSS_KB")]
        reported = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"] if rc == 0 else None
        if not kb or reported is None:
            return f"exit {rc}"
        gap = kb[0] * 1024 - reported
        return None if abs(gap) <= 0.05 * kb[0] * 1024 else f"peak_rss_bytes off by {gap / 2**20:+.0f} MiB"
    if case.expect == "signal":
        if rc == 0 or (signalled and rc != 1):
            return None
        return f"exit {rc}"
    if rc == 0:
        if case.expect == "error":
            return "accepted bad input (exit 0)"
        if case.expect == "same":
            tokens = tokens_of(out)
            if tokens is None:
                return "exit 0 without tokens"
            if tokens != ref_tokens:
                return "silent wrong answer"
        return None
    if rc == 2:
        if case.expect == "ok":
            return "refused valid input"
        if len(lines) != 1 or not lines[0].startswith("sparseflash: error:"):
            return "not one line"
        return None
    return f"exit {rc}"


def cases_for(categories, f, scratch: Path, mounts: Mounts, flips: int) -> list[Case]:
    makers = {"truncation": lambda: truncation(f, scratch), "bit flips": lambda: bit_flips(f, scratch, flips),
              "lying header": lambda: lying_header(f, scratch), "lying index": lambda: lying_index(f, scratch),
              "checkpoint/gguf": lambda: checkpoints(f, scratch), "cli misuse": lambda: cli_misuse(f, scratch),
              "atomicity": lambda: atomicity(f, scratch), "i/o faults": lambda: io_faults(f, scratch, mounts),
              "live overwrite": lambda: live_overwrite(f, scratch), "reporting": lambda: reporting(f, scratch)}
    return [c for name in categories for c in makers[name]()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated categories")
    ap.add_argument("--flips", type=int, default=4, help="bit flips per region")
    ap.add_argument("--json", default=None, help="save every case's outcome here")
    ap.add_argument("--label", default="", help="a name for this tree in the output")
    args = ap.parse_args(argv)
    import sparseflash

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: the mounts are removed
    categories = [c.strip() for c in args.only.split(",")] if args.only else list(CATEGORIES)
    work = Path(args.work or tempfile.mkdtemp(prefix="sparseflash-campaign-"))
    print(f"package: {Path(sparseflash.__file__).parent}  work: {work}", file=sys.stderr)
    f = build_fixtures(work / "fixtures", log=lambda m: print(m, file=sys.stderr))
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "SPARSEFLASH_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    mounts = Mounts(scratch)
    refs: dict[tuple, list[int] | None] = {}
    rows = []
    try:
        cases = cases_for(categories, f, scratch, mounts, args.flips)
        print(f"{len(cases)} cases", file=sys.stderr)
        for i, case in enumerate(cases):
            ref = None
            if case.expect == "same":
                key = tuple(case.ref)
                if key not in refs:
                    r = subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", *case.ref], capture_output=True,
                                       text=True, env=env, timeout=600)
                    refs[key] = tokens_of(r.stdout)
                    assert refs[key] is not None, f"clean run failed: {r.stderr[-2000:]}"
                ref = refs[key]
            rc, out, err, signalled, secs = run_case(case, env)
            failure = classify(case, rc, out, err, signalled, ref)
            check = case.check() if case.check is not None and failure != "hang" else None
            failure = failure or check
            last = (error_lines(err) or [""])[-1][:200]
            rows.append({"category": case.category, "case": case.name, "exit": rc, "failure": failure,
                         "stderr_lines": len(error_lines(err)), "last_line": last, "seconds": round(secs, 1)})
            mark = "ok  " if failure is None else "FAIL"
            print(f"[{i + 1}/{len(cases)}] {mark} {case.category}: {case.name} (exit {rc}, {secs:.1f} s)"
                  + (f" -- {failure}: {last}" if failure else ""), file=sys.stderr, flush=True)
    finally:
        mounts.close()
    print(table(rows, args.label))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: list[dict], label: str = "") -> str:
    """The campaign table in markdown: per category, cases, passed and failures by kind."""
    lines = [f"| category{f' ({label})' if label else ''} | cases | passed | failed: kind (count) |", "|---|---|---|---|"]
    for cat in dict.fromkeys(r["category"] for r in rows):
        mine = [r for r in rows if r["category"] == cat]
        kinds: dict[str, int] = {}
        for r in mine:
            if r["failure"]:
                kinds[r["failure"]] = kinds.get(r["failure"], 0) + 1
        failed = ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {cat} | {len(mine)} | {sum(r['failure'] is None for r in mine)} | {failed} |")
    passed = sum(r["failure"] is None for r in rows)
    lines.append(f"| **total** | {len(rows)} | {passed} | {len(rows) - passed} failed |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
