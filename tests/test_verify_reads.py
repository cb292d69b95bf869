"""Integrity on every read: a bundle whose bytes on disk are not the ones written is an error naming
the file, the layer and the neuron (exit 2), never a different answer; resident tensors are checked
as they load; the cache stays consistent. ``--no-verify`` runs the bytes as they are."""

import json

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.errors import ArtefactError
from sparseflash.layout.format import LayoutFile
from sparseflash.runtime.session import open_streamed
from sparseflash.runtime.streamer import StreamError
from sparseflash.tools.cli import main


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return tiny_layout(tmp_path_factory.mktemp("verify"), "nemotron", dtype="f16", n_hot=4)[1]


def _flip(path, offset: int, out) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x20
    out.write_bytes(bytes(blob))


def _run(path, capsys, *extra):
    capsys.readouterr()
    code = main(["run", "-m", str(path), "--budget", "100%ffn", "--strategy", "all", "-n", "4", "--greedy",
                 "--ignore-eos", "--json", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_flipped_bundle_byte_is_an_error_naming_layer_and_neuron(layout, tmp_path, capsys):
    with LayoutFile.open(layout) as f:
        region = f.layers[1]
        offset = region.offset + 37 * region.bundle_bytes + 5  # stored neuron 37 of layer 1, not hot
    bad = tmp_path / "bad.sflash"
    _flip(layout, offset, bad)
    code, _, err = _run(bad, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "index.layers[1].digests[37]" in err and "stored neuron 37 of layer 1" in err and str(bad) in err
    code, out, _ = _run(bad, capsys, "--no-verify")  # the risk --no-verify takes: it runs
    assert code == 0 and len(json.loads(out)["tokens"]) == 4


@pytest.mark.parametrize("where", ["hot bundle", "embedding", "attention"])
def test_hot_bundles_and_resident_tensors_are_checked_when_loaded(layout, tmp_path, where, capsys):
    with LayoutFile.open(layout) as f:
        if where == "hot bundle":
            offset, text = f.layers[0].offset + 2 * f.layers[0].bundle_bytes + 1, "stored neuron 2 of layer 0"
        else:
            t = f.tensors["embed" if where == "embedding" else "layers.1.wq"]
            offset, text = t.offset + 3, f"tensor {t.name!r}.crc32"
    bad = tmp_path / "bad.sflash"
    _flip(layout, offset, bad)
    code, _, err = _run(bad, capsys)
    assert code == 2 and text in err and len(err.strip().splitlines()) == 1


def test_bundles_overwritten_while_running_are_caught_and_the_cache_stays_consistent(layout, tmp_path):
    live = tmp_path / "live.sflash"
    live.write_bytes(layout.read_bytes())
    model = open_streamed(live, "30%ffn", strategy="all", io_buffer_bytes=4096)
    try:
        x = torch.arange(3)[None]
        model.transformer(x)  # runs on the file as written
        with LayoutFile.open(live) as f:
            region = f.layers[0]
        with open(live, "r+b") as fh:  # another process rewrites bundles in place
            fh.seek(region.offset + region.n_hot * region.bundle_bytes)
            fh.write(bytes(region.bundle_bytes * (region.n_neurons - region.n_hot)))
        with pytest.raises(StreamError, match=r"digests\[\d+\].*changed on disk"):
            for _ in range(4):  # the evicted neurons come back from disk
                model.transformer(x)
        for cache in model.engine.caches:  # the failed read committed nothing
            cache.check()
        cache = model.engine.caches[0]
        held = cache.position_of[cache.position_of >= 0]
        rows = cache.slots[cache.slot_of[held]]
        assert not np.any(np.all(rows == 0, axis=1))  # no zeroed (overwritten) bundle entered the cache
    finally:
        model.close()


def test_an_unchecked_open_can_be_asked_for(layout, tmp_path):
    with LayoutFile.open(layout) as f:
        t = f.tensors["layers.0.wk"]
    bad = tmp_path / "bad.sflash"
    _flip(layout, t.offset + 1, bad)
    with pytest.raises(ArtefactError, match="crc32"):
        open_streamed(bad, "100%ffn", strategy="all")
    model = open_streamed(bad, "100%ffn", strategy="all", verify=False)
    model.close()


@pytest.mark.parametrize("byte", [5, 300])  # in the part of the bundle before / after the piece boundary
def test_a_bundle_cut_by_two_reads_is_checked_once_both_are_in(tmp_path, byte):
    """Each read piece checks the bundles whole in it as it lands; a bundle cut by a piece boundary
    (384-byte bundles, 4096-byte pieces) is checked once both pieces are in."""
    _, path = tiny_layout(tmp_path, "llama-relu", dtype="f16", n_hot=2)
    with LayoutFile.open(path) as f:
        region = f.layers[1]
    bb = region.bundle_bytes
    assert 4096 % bb, "the test needs bundles that straddle a 4096-byte boundary"
    p = 4096 // bb  # the bundle across the region's first piece boundary
    bad = tmp_path / "bad.sflash"
    _flip(path, region.offset + p * bb + byte, bad)
    model = open_streamed(bad, "100%ffn", strategy="all", io_buffer_bytes=4096, io_threads=2)
    try:
        with pytest.raises(StreamError, match=rf"digests\[{p}\]"):
            model.transformer(torch.arange(3)[None])
    finally:
        model.close()
