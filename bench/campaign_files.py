"""Inputs for the reliability campaign (bench/campaign.py): the clean files, and edits of them.

``build_fixtures`` writes, under one work directory, a copy of the bundled checkpoint, a layout of it
(f16 bundles, random neuron orders, random top-k predictors), a GGUF export, a small profile and
predictors. The helpers below edit a layout's bytes the way a corrupted disk or a lying writer would:
flip bits in a named region, rewrite the header or index with valid checksums, relabel a GGUF tensor.
Only the public package API is used, so the campaign runs against any tree of the package
(PYTHONPATH=/that/tree python bench/campaign.py).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREAMBLE = struct.Struct("<8sIIQQQQQII")  # magic, version, flags, file_size, header off/len, index off/len, crcs
PREAMBLE_SIZE = 128
ALIGN = 64


@dataclass
class Fixtures:
    work: Path
    ckpt: Path  # HF checkpoint folder (copy of the bundled tiny-relu2)
    layout: Path  # clean .sflash
    gguf: Path  # clean .gguf (f32 matrices)
    profile: Path
    predictors: Path
    corpus: Path  # calibration text (.zst)
    heldout: Path


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def build_fixtures(work: Path, log=print) -> Fixtures:
    """The clean inputs every case starts from (about a minute on two cores)."""
    import torch

    from sparseflash.layout.build import write_layout
    from sparseflash.layout.predictor import Predictor
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.loader import open_dense

    work.mkdir(parents=True, exist_ok=True)
    src = default_model_dir()
    ckpt = work / "ckpt"
    if not ckpt.exists():
        shutil.copytree(src, ckpt, ignore=shutil.ignore_patterns("*.txt.zst", "README.md"))
    f = Fixtures(work, ckpt, work / "clean.sflash", work / "clean.gguf", work / "profile", work / "predictors",
                 src / "calibration.txt.zst", src / "heldout.txt.zst")
    if not f.layout.exists():
        log("fixture: layout")
        model = open_dense(ckpt)
        c = model.config
        rng = np.random.default_rng(0)
        perms = [rng.permutation(c.intermediate_size).astype(np.int32) for _ in range(c.num_layers)]
        g = torch.Generator().manual_seed(0)
        rank, n = 8, c.intermediate_size
        preds = {f"layer.{l}": Predictor(torch.randn(rank, c.hidden_size, generator=g), torch.zeros(rank),
                                         torch.randn(n, rank, generator=g), torch.zeros(n), topk=n // 8, cut=1.0)
                 for l in range(c.num_layers)}
        write_layout(model, f.layout, perms, 64, [0.0] * c.num_layers, "f16", preds, "topk", quiet=True)
    if not f.gguf.exists():
        log("fixture: gguf")
        r = cli("export-gguf", "-m", str(ckpt), "-o", str(f.gguf), "--json")
        assert r.returncode == 0, r.stderr
    if not f.profile.exists():
        log("fixture: profile")
        r = cli("profile", "-m", str(ckpt), "--corpus", str(f.corpus), *SMALL_PROFILE, "-o", str(f.profile), "--json")
        assert r.returncode == 0, r.stderr
    if not f.predictors.exists():
        log("fixture: predictors")
        r = cli("predictors", "-m", str(ckpt), "--profile", str(f.profile), "--corpus", str(f.corpus),
                *SMALL_PREDICTORS, "-o", str(f.predictors), "--json")
        assert r.returncode == 0, r.stderr
    return f


SMALL_PROFILE = ("--tokens", "2048", "--ppl-tokens", "512", "--cett-tokens", "1024", "--ppl-steps", "2",
                 "--ctx", "128")
SMALL_PREDICTORS = ("--tokens", "2048", "--val-tokens", "512", "--ctx", "128", "--epochs", "2")


# ---- layout bytes ----------------------------------------------------------------------------

def preamble(blob: bytes) -> dict:
    names = ("magic", "version", "flags", "file_size", "header_offset", "header_length", "index_offset",
             "index_length", "header_crc32", "index_crc32")
    return dict(zip(names, PREAMBLE.unpack_from(blob, 0)))


def header_of(blob: bytes) -> dict:
    p = preamble(blob)
    return json.loads(blob[p["header_offset"]: p["header_offset"] + p["header_length"]])


def index_of(blob: bytes) -> dict:
    p = preamble(blob)
    return json.loads(blob[p["index_offset"]: p["index_offset"] + p["index_length"]])


def reassemble(blob: bytes, header: bytes | None = None, index: bytes | None = None) -> bytes:
    """``blob`` with a new header and/or index JSON text, every length, offset and crc made valid."""
    p = preamble(blob)
    if header is None:
        header = blob[p["header_offset"]: p["header_offset"] + p["header_length"]]
    if index is None:
        index = blob[p["index_offset"]: p["index_offset"] + p["index_length"]]
    body = bytearray(blob[: p["header_offset"]]) + header
    body += bytes(-len(body) % ALIGN)
    index_offset = len(body)
    body += index
    fields = [p["magic"], p["version"], p["flags"], len(body), p["header_offset"], len(header), index_offset,
              len(index), zlib.crc32(header), zlib.crc32(index)]
    body[: PREAMBLE.size] = PREAMBLE.pack(*fields)
    body[124:128] = zlib.crc32(bytes(body[:124])).to_bytes(4, "little")
    return bytes(body)


def edit_header(blob: bytes, edit) -> bytes:
    h = header_of(blob)
    edit(h)
    return reassemble(blob, header=json.dumps(h).encode())


def edit_index(blob: bytes, edit) -> bytes:
    ix = index_of(blob)
    edit(ix)
    return reassemble(blob, index=json.dumps(ix, separators=(",", ":")).encode())


def regions(blob: bytes) -> dict[str, list[tuple[int, int, int]]]:
    """Byte ranges of each kind of content: name -> [(start, end, element bytes)]."""
    p = preamble(blob)
    ix = index_of(blob)
    width = {"f16": 2, "bf16": 2, "f32": 4, "i32": 4}
    out: dict[str, list] = {"preamble": [(0, PREAMBLE_SIZE, 1)],
                            "header": [(p["header_offset"], p["header_offset"] + p["header_length"], 1)],
                            "index": [(p["index_offset"], p["index_offset"] + p["index_length"], 1)]}
    covered = [(0, PREAMBLE_SIZE)]
    for t in ix["tensors"]:
        name = t["name"]
        kind = ("embed" if name in ("embed", "lm_head") else "predictor" if name.startswith("pred.")
                else "perm" if name.endswith(".perm") else "norm" if "norm" in name
                else "attention" if name.split(".")[-1] in ("wq", "wk", "wv", "wo") else "other-tensor")
        out.setdefault(f"tensor:{kind}", []).append((t["offset"], t["offset"] + t["nbytes"], width.get(t["dtype"], 1)))
        covered.append((t["offset"], t["offset"] + t["nbytes"]))
    for layer in ix["layers"]:
        hot_end = layer["offset"] + layer["n_hot"] * layer["bundle_bytes"]
        w = width.get(layer["dtype"], 1)
        out.setdefault("bundle:hot", []).append((layer["offset"], hot_end, w))
        out.setdefault("bundle:cold", []).append((hot_end, layer["offset"] + layer["length"], w))
        covered.append((layer["offset"], layer["offset"] + layer["length"]))
    covered += [(p["header_offset"], p["header_offset"] + p["header_length"]),
                (p["index_offset"], p["index_offset"] + p["index_length"])]
    gaps, end = [], 0
    for a, b in sorted(covered):
        if a > end:
            gaps.append((end, a, 1))
        end = max(end, b)
    if gaps:
        out["padding"] = gaps
    return out


def flip(blob: bytes, ranges: list[tuple[int, int, int]], rng: np.random.Generator, strong: bool) -> tuple[bytes, int]:
    """Flip one bit inside ``ranges``; ``strong`` flips the top exponent bit of an element (a large
    change), otherwise a random bit of a random byte. Returns the new bytes and the byte offset."""
    lengths = np.array([b - a for a, b, _ in ranges], dtype=np.float64)
    a, b, width = ranges[int(rng.choice(len(ranges), p=lengths / lengths.sum()))]
    if strong and width > 1:
        element = int(rng.integers(0, (b - a) // width))
        offset, bit = a + element * width + width - 1, 6  # little-endian: the top byte holds the exponent
    else:
        offset, bit = int(rng.integers(a, b)), int(rng.integers(0, 8))
    out = bytearray(blob)
    out[offset] ^= 1 << bit
    return bytes(out), offset


# ---- GGUF --------------------------------------------------------------------------------------

def gguf_edit(path: Path, edit) -> None:
    """Edit a GGUF file in place through gguf-py's writable memory map: ``edit(reader)``."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()
    del reader


def gguf_relabel(tensor: str, new_type: int):
    """An edit that changes the stored type of ``tensor`` (e.g. F32=0 -> F16=1) and nothing else."""
    def edit(reader):
        (t,) = [t for t in reader.tensors if t.name == tensor]
        t.field.parts[-2][0] = new_type  # parts: name len, name, n_dims, dims, type, offset
    return edit


def gguf_poison(tensor: str, value: float):
    def edit(reader):
        (t,) = [t for t in reader.tensors if t.name == tensor]
        t.data.reshape(-1)[3] = value
    return edit


def gguf_kv(key: str, value):
    def edit(reader):
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    return edit
