"""Campaign cases on the environment: CLI misuse, atomicity (signals, stale temporaries, output paths),
I/O faults (FIFOs, devices, directories, EACCES, EIO, ENOSPC, EROFS), live overwrite and reporting.

Mounts (a full tmpfs, a read-only tmpfs) need root; ``Mounts`` makes them and removes them at exit.
EACCES applies to root once CAP_DAC_OVERRIDE is dropped (setpriv). EIO comes from an os.preadv
patched before the package is imported (no LD_PRELOAD).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from campaign_cases import DENSE, PROMPT, STREAM, Case, _writer
from campaign_files import SMALL_PREDICTORS, SMALL_PROFILE, Fixtures, regions


def cli_misuse(f: Fixtures, scratch: Path) -> list[Case]:
    lay = ["-m", str(f.layout)]
    prof = ["profile", "-m", str(f.ckpt), "--corpus", str(f.corpus), *SMALL_PROFILE, "-o", str(scratch / "p")]
    pred = ["predictors", "-m", str(f.ckpt), "--profile", str(f.profile), "--corpus", str(f.corpus),
            *SMALL_PREDICTORS, "-o", str(scratch / "q")]
    layout = ["layout", "-m", str(f.ckpt), "--profile", str(f.profile), "-o", str(scratch / "l.sflash")]
    ppl = ["eval-ppl", "-m", str(f.ckpt), "--text", str(f.heldout), "--tokens", "512"]
    series = ["sparsity-trend", "-m", *[str(f.ckpt)] * 3, "--corpus", str(f.corpus), "--tokens", "1024",
              "--ppl-tokens", "512", "-o", str(scratch / "trend")]
    trend = [*series, "--tokens-trained", "1", "2", "3"]
    cases = {
        "run --top-p 0": ["run", "--top-p", "0"], "run --top-p 1.5": ["run", "--top-p", "1.5"],
        "run --top-p nan": ["run", "--top-p", "nan"], "run --temp nan": ["run", "--temp", "nan"],
        "run --temp -1": ["run", "--temp", "-1"], "run --temp inf": ["run", "--temp", "inf"],
        "run -n abc": ["run", "-n", "abc"], "run -n -1": ["run", "-n", "-1"], "run --seed abc": ["run", "--seed", "x"],
        "run --budget -5%": ["run", *lay, "--budget", "-5%"], "run --budget abc": ["run", *lay, "--budget", "abc"],
        "run --budget 0": ["run", *lay, "--budget", "0"], "run --budget 0%ffn": ["run", *lay, "--budget", "0%ffn"],
        "run --window -1": ["run", *lay, "--budget", "50%ffn", "--window", "-1"],
        "run --io-threads 0": ["run", *lay, "--budget", "50%ffn", "--io-threads", "0"],
        "run --eviction bogus": ["run", "--eviction", "bogus"], "run -n (no value)": ["run", "-n"],
        "run --bogus": ["run", "--bogus"], "no command": [], "unknown command": ["bogus"],
        "profile --ctx 0": [*prof, "--ctx", "0"], "profile --tokens 0": [*prof, "--tokens", "0"],
        "profile --tokens -5": [*prof, "--tokens", "-5"], "profile --cett 2": [*prof, "--cett", "2"],
        "profile --ppl-steps -1": [*prof, "--ppl-steps", "-1"], "profile without --corpus": ["profile", "-o", "x"],
        "layout --zstd 99": [*layout, "--zstd", "99"], "layout --zstd -1000": [*layout, "--zstd", "-1000"],
        "layout --hot-fraction 2": [*layout, "--hot-fraction", "2"], "layout --order bogus": [*layout, "--order", "x"],
        "eval-ppl --ctx 0": [*ppl, "--ctx", "0"], "eval-ppl --tokens -1": [*ppl, "--tokens", "-1"],
        "eval-ppl --ctx abc": [*ppl, "--ctx", "abc"],
        "predictors --epochs 0": [*pred, "--epochs", "0"], "predictors --rank abc": [*pred, "--rank", "abc"],
        "predictors --size-share 0": [*pred, "--size-share", "0"],
        "predictors --target-recall 2": [*pred, "--target-recall", "2"],
        "io-report --tokens 0": ["io-report", *lay, "--corpus", str(f.heldout), "--tokens", "0"],
        "io-report --ctx 0": ["io-report", *lay, "--corpus", str(f.heldout), "--ctx", "0"],
        "io-report --budget abc": ["io-report", *lay, "--corpus", str(f.heldout), "--budget", "abc"],
        "layout-report --tokens 0": ["layout-report", str(f.layout), "--corpus", str(f.heldout), "--tokens", "0"],
        "export-gguf --dtype q4": ["export-gguf", "-m", str(f.ckpt), "-o", str(scratch / "x.gguf"), "--dtype", "q4"],
        "run --compress 0": ["run", "-n", "1", "--compress", "0"],
        "plugins train --lr nan": ["plugins", "train", "--corpus", str(f.corpus), "--ratio", "4", "--lr", "nan", "-o",
                                   str(scratch / "x.plugin.safetensors")],
        "plugins train -o a directory": ["plugins", "train", "--corpus", str(f.corpus), "--ratio", "4", "-o",
                                         str(scratch)],
        "sparsity-trend --p nan": [*trend, "--p", "nan"], "sparsity-trend --ctx 1": [*trend, "--ctx", "1"],
        "sparsity-trend --ppl-steps -1": [*trend, "--ppl-steps", "-1"],
        "sparsity-trend --ppl-tokens 0": [*trend, "--ppl-tokens", "0"],
        "sparsity-trend --tokens-trained -5 2 3": [*series, "--tokens-trained", "-5", "2", "3"],
        "sparsity-trend --tokens-trained 1 2": [*series, "--tokens-trained", "1", "2"],
        "sparsity-trend --form bogus": [*trend, "--form", "bogus"],
        "sparsity-trend -o onto a file": [*trend, "-o", str(f.layout)],
        "sparsity-trend --corpus a directory": [*trend, "--corpus", str(scratch)],
    }
    return [Case("cli misuse", name, args, "error") for name, args in cases.items()]


def _leftovers(folder: Path) -> Callable:
    def check():
        left = [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name]
        return f"leftover temporary {left[0]}" if left else None
    return check


def _appears(folder: Path) -> Callable[[], bool]:
    return lambda: any(".tmp" in p.name for p in folder.iterdir()) if folder.exists() else False


def _fresh(folder: Path) -> Callable[[], None]:
    def setup():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    return setup


def atomicity(f: Fixtures, scratch: Path) -> list[Case]:
    writers = {
        "layout": lambda o: ["layout", "-m", str(f.ckpt), "--profile", str(f.profile), "--predictors",
                             str(f.predictors), "-o", str(o / "x.sflash"), "--json"],
        "export-gguf": lambda o: ["export-gguf", "-m", str(f.ckpt), "-o", str(o / "x.gguf"), "--json"],
        "profile": lambda o: ["profile", "-m", str(f.ckpt), "--corpus", str(f.corpus), *SMALL_PROFILE, "-o",
                              str(o / "x"), "--json"],
        "predictors": lambda o: ["predictors", "-m", str(f.ckpt), "--profile", str(f.profile), "--corpus",
                                 str(f.corpus), *SMALL_PREDICTORS, "-o", str(o / "x"), "--json"],
    }
    stale = {"layout": ".x.sflash.tmp-999999", "export-gguf": ".x.gguf.999999.tmp", "profile": ".x.tmp-999999",
             "predictors": ".x.tmp-999999"}
    out = []
    for name, argv in writers.items():
        for sig, signame in ((15, "SIGTERM"), (2, "SIGINT")):
            o = scratch / f"sig-{name}-{signame}"
            out.append(Case("atomicity", f"{signame} during {name}", argv(o), "signal", _fresh(o), _leftovers(o),
                            signal_when=_appears(o), signal=sig))
        o = scratch / f"stale-{name}"

        def plant(o=o, name=name):
            _fresh(o)()
            (o / stale[name]).mkdir() if name in ("profile", "predictors") else (o / stale[name]).write_bytes(b"x")
        out.append(Case("atomicity", f"stale temporary of a dead {name} writer", argv(o), "ok", plant, _leftovers(o)))
    keep = scratch / "keep"

    def existing_file():
        _fresh(keep)()
        (keep / "x").write_text("precious")
        (keep / "x.sflash").mkdir()
        (keep / "x.gguf").mkdir()

    def intact():
        if not ((keep / "x").is_file() and (keep / "x").read_text() == "precious"):
            return "the user's file was replaced"
        return None if (keep / "x.sflash").is_dir() and (keep / "x.gguf").is_dir() else "a directory was replaced"
    for name in writers:
        out.append(Case("atomicity", f"{name} -o onto an existing {'directory' if name in ('layout', 'export-gguf') else 'file'}",
                        writers[name](keep), "error", existing_file, intact))
    missing = scratch / "no" / "such"
    for name in ("layout", "export-gguf"):
        out.append(Case("atomicity", f"{name} -o in a missing folder", writers[name](missing), "error"))
    for name in ("profile", "predictors"):
        out.append(Case("atomicity", f"{name} -o in a missing folder", writers[name](missing), "clean"))
    stream = [*STREAM, "-m", str(f.layout)]
    out.append(Case("atomicity", "run --stats onto a directory", [*stream, "--stats", str(keep / "x.sflash")], "error",
                    existing_file, intact))
    no_stats = scratch / "no-stats" / "such"  # not `missing`: profile and predictors above made that one
    out.append(Case("atomicity", "run --stats in a missing folder", [*stream, "--stats", str(no_stats / "s.json")],
                    "error", lambda: shutil.rmtree(no_stats.parent, ignore_errors=True)))
    out.append(Case("atomicity", "io-report -o onto an existing file",
                    ["io-report", "-m", str(f.layout), "--corpus", str(f.heldout), "--tokens", "256", "--ctx", "64",
                     "--no-eviction", "-o", str(keep / "x"), "--json"], "error", existing_file, intact))
    return out


class Mounts:
    """tmpfs mounts for ENOSPC and EROFS cases (root only); ``close`` unmounts them."""

    def __init__(self, scratch: Path):
        self.points: list[Path] = []
        self.scratch = scratch
        self.ok = os.geteuid() == 0

    def tmpfs(self, name: str, size: str) -> Path:
        point = self.scratch / name
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        self.points.append(point)
        return point

    def readonly(self, point: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)

    def close(self) -> None:
        for p in reversed(self.points):
            subprocess.run(["umount", "-l", str(p)], check=False)


EIO_CODE = """
import errno, os, sys
limit, start, real, calls = int(os.environ["EIO_AFTER"]), int(os.environ.get("EIO_FROM", 0)), os.preadv, [0]
def preadv(fd, buffers, offset, *a):
    calls[0] += offset >= start  # EIO_FROM: count only reads from there on (the FFN regions)
    if calls[0] > limit:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return real(fd, buffers, offset, *a)
