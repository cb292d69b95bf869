"""Inputs that are not regular files are refused before they are opened (a FIFO would block forever),
every OSError is one line with the path and the errno text, outputs that cannot be written are refused
before the work starts, and the disk probe only reads the layout (falling back, and saying so).
Every command here runs under a deadline (cli_run.run_cli), so a hang fails the test."""

import errno
import os
import subprocess
import sys

import pytest
from cli_run import assert_one_line_error, run_cli
from layouts import tiny_layout
from tiny_models import BUNDLED_TOKENIZER, EVAL_CORPUS, TINY_RELU2

from sparseflash.runtime import diskprobe
from sparseflash.runtime.iomodel import DeviceModel

STREAM = ("run", "-n", "2", "--greedy", "--budget", "300%")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return tiny_layout(tmp_path_factory.mktemp("io"), "nemotron", dtype="f16")[1]


@pytest.fixture()
def odd(tmp_path):
    """A folder of things that are not regular files, under the names of the inputs they impersonate."""
    for name in ("x.sflash", "x.txt", "device.json", "tokenizer.json", "x.gguf", "x.plugin.safetensors"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "zero.sflash").symlink_to("/dev/zero")
    (tmp_path / "dir.sflash").mkdir()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "config.json")
    return tmp_path


NOT_REGULAR = {  # case: (argv with {d} for the odd folder, {l} for a good layout; what the line must say)
    "run on a FIFO layout": ((*STREAM, "-m", "{d}/x.sflash"), "is a FIFO, expected a layout file"),
    "inspect a FIFO": (("inspect", "{d}/x.sflash", "--verify"), "is a FIFO, expected a layout file"),
    "io-report on a FIFO layout": (("io-report", "-m", "{d}/x.sflash", "--corpus", EVAL_CORPUS), "is a FIFO"),
    "layout-report on a FIFO layout": (("layout-report", "{d}/x.sflash", "--corpus", EVAL_CORPUS), "is a FIFO"),
    "eval-ppl on a FIFO text": (("eval-ppl", "--text", "{d}/x.txt"), "is a FIFO, expected a text file"),
    "io-report on a FIFO corpus": (("io-report", "-m", "{l}", "--corpus", "{d}/x.txt"), "is a FIFO, expected a text"),
    "profile on a FIFO corpus": (("profile", "--corpus", "{d}/x.txt", "-o", "{d}/p"), "is a FIFO, expected a text"),
    "a FIFO device model": (("layout-report", "{l}", "--corpus", EVAL_CORPUS, "--device-model", "{d}/device.json"),
                            "is a FIFO, expected a device model"),
    "a FIFO tokenizer": (("run", "-n", "1", "--tokenizer", "{d}/tokenizer.json"), "is a FIFO, expected a tokenizer"),
    "info on a FIFO GGUF": (("info", "-m", "{d}/x.gguf"), "is a FIFO, expected a GGUF file"),
    "a checkpoint whose config.json is a FIFO": (("info", "-m", "{d}/ckpt"), "config.json: is a FIFO"),
    "run on /dev/zero": ((*STREAM, "-m", "{d}/zero.sflash"), "is a character device"),
    "inspect /dev/zero": (("inspect", "{d}/zero.sflash"), "is a character device"),
    "run on a directory": ((*STREAM, "-m", "{d}/dir.sflash"), "is a directory, expected a layout file"),
    "inspect a directory": (("inspect", "{d}/dir.sflash"), "is a directory"),
    "eval-ppl on a directory": (("eval-ppl", "--text", "{d}"), "is a directory, expected a text file"),
    "run with a FIFO plugin": (("run", "-n", "1", "--compress", "4", "--plugin", "{d}/x.plugin.safetensors"),
                               "is a FIFO, expected a plugin file"),
    "plugins info on a FIFO": (("plugins", "info", "{d}/x.plugin.safetensors"), "is a FIFO, expected a plugin file"),
}


@pytest.mark.parametrize("case", list(NOT_REGULAR))
def test_an_input_that_is_not_a_regular_file_is_refused_without_blocking(case, odd, layout):
    argv, needle = NOT_REGULAR[case]
    argv = [str(a).replace("{d}", str(odd)).replace("{l}", str(layout)) for a in argv]
    code, _, err = run_cli(*argv, timeout=60)
    assert_one_line_error(code, err, needle)


def test_config_json_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").mkdir()
    code, _, err = run_cli("info", "-m", tmp_path)
    assert_one_line_error(code, err, "config.json", "is a directory")


