"""Writers leave the target whole or untouched: SIGTERM and SIGINT during layout, export-gguf, profile and
predictors remove the temporaries, a temporary of a killed writer is removed by the next write to the
same target, and an existing file is never replaced by a directory (nor a directory by a file)."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_run import assert_one_line_error, run_cli
from tiny_models import TINY_RELU2, make_hf_model, save_hf_model

from sparseflash.errors import SparseflashError
from sparseflash.layout.artefacts import write_dir_atomically
from sparseflash.paths import sweep_stale_temps

CORPUS = TINY_RELU2 / "calibration.txt.zst"
PROFILE = ("--tokens", "1024", "--ctx", "64", "--ppl-tokens", "256", "--cett-tokens", "512", "--ppl-steps", "1")
PREDICTORS = ("--tokens", "1024", "--val-tokens", "256", "--ctx", "64", "--epochs", "1")


def dead_pid() -> int:
    """The pid of a process that has exited (a writer killed with SIGKILL)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


# ---- write_dir_atomically and the sweep --------------------------------------------------------------

def test_an_existing_file_is_never_replaced_by_a_directory(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(SparseflashError, match="exists and is not a directory"):
        write_dir_atomically(target, lambda d: (d / "a").write_text("x"))
    assert target.read_text() == "precious" and temporaries(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_fill_leaves_the_old_directory_and_no_temporary(tmp_path, failure):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")

    def fill(d):
        (d / "half").write_text("x")
        raise failure
    with pytest.raises(type(failure)) as caught:
        write_dir_atomically(target, fill)
    if isinstance(failure, OSError):  # a write error without a path is raised again naming the target
        assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert (target / "old").read_text() == "old" and temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target, dead = tmp_path / "x.sflash", dead_pid()
    stale = [f".x.sflash.tmp-{dead}", f".x.sflash.{dead}.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / f".x.sflash.tmp-{dead}.d").write_bytes(b"not ours")  # another name: kept
    (tmp_path / ".x.sflash.tmp-1").write_bytes(b"pid 1 runs")  # a live writer: kept
    (tmp_path / f".other.tmp-{dead}").write_bytes(b"another target: kept")
    reports = []
    removed = sweep_stale_temps(target, reports.append)
    assert sorted(p.name for p in removed) == sorted(stale) and len(reports) == 2
    assert temporaries(tmp_path) == sorted([f".x.sflash.tmp-{dead}.d", ".x.sflash.tmp-1", f".other.tmp-{dead}"])


def test_a_writer_killed_between_its_renames_gets_its_old_directory_back(tmp_path):
    dead = dead_pid()
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    (old / "profile.json").write_text("{}")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    sweep_stale_temps(tmp_path / "out")
    assert (tmp_path / "out" / "profile.json").exists() and temporaries(tmp_path) == []


# ---- the writers under SIGTERM / SIGINT ------------------------------------------------------------

@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A tiny checkpoint with a profile and predictors (a few seconds)."""
    tmp = tmp_path_factory.mktemp("atomic")
    ckpt = save_hf_model(make_hf_model("nemotron-tied"), tmp / "ckpt")
    for argv in (("profile", "-m", ckpt, "--corpus", CORPUS, *PROFILE, "-o", tmp / "profile"),
                 ("predictors", "-m", ckpt, "--profile", tmp / "profile", "--corpus", CORPUS, *PREDICTORS,
                  "-o", tmp / "predictors")):
        code, _, err = run_cli(*argv, "--json", timeout=300)
        assert code == 0, err
    return ckpt, tmp / "profile", tmp / "predictors"


def _writers(ckpt, profile, predictors, out):
    return {
        "layout": ("layout", "-m", ckpt, "--profile", profile, "--predictors", predictors, "-o", out / "x.sflash"),
        "export-gguf": ("export-gguf", "-m", ckpt, "-o", out / "x.gguf"),
        "profile": ("profile", "-m", ckpt, "--corpus", CORPUS, *PROFILE, "-o", out / "x"),
        "predictors": ("predictors", "-m", ckpt, "--profile", profile, "--corpus", CORPUS, *PREDICTORS, "-o", out / "x"),
    }


def _signal_midway(monkeypatch, writer: str, signum: int) -> None:
    """Make the writer send ``signum`` to this process once its temporary exists, as `kill` would."""
    import gguf

    from sparseflash.layout import format_writer, predictor_training, profile_plots

    def kill_then(real):
        def wrapper(*a, **k):
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs between bytecodes of this frame
            return real(*a, **k)
        return wrapper
    target = {"layout": (format_writer._Sink, "pad_to"), "export-gguf": (gguf.GGUFWriter, "write_tensor_data"),
              "profile": (profile_plots, "write_plots"), "predictors": (predictor_training, "train_predictor")}[writer]
    monkeypatch.setattr(*target, kill_then(getattr(*target)))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("writer", ["layout", "export-gguf", "profile", "predictors"])
def test_a_signal_during_a_writer_removes_its_temporaries(writer, signum, artefacts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    argv = _writers(*artefacts, out)[writer]
    _signal_midway(monkeypatch, writer, signum)
    guard = signal.signal(signum, lambda *a: None)  # should the signal outlive the command, it must not end pytest
    try:
        code, _, err = run_cli(*argv, "--json", timeout=300)
    finally:
        signal.signal(signum, guard)
    assert code == 128 + signum and err.strip().splitlines()[-1] == f"sparseflash: interrupted ({signum.name})", err
    assert list(out.iterdir()) == []


def test_sigterm_from_outside_during_profile(artefacts, tmp_path):
    """The real thing: another process sends SIGTERM while `profile` works in its temporary folder."""
    ckpt = artefacts[0]
    proc = subprocess.Popen([sys.executable, "-m", "sparseflash.tools.cli", "profile", "-m", str(ckpt), "--corpus",
                             str(CORPUS), *PROFILE, "-o", str(tmp_path / "x"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not temporaries(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert temporaries(tmp_path), "the writer never made its temporary"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "sparseflash: interrupted (SIGTERM)", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["layout", "export-gguf", "profile", "predictors"])
def test_the_next_write_removes_a_killed_writers_temporary(writer, artefacts, tmp_path):
    dead = dead_pid()
    name = {"layout": f".x.sflash.tmp-{dead}", "export-gguf": f".x.gguf.{dead}.tmp"}.get(writer, f".x.tmp-{dead}")
    (tmp_path / name).mkdir() if writer in ("profile", "predictors") else (tmp_path / name).write_bytes(b"half")
    code, _, err = run_cli(*_writers(*artefacts, tmp_path)[writer], "--json", timeout=300)
    assert code == 0, err
    assert temporaries(tmp_path) == []
    if writer in ("layout", "export-gguf"):
        assert f"removed {tmp_path / name}, a temporary left by a writer (pid {dead}) that no longer runs" in err


@pytest.mark.parametrize("writer", ["profile", "predictors"])
def test_dash_o_onto_an_existing_file_keeps_the_file(writer, artefacts, tmp_path):
    (tmp_path / "x").write_text("precious")
    code, _, err = run_cli(*_writers(*artefacts, tmp_path)[writer])
    assert_one_line_error(code, err, "exists and is not a directory")
    assert (tmp_path / "x").read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["x"]
