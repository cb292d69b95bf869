"""``sparseflash inspect``: what a layout file holds, whether it is a valid model layout, and (with
``verify``) whether every checksum matches; zstd layouts also get their compression measured."""

from __future__ import annotations

import os
import time

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutError, LayoutFile
from sparseflash.model.config import ModelConfig
from sparseflash.paths import input_file


def inspect_layout(path: str | os.PathLike, verify: bool = False) -> dict:
    """Summary of ``path``: header (without the tokenizer and order measurements), FFN regions,
    resident and FFN bytes; ``ok`` is False when the model contract or a checksum fails."""
    input_file(path, "layout file")
    try:
        f = LayoutFile.open(path)
    except FileNotFoundError:
        raise ArtefactError(f"{path}: layout file not found") from None
    with f:
        header = {k: v for k, v in f.header.items() if k != "tokenizer_json"}
        if isinstance(header.get("provenance"), dict):
            header["provenance"] = {k: v for k, v in header["provenance"].items() if k != "order_report"}
        layers = [{"layer": i, "n_neurons": l.n_neurons, "n_hot": l.n_hot, "dtype": l.dtype,
                   "bundle_bytes": l.bundle_bytes, "offset": l.offset, "length": l.length,
                   "threshold": l.threshold, "compressed": l.compressed} for i, l in enumerate(f.layers)]
        out = {"file": str(path), "header": header, "layers": layers, "tensors": len(f.tensors),
               "resident_bytes": sum(t.nbytes for t in f.tensors.values()),
               "ffn_bytes": sum(l.length for l in f.layers), "ok": True}
        try:
            header_model = schema.read_header(path, f.header)
            schema.check_layout(path, header_model, f.tensors, f.layers)
            ModelConfig.from_dict(header_model.model)  # the values `run` would refuse
        except LayoutError as e:
            out["ok"], out["schema_error"] = False, str(e)
        except SparseflashError as e:
            out["ok"], out["schema_error"] = False, f"{path}: {e}"
        if any(l.compressed for l in f.layers):
            out["compression"] = measure_compression(f)
        if verify:
            report = f.verify()
            out["verified"] = report.ok
            out["verify_failures"] = [str(e) for e in report.failures]
            out["bytes_verified"] = report.bytes_checked
            out["ok"] = out["ok"] and report.ok
    return out


def measure_compression(f: LayoutFile) -> dict:
    """Stored vs raw FFN bytes and the measured zstd decode speed over every chunk (page cache)."""
    raw = stored = 0
    t = time.perf_counter()
    for i, layer in enumerate(f.layers):
        for k in range(len(layer.chunks)):
            f.read_chunk(i, k)
        raw += int(layer.chunks.raw_length.sum())
        stored += int(layer.chunks.stored_length.sum())
    seconds = time.perf_counter() - t
    return {"raw_bytes": raw, "stored_bytes": stored, "ratio": stored / raw if raw else 1.0,
            "read_and_decode_s": seconds, "decode_mb_per_s": raw / seconds / 1e6 if seconds else 0.0}