os.preadv = preadv
from sparseflash.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def io_faults(f: Fixtures, scratch: Path, mounts: Mounts) -> list[Case]:
    out = []
    fifo_dir = scratch / "fifo"

    def fifos():
        _fresh(fifo_dir)()
        for name in ("x.sflash", "x.txt", "x.json", "tok.json", "x.gguf"):
            os.mkfifo(fifo_dir / name)
        (fifo_dir / "zero.sflash").symlink_to("/dev/zero")
        (fifo_dir / "dir.sflash").mkdir()
    x, txt, js = (str(fifo_dir / n) for n in ("x.sflash", "x.txt", "x.json"))
    lay, heldout = str(f.layout), str(f.heldout)
    cases = {
        "run on a FIFO layout": [*STREAM, "-m", x], "inspect a FIFO": ["inspect", x],
        "io-report on a FIFO layout": ["io-report", "-m", x, "--corpus", heldout],
        "layout-report on a FIFO layout": ["layout-report", x, "--corpus", heldout],
        "eval-ppl on a FIFO text": ["eval-ppl", "--text", txt], "profile on a FIFO corpus": ["profile", "--corpus", txt,
                                                                                            "-o", str(scratch / "pf")],
        "io-report on a FIFO corpus": ["io-report", "-m", lay, "--corpus", txt],
        "layout-report with a FIFO device model": ["layout-report", lay, "--corpus", heldout, "--tokens", "256",
                                                   "--device-model", js],
        "run with a FIFO tokenizer": [*DENSE, "--tokenizer", str(fifo_dir / "tok.json")],
        "info on a FIFO GGUF": ["info", "-m", str(fifo_dir / "x.gguf")],
        "run on /dev/zero as a layout": [*STREAM, "-m", str(fifo_dir / "zero.sflash")],
        "inspect /dev/zero": ["inspect", str(fifo_dir / "zero.sflash")],
        "run on a directory as a layout": [*STREAM, "-m", str(fifo_dir / "dir.sflash")],
        "inspect a directory": ["inspect", str(fifo_dir / "dir.sflash")],
        "eval-ppl on a directory as text": ["eval-ppl", "--text", str(fifo_dir)],
        "sparsity-trend on a FIFO corpus": ["sparsity-trend", "-m", *[str(f.ckpt)] * 3, "--tokens-trained", "1", "2",
                                            "3", "--corpus", txt, "-o", str(scratch / "tf")],
        "sparsity-trend with a FIFO held-out text": ["sparsity-trend", "-m", *[str(f.ckpt)] * 3, "--tokens-trained",
                                                     "1", "2", "3", "--corpus", heldout, "--ppl-text", txt,
                                                     "-o", str(scratch / "tf")],
    }
    for name, args in cases.items():
        out.append(Case("i/o faults", name, args, "error", fifos, timeout=30))
    garbage = scratch / "garbage-device.json"
    out.append(Case("i/o faults", "layout-report with a garbage device model",
                    ["layout-report", lay, "--corpus", heldout, "--tokens", "256", "--device-model", str(garbage)],
                    "error", _writer(garbage, lambda: b"\x00garbage")))
    out.append(Case("i/o faults", "layout-report with a missing device model",
                    ["layout-report", lay, "--corpus", heldout, "--tokens", "256", "--device-model",
                     str(scratch / "none.json")], "error"))
    out += _eacces(f, scratch) + _eio(f, scratch)
    if mounts.ok:
        out += _full_and_readonly(f, scratch, mounts)
    return out