@pytest.mark.parametrize("content", [b"\x00garbage", b'{"latency_s": "fast"}', b'{"latency_s": 1e-4, '
                                     b'"bandwidth_bps": -1}', None])
def test_a_bad_device_model_is_one_line(content, tmp_path, layout):
    path = tmp_path / "device.json"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli("layout-report", layout, "--corpus", EVAL_CORPUS, "--tokens", "64", "--device-model", path)
    assert_one_line_error(code, err, str(path))


def _failing(real, path, err: int):
    def fake(p, *a, **k):
        if os.fspath(p) == os.fspath(path):
            raise OSError(err, os.strerror(err), os.fspath(p))
        return real(p, *a, **k)
    return fake


@pytest.mark.parametrize("err", [errno.EACCES, errno.EIO])
def test_an_os_error_opening_a_layout_is_one_line_with_the_path(err, layout, monkeypatch):
    monkeypatch.setattr(os, "open", _failing(os.open, layout, err))
    for argv in ((*STREAM, "-m", layout), ("inspect", layout, "--verify")):
        code, _, stderr = run_cli(*argv)
        assert_one_line_error(code, stderr, str(layout), os.strerror(err))


def test_an_io_error_while_verifying_is_one_line(layout, monkeypatch):
    real, calls = os.preadv, [0]

    def preadv(fd, buffers, offset, *a):
        calls[0] += 1
        if calls[0] > 5:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset, *a)
    monkeypatch.setattr(os, "preadv", preadv)
    code, _, err = run_cli("inspect", layout, "--verify")
    assert_one_line_error(code, err, str(layout), "Input/output error")


def test_an_io_error_while_streaming_is_one_line(layout, tmp_path):
    """The streamer's reader threads hit EIO in the middle of generation (a subprocess: os.preadv is
    patched before the package binds it). The disk is already measured, so every read is the run's."""
    (tmp_path / f"device-{os.stat(layout).st_dev}.json").write_text('{"latency_s": 1e-4, "bandwidth_bps": 2e9}')
    from sparseflash.layout.format import LayoutFile

    with LayoutFile.open(layout) as f:
        ffn_start = min(region.offset for region in f.layers)
    code = ("import errno, os, sys\nreal, calls = os.preadv, [0]\n"
            "def preadv(fd, b, off, *a):\n"
            f"    calls[0] += off >= {ffn_start}\n"  # bundle reads only
            "    if calls[0] > 4: raise OSError(errno.EIO, os.strerror(errno.EIO))\n    return real(fd, b, off, *a)\n"
            "os.preadv = preadv\nfrom sparseflash.tools.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *STREAM, "-n", "8", "--budget", "20%ffn", "--strategy", "all", "-m",
                        str(layout)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "SPARSEFLASH_CACHE": str(tmp_path)})
    assert_one_line_error(r.returncode, r.stderr, "Input/output error")


# ---- outputs -------------------------------------------------------------------------------------

