"""The layout writer: atomic replacement, interrupted writes, progress, and rejected inputs."""

import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from test_layout_format_samples import build_sample

from sparseflash.layout.format import (
    ALIGNMENT,
    TENSOR_ALIGNMENT,
    LayoutError,
    LayoutFile,
    LayoutWriter,
    is_temp_name,
    temp_path_for,
)


def _one_layer_writer(path, bundles, n_neurons=40, header=None, **kwargs) -> LayoutWriter:
    writer = LayoutWriter(path, header or {"model": "t"}, **kwargs)
    writer.add_tensor("perm", np.arange(n_neurons, dtype=np.int32))
    writer.add_ffn_layer(d_model=4, n_neurons=n_neurons, gated=False, dtype="f32", bundle_bytes=32, permutation="perm",
                         bundles=bundles, chunk_neurons=4)
    return writer


def _blocks_then(exc: BaseException, after: int = 3):
    for i in range(10):
        if i == after:
            raise exc
        yield np.full((4, 8), i, dtype=np.float32)


@pytest.mark.parametrize("exc", [RuntimeError("source checkpoint vanished"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing_behind(tmp_path, exc):
    target = tmp_path / "model.sflash"
    with pytest.raises(type(exc)):
        _one_layer_writer(target, _blocks_then(exc)).write()
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_previous_file_intact(tmp_path):
    target = tmp_path / "model.sflash"
    sample = build_sample(target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        _one_layer_writer(target, _blocks_then(RuntimeError("boom"))).write()
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["model.sflash"]
    with LayoutFile.open(sample.path, verify=True):
        pass


def test_a_progress_callback_that_raises_also_cleans_up(tmp_path):
    def progress(done, total):
        if done > 100:
            raise KeyboardInterrupt

    rows = np.zeros((40, 8), dtype=np.float32)
    with pytest.raises(KeyboardInterrupt):
        _one_layer_writer(tmp_path / "m.sflash", rows).write(progress)
    assert os.listdir(tmp_path) == []


_CHILD = """
import sys, time
import numpy as np
from sparseflash.layout.format import LayoutWriter

target, marker = sys.argv[1:3]

def blocks():
    for i in range(1000):
        if i == 3:
            open(marker, "w").close()
            time.sleep(120)  # killed here, mid-layer
        yield np.zeros((4, 8), dtype=np.float32)

writer = LayoutWriter(target, {"model": "t"})
writer.add_tensor("perm", np.arange(4000, dtype=np.int32))
writer.add_ffn_layer(d_model=4, n_neurons=4000, gated=False, dtype="f32", bundle_bytes=32, permutation="perm",
                     bundles=blocks(), chunk_neurons=4)
writer.write()
"""


def test_sigkill_mid_write_leaves_no_target_only_a_recognisable_temp_file(tmp_path):
    target, marker = tmp_path / "model.sflash", tmp_path / "started"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(marker)],
                             cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "writer child exited early"
            assert time.monotonic() < deadline, "writer child never started"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    marker.unlink()
    assert not target.exists()
    leftovers = os.listdir(tmp_path)  # SIGKILL runs no cleanup: the temp file stays, named for its pid
    assert leftovers == [f".model.sflash.tmp-{child.pid}"] and all(map(is_temp_name, leftovers))


def test_temp_names_are_recognisable():
    path = temp_path_for("/data/llama.sflash")
    assert path == f"/data/.llama.sflash.tmp-{os.getpid()}"
    assert is_temp_name(os.path.basename(path))
    for name in ["llama.sflash", ".llama.sflash", ".llama.sflash.tmp-", "x.tmp-12", ".tmp-12"]:
        assert not is_temp_name(name), name


def test_progress_counts_raw_bytes_up_to_the_planned_total(tmp_path):
    calls = []
    rows = np.arange(40 * 8, dtype=np.float32).reshape(40, 8)
    writer = _one_layer_writer(tmp_path / "m.sflash", rows, zstd_level=1)
    plan = writer.plan()
    writer.write(lambda done, total: calls.append((done, total)))
    assert plan.raw_bytes == 40 * 4 + 40 * 8 * 4
    assert calls[-1] == (plan.raw_bytes, plan.raw_bytes)
    assert calls[0] == (0, plan.raw_bytes)  # the total before the first byte: a bar shows "0 / total" at once
    assert all(a[0] < b[0] for a, b in pairwise(calls)) and len(calls) == 1 + 1 + 10  # start, tensor, chunks
    with pytest.raises(RuntimeError, match="once"):
        writer.write()


def test_plan_places_tensors_and_regions_on_their_alignments(tmp_path):
    writer = LayoutWriter(tmp_path / "m.sflash", {}, chunk_bytes=1000)
    for i, n in enumerate([3, 17, 1, 64]):
        writer.add_tensor(f"t{i}", np.zeros(n, dtype=np.uint8))
    writer.add_tensor("perm", np.arange(37, dtype=np.int32))
    writer.add_ffn_layer(d_model=8, n_neurons=37, gated=True, dtype="f32", bundle_bytes=96, permutation="perm",
                         bundles=np.zeros((37, 24), np.float32))
    plan = writer.plan()
    assert list(plan.tensor_offsets.values()) == [128, 192, 256, 320, 384]
    assert plan.ffn_offset == ALIGNMENT and plan.chunk_neurons == (1000 // 96,)
    assert all(offset % TENSOR_ALIGNMENT == 0 for offset in plan.tensor_offsets.values())


def test_big_endian_inputs_are_stored_little_endian(tmp_path):
    rows = np.arange(40 * 8, dtype=">f4").reshape(40, 8)
    writer = _one_layer_writer(tmp_path / "m.sflash", [rows[:13], rows[13:]])
    writer.add_tensor("scales", np.array([1.5, -2.0], dtype=">f2"))
    writer.write()
    with LayoutFile.open(tmp_path / "m.sflash", verify=True) as layout:
        assert np.array_equal(layout.read_bundles(0, start=0, count=40), rows)
        assert layout.tensor("scales").tolist() == [1.5, -2.0] and layout.tensors["scales"].dtype == "f16"


def _add(writer, **changes):
    spec = dict(d_model=4, n_neurons=40, gated=False, dtype="f32", bundle_bytes=32, permutation="perm",
                bundles=np.zeros((40, 8), np.float32))
    spec.update(changes)
    writer.add_ffn_layer(**spec)


BAD_INPUTS = {  # id: (action on a writer with an i32 "perm" of 40, text the error must contain)
    "bundles of the wrong dtype": (lambda w: _add(w, bundles=np.zeros((40, 8), np.float16)), "bundles.dtype"),
    "bundles of the wrong width": (lambda w: _add(w, bundles=np.zeros((40, 9), np.float32)), "bundles"),
    "too few rows": (lambda w: _add(w, bundles=np.zeros((39, 8), np.float32)), "yielded 39 rows"),
    "too many rows": (lambda w: _add(w, bundles=[np.zeros((40, 8), np.float32)] * 2), "more than n_neurons"),
    "missing permutation": (lambda w: _add(w, permutation="nope"), "permutation"),
    "not a permutation": (lambda w: (w.add_tensor("dup", np.zeros(40, np.int32)), _add(w, permutation="dup")),
                          "not a permutation"),
    "permutation of another size": (lambda w: (w.add_tensor("p3", np.arange(3, dtype=np.int32)),
                                               _add(w, permutation="p3")), "shape (40,)"),
    "n_hot above n_neurons": (lambda w: _add(w, n_hot=41), "n_hot"),
    "threshold NaN": (lambda w: _add(w, threshold=float("nan")), "threshold"),
    "storage dtype i32": (lambda w: _add(w, dtype="i32"), "dtype"),
    "bundle_bytes not a multiple of the itemsize": (lambda w: _add(w, bundle_bytes=30), "bundle_bytes"),
    "bundle_bytes 0": (lambda w: _add(w, bundle_bytes=0), "bundle_bytes"),
    "chunk_neurons 0": (lambda w: _add(w, chunk_neurons=0), "chunk_neurons"),
    "d_model a float": (lambda w: _add(w, d_model=4.0), "d_model"),
    "bf16 tensor that is not uint16": (lambda w: w.add_tensor("h", np.zeros(3, np.float16), "bf16"), "dtype"),
    "tensor of an untagged dtype": (lambda w: w.add_tensor("c", np.zeros(3, np.complex64)), "dtype"),
    "tensor declared twice": (lambda w: w.add_tensor("perm", np.zeros(3, np.int32)), "declared twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_writer_input_is_a_layout_error_and_writes_nothing(tmp_path, case):
    action, text = BAD_INPUTS[case]
    writer = LayoutWriter(tmp_path / "m.sflash", {})
    writer.add_tensor("perm", np.arange(40, dtype=np.int32))
    with pytest.raises(LayoutError, match=text.replace("(", r"\(").replace(")", r"\)")):
        action(writer)
        writer.write()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("header", [[1, 2], {"x": float("nan")}, {"x": object()}])
def test_header_must_be_a_json_object(tmp_path, header):
    with pytest.raises(LayoutError, match="header"):
        LayoutWriter(tmp_path / "m.sflash", header)