def _eacces(f: Fixtures, scratch: Path) -> list[Case]:
    d = scratch / "eacces"

    def setup():
        _fresh(d)()
        shutil.copy(f.layout, d / "x.sflash")
        shutil.copy(f.heldout, d / "t.txt.zst")
        shutil.copytree(f.ckpt, d / "ckpt")
        for p in (d / "x.sflash", d / "t.txt.zst", d / "ckpt" / "model.safetensors"):
            p.chmod(0)
        (d / "ro").mkdir()
        (d / "ro").chmod(0o555)
    x = str(d / "x.sflash")
    cases = {"run on an unreadable layout": [*STREAM, "-m", x], "inspect an unreadable layout": ["inspect", x],
             "eval-ppl on an unreadable text": ["eval-ppl", "--text", str(d / "t.txt.zst")],
             "run on a checkpoint with unreadable weights": [*DENSE, "-m", str(d / "ckpt")],
             "export-gguf into a read-only folder": ["export-gguf", "-m", str(f.ckpt), "-o", str(d / "ro" / "x.gguf")],
             "layout into a read-only folder": ["layout", "-m", str(f.ckpt), "--profile", str(f.profile), "-o",
                                                str(d / "ro" / "x.sflash")],
             "profile into a read-only folder": ["profile", "-m", str(f.ckpt), "--corpus", str(f.corpus), *SMALL_PROFILE,
                                                 "-o", str(d / "ro" / "p")],
             "run --stats into a read-only folder": [*STREAM, "-m", str(f.layout), "--stats", str(d / "ro" / "s.json")]}
    return [Case("i/o faults", f"EACCES: {n}", a, "error", setup, unprivileged=True) for n, a in cases.items()]