def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, layout):
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dir.sflash").mkdir()
    (tmp_path / "dir.gguf").mkdir()
    cases = [
        (("layout", "--profile", tmp_path, "-o", tmp_path / "no" / "x.sflash"), "folder for the layout file does not exist"),
        (("layout", "--profile", tmp_path, "-o", tmp_path / "dir.sflash"), "is a directory, expected a layout file"),
        (("export-gguf", "-m", TINY_RELU2, "-o", tmp_path / "dir.gguf"), "is a directory, expected a GGUF file"),
        (("profile", "--corpus", EVAL_CORPUS, "-o", tmp_path / "file"), "exists and is not a directory"),
        (("predictors", "--profile", tmp_path, "--corpus", EVAL_CORPUS, "-o", tmp_path / "file"), "not a directory"),
        (("io-report", "-m", layout, "--corpus", EVAL_CORPUS, "-o", tmp_path / "file"), "exists and is not a directory"),
        ((*STREAM, "-m", layout, "--stats", tmp_path / "dir.sflash"), "is a directory, expected a --stats file"),
        ((*STREAM, "-m", layout, "--stats", tmp_path / "no" / "s.json"), "does not exist"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(*argv)
        assert_one_line_error(code, err, needle)
    assert (tmp_path / "file").read_text() == "precious" and (tmp_path / "dir.sflash").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "dir.sflash", "file"]


@pytest.fixture()
def readonly_dir(tmp_path):
    """A folder this process cannot write: mode 0555 for a normal user, a read-only tmpfs for root."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("root without mount: no read-only folder to test with")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_read_only_output_folder_is_one_line(readonly_dir, layout):
    for argv in (("layout", "--profile", readonly_dir, "-o", readonly_dir / "x.sflash"),
                 ("profile", "--corpus", EVAL_CORPUS, "-o", readonly_dir / "p"),
                 ("export-gguf", "-o", readonly_dir / "x.gguf", "-m", layout.parent / "nemotron-ckpt"),
                 (*STREAM, "-m", layout, "--stats", readonly_dir / "s.json")):
        code, _, err = run_cli(*argv)
        assert_one_line_error(code, err, str(readonly_dir), "cannot write")


# ---- the disk probe --------------------------------------------------------------------------------

def test_the_disk_probe_only_reads_the_layout(layout, tmp_path, monkeypatch):
    opened = []
    real = os.open

    def spy(path, flags, *a, **k):
        opened.append((os.fspath(path), flags))
        return real(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", spy)
    before = sorted(os.listdir(layout.parent))
    notes = []
    model = diskprobe.device_model_for(layout, cache_dir=tmp_path / "cache", note=notes.append)
    assert notes == [] and model.source.startswith(f"probe of {layout}") and model.bandwidth_bps > 0
    assert sorted(os.listdir(layout.parent)) == before
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    assert [p for p, flags in opened if flags & writes] == []  # the cache entry is written by open(), not os.open
    assert diskprobe.device_model_for(layout, cache_dir=tmp_path / "cache") == model  # cached per file system


def test_the_disk_probe_falls_back_and_says_so(tmp_path, layout, monkeypatch):
    small = tmp_path / "small.sflash"
    small.write_bytes(bytes(10_000))
    notes = []
    assert diskprobe.device_model_for(small, cache_dir=tmp_path / "c1", note=notes.append) == DeviceModel()
    assert len(notes) == 1 and "too small to measure" in notes[0] and "default device model" in notes[0]

    def eio(path, *a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
    monkeypatch.setattr(diskprobe, "probe_file", eio)
    notes.clear()
    assert diskprobe.device_model_for(layout, cache_dir=tmp_path / "c2", note=notes.append) == DeviceModel()
    assert "Input/output error" in notes[0] and not (tmp_path / "c2").exists()  # a fallback is not cached


def test_a_cache_that_cannot_be_written_costs_only_a_probe(layout, tmp_path):
    (tmp_path / "cache").write_text("a file, not a folder")
    model = diskprobe.device_model_for(layout, cache_dir=tmp_path / "cache", note=pytest.fail)
    assert model.source.startswith("probe of")


def test_run_with_a_fresh_cache_on_a_read_only_model_store(readonly_dir, layout, tmp_path, monkeypatch):
    """The first run on a new file system used to write a 128 MiB probe file next to the layout."""
    if os.geteuid() == 0:  # the read-only tmpfs is empty: remount it writable, copy, and back
        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(readonly_dir)], check=True)
        (readonly_dir / "m.sflash").write_bytes(layout.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(readonly_dir)], check=True)
    else:
        readonly_dir.chmod(0o755)
        (readonly_dir / "m.sflash").write_bytes(layout.read_bytes())
        readonly_dir.chmod(0o555)
    monkeypatch.setenv("SPARSEFLASH_CACHE", str(tmp_path / "fresh-cache"))
    code, out, err = run_cli(*STREAM, "-m", readonly_dir / "m.sflash", "--json")
    assert code == 0, err
    assert sorted(os.listdir(readonly_dir)) == ["m.sflash"]


def test_text_tokenizer_override_still_reads_a_regular_file():
    code, out, err = run_cli("run", "-n", "1", "--greedy", "--tokenizer", BUNDLED_TOKENIZER, "--json")
    assert code == 0, err


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_run_whose_cache_file_system_is_full_or_read_only_still_runs(err, layout, tmp_path, monkeypatch):
    """The device-model cache is the only thing a run writes; a full or read-only cache costs a probe."""
    import pathlib

    cache = tmp_path / "cache"
    real = pathlib.Path.write_text

    def write_text(self, *a, **k):
        if str(self).startswith(str(cache)):
            raise OSError(err, os.strerror(err), str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setenv("SPARSEFLASH_CACHE", str(cache))
    code, out, stderr = run_cli(*STREAM, "-m", layout, "--json")
    assert code == 0, stderr
    assert not any(cache.iterdir())  # no temporary left behind