def _eio(f: Fixtures, scratch: Path) -> list[Case]:
    out = []
    ffn = min(a for a, _, _ in regions(f.layout.read_bytes())["bundle:hot"])
    # the disk model is measured (and cached) by an earlier case, so every read counted here is the run's
    for after, start, args, what in ((0, 0, [*STREAM, "-m", str(f.layout)], "run, first read"),
                                     (3, 0, [*STREAM, "-m", str(f.layout)], "run, reading the index"),
                                     (40, 0, [*STREAM, "-m", str(f.layout)], "run, loading tensors"),
                                     (20, ffn, [*STREAM, "--strategy", "all", "-m", str(f.layout)],
                                      "run, streaming bundles"),
                                     (5, 0, ["inspect", str(f.layout), "--verify"], "inspect --verify"),
                                     (30, 0, ["inspect", str(f.layout), "--verify"], "inspect --verify, later read")):
        out.append(Case("i/o faults", f"EIO: {what} (after {after} reads)", args, "error", python=EIO_CODE,
                        env={"EIO_AFTER": str(after), "EIO_FROM": str(start)}))
    return out


def _full_and_readonly(f: Fixtures, scratch: Path, mounts: Mounts) -> list[Case]:
    full = mounts.tmpfs("full", "16m")
    shutil.copy(f.layout, full / "model.sflash")  # 12 MB: a model store with little room left
    subprocess.run(["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=64k", "count=64"], capture_output=True)
    ro = mounts.tmpfs("ro", "16m")
    shutil.copy(f.layout, ro / "model.sflash")
    mounts.readonly(ro)
    probe_cache = scratch / "fresh-cache"
    fresh = lambda: shutil.rmtree(probe_cache, ignore_errors=True)  # noqa: E731
    ref = [*STREAM, "-m", str(f.layout)]
    out = [
        Case("i/o faults", "ENOSPC: layout into a full file system",
             ["layout", "-m", str(f.ckpt), "--profile", str(f.profile), "-o", str(full / "x.sflash")], "error",
             check=_leftovers(full)),
        Case("i/o faults", "ENOSPC: export-gguf into a full file system",
             ["export-gguf", "-m", str(f.ckpt), "-o", str(full / "x.gguf")], "error", check=_leftovers(full)),
        Case("i/o faults", "ENOSPC: profile into a full file system",
             ["profile", "-m", str(f.ckpt), "--corpus", str(f.corpus), *SMALL_PROFILE, "-o", str(full / "p")],
             "error", check=_leftovers(full)),
        Case("i/o faults", "first run of a layout on a nearly full file system (disk probe)",
             [*STREAM, "-m", str(full / "model.sflash")], "same", fresh, ref=ref,
             env={"SPARSEFLASH_CACHE": str(probe_cache)}),
        Case("i/o faults", "first run of a layout on a read-only file system (disk probe)",
             [*STREAM, "-m", str(ro / "model.sflash")], "same", fresh, ref=ref,
             env={"SPARSEFLASH_CACHE": str(probe_cache)}),
        Case("i/o faults", "run with the layout and the cache on a read-only file system",
             [*STREAM, "-m", str(ro / "model.sflash")], "same", ref=ref, env={"SPARSEFLASH_CACHE": str(ro / "cache")}),
        Case("i/o faults", "EROFS: layout into a read-only file system",
             ["layout", "-m", str(f.ckpt), "--profile", str(f.profile), "-o", str(ro / "x.sflash")], "error"),
        Case("i/o faults", "EROFS: run --stats into a read-only file system",
             [*STREAM, "-m", str(f.layout), "--stats", str(ro / "s.json")], "error"),
        Case("i/o faults", "inspect --verify on a read-only file system", ["inspect", str(ro / "model.sflash"),
                                                                           "--verify"], "ok"),
    ]
    return out


LIVE_CODE = """
import os, sys
import numpy as np
import sparseflash.runtime.session as session
mode, real = os.environ["LIVE_MODE"], session.open_streamed
def patched(path, *a, **k):
    model = real(path, *a, **k)
    fd = os.open(path, os.O_RDWR)
    for start, end in eval(os.environ["LIVE_RANGES"]):
        data = bytearray(os.pread(fd, end - start, start))
        if mode == "flip":
            view = np.frombuffer(data, np.uint8)
            view[1::14] ^= 0x40  # the exponent of every 7th f16 value
        elif mode == "zero":
            data = bytearray(len(data))
        os.pwrite(fd, bytes(data), start)
    os.fsync(fd)
    os.close(fd)
    return model
session.open_streamed = patched
from sparseflash.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def live_overwrite(f: Fixtures, scratch: Path) -> list[Case]:
    blob = f.layout.read_bytes()
    r = regions(blob)
    cold = [(a, b) for a, b, _ in r["bundle:cold"]]
    hot = [(a, b) for a, b, _ in r["bundle:hot"]]
    ref = [*STREAM, "--strategy", "all", "-m", str(f.layout)]
    out = []
    for name, mode, ranges in (("cold bundles flipped after open", "flip", cold),
                               ("layer 3's cold bundles zeroed after open", "zero", cold[3:4]),
                               ("cold bundles rewritten with the same bytes", "same", cold),
                               ("hot bundles flipped after they were loaded", "flip", hot)):
        path = scratch / f"live-{mode}-{len(ranges)}.sflash"
        out.append(Case("live overwrite", name, [*STREAM, "--strategy", "all", "-m", str(path)], "same",
                        _writer(path, lambda: blob), ref=ref, python=LIVE_CODE,
                        env={"LIVE_MODE": mode, "LIVE_RANGES": repr(ranges)}))
    return out


def reporting(f: Fixtures, scratch: Path) -> list[Case]:
    """peak_rss_bytes of run --json against /usr/bin/time's maximum resident set size."""
    return [Case("reporting", f"peak_rss_bytes vs /usr/bin/time: {what}", args, "rss")
            for what, args in (("dense run", [*DENSE, "-n", "16"]),
                               ("streamed run", [*STREAM, "-m", str(f.layout)]))]


__all__ = ["Mounts", "atomicity", "cli_misuse", "io_faults", "live_overwrite", "reporting", "PROMPT"]
