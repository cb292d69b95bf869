"""Campaign cases on the files themselves: truncation, bit flips per region, lying header, lying index,
checkpoint/GGUF. Each case names its input, the command, and what a correct program does with it:

- ``error``: exit 2 with one line on stderr;
- ``same``: exit 0 with the tokens of the clean file (``ref``: the clean command), or exit 2 in one line;
- ``clean``: exit 0, or exit 2 in one line (anything but a traceback, hang or other exit code);
- ``ok``: exit 0.

A ``check`` runs after the command and names a side effect it finds (a temp file left, a file replaced).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from campaign_files import (
    Fixtures,
    edit_header,
    edit_index,
    flip,
    gguf_edit,
    gguf_kv,
    gguf_poison,
    gguf_relabel,
    preamble,
    reassemble,
    regions,
)

PROMPT = ("-p", "The os module")
RUN = ("run", *PROMPT, "-n", "8", "--greedy", "--json")
STREAM = (*RUN, "--budget", "50%ffn")
DENSE = ("run", *PROMPT, "-n", "4", "--greedy", "--json")


@dataclass
class Case:
    category: str
    name: str
    args: list[str]
    expect: str  # error | same | clean | ok | signal
    setup: Callable[[], None] | None = None
    check: Callable[[], str | None] | None = None
    ref: list[str] | None = None  # the clean command for "same"
    python: str | None = None  # run `python -c <code> args` instead of the CLI
    timeout: float = 180
    signal_when: Callable[[], bool] | None = None  # send ``signal`` once this turns true
    signal: int = 15
    unprivileged: bool = False  # without CAP_DAC_OVERRIDE, so file modes apply to root
    env: dict = field(default_factory=dict)


def _writer(path: Path, blob_fn: Callable[[], bytes]) -> Callable[[], None]:
    def setup():
        path.unlink(missing_ok=True)
        path.write_bytes(blob_fn())
    return setup


def truncation(f: Fixtures, scratch: Path) -> list[Case]:
    blob = f.layout.read_bytes()
    p = preamble(blob)
    ffn0 = json.loads(blob[p["index_offset"]: p["index_offset"] + p["index_length"]])["layers"][2]["offset"]
    cuts = {"empty": 0, "half a preamble": 64, "preamble less a byte": 127, "preamble only": 128,
            "inside the embedding": 4096, "inside layer 2's bundles": ffn0 + 5000,
            "inside the header": p["header_offset"] + 100, "inside the index": p["index_offset"] + 10,
            "last byte missing": len(blob) - 1}
    out = []
    for name, size in cuts.items():
        path = scratch / f"trunc-{size}.sflash"
        setup = _writer(path, lambda size=size: blob[:size])
        out.append(Case("truncation", f"run: {name}", [*STREAM, "-m", str(path)], "error", setup))
        out.append(Case("truncation", f"inspect: {name}", ["inspect", str(path)], "error", setup))
    return out


def bit_flips(f: Fixtures, scratch: Path, per_region: int = 4, seed: int = 0) -> list[Case]:
    blob = f.layout.read_bytes()
    rng = np.random.default_rng(seed)
    out = []
    for region, ranges in regions(blob).items():
        for k in range(per_region):
            bad, offset = flip(blob, ranges, rng, strong=k % 2 == 0)
            path = scratch / f"flip-{region.replace(':', '-')}-{k}.sflash"
            setup = _writer(path, lambda bad=bad: bad)
            # every bundle is read with --strategy all, so a flipped cold bundle is used if nothing checks it
            extra = ["--strategy", "all"] if region == "bundle:cold" else []
            ref = [*STREAM, *extra, "-m", str(f.layout)]
            tag = f"{region} byte {offset}"
            out.append(Case("bit flips", f"run: {tag}", [*STREAM, *extra, "-m", str(path)], "same", setup, ref=ref))
            expect = "clean" if region == "padding" else "error"
            out.append(Case("bit flips", f"inspect --verify: {tag}", ["inspect", str(path), "--verify"], expect, setup))
    return out


def _set(key: str, value):
    def edit(d):
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()
INF, NAN = math.inf, math.nan
YARN_NO_ORIGINAL = {"rope_type": "yarn", "factor": 4.0}

LYING_HEADERS = {
    "model is a list": _set("model", [1, 2]), "model is a string": _set("model", "llama"),
    "model is null": _set("model", None), "hidden_size 128": _set("model.hidden_size", 128),
    "num_layers 0": _set("model.num_layers", 0), "num_layers 3": _set("model.num_layers", 3),
    "num_layers 8": _set("model.num_layers", 8), "num_heads 8": _set("model.num_heads", 8),
    "num_kv_heads 2": _set("model.num_kv_heads", 2), "head_dim 32": _set("model.head_dim", 32),
    "intermediate_size 512": _set("model.intermediate_size", 512), "vocab_size 100": _set("model.vocab_size", 100),
    "norm_eps inf": _set("model.norm_eps", INF), "norm_eps nan": _set("model.norm_eps", NAN),
    "norm_eps 0": _set("model.norm_eps", 0.0), "norm_eps negative": _set("model.norm_eps", -1e-5),
    "norm_eps a string": _set("model.norm_eps", "small"), "rope_theta nan": _set("model.rope_theta", NAN),
    "rope_theta 0": _set("model.rope_theta", 0.0), "rope_theta inf": _set("model.rope_theta", INF),
    "unknown arch": _set("model.arch", "gpt99"), "unknown activation": _set("model.activation", "swish9"),
    "unknown norm": _set("model.norm", "batchnorm"), "gated lies": _set("model.gated", True),
    "untied without lm_head": _set("model.tie_word_embeddings", False),
    "partial rotary 2": _set("model.partial_rotary_factor", 2.0),
    "max positions 0": _set("model.max_position_embeddings", 0),
    "yarn without original_max_position_embeddings": _set("model.rope_scaling", YARN_NO_ORIGINAL),
    "unknown rope type": _set("model.rope_scaling", {"rope_type": "spiral"}),
    "sliding window -3": _set("model.sliding_window", -3), "bos id past the vocab": _set("model.bos_token_id", 99999),
    "missing model key": _set("model.head_dim", _DELETE), "dtype lies": _set("dtype", "bf16"),
    "n_hot lies": _set("n_hot", 65), "bundle_bytes lies": _set("bundle_bytes", 999),
    "schema version 99": _set("schema_version", 99), "tokenizer is garbage": _set("tokenizer_json", "{not json"),
    "no tokenizer": _set("tokenizer_json", _DELETE), "unknown strategy": _set("predictors.strategy", "magic"),
    "top-k 0": _set("predictors.layers", [{"topk": 0, "cut": 1.0, "rank": 8}] * 6),
    "top-k past the layer": _set("predictors.layers", [{"topk": 99999, "cut": 1.0, "rank": 8}] * 6),
    "predictor cut nan": _set("predictors.layers", [{"topk": 128, "cut": NAN, "rank": 8}] * 6),
}


def lying_header(f: Fixtures, scratch: Path) -> list[Case]:
    blob = f.layout.read_bytes()
    out = []
    for i, (name, edit) in enumerate(LYING_HEADERS.items()):
        path = scratch / f"header-{i}.sflash"
        setup = _writer(path, lambda edit=edit: edit_header(blob, edit))
        out.append(Case("lying header", f"run: {name}", [*STREAM, "-m", str(path)], "error", setup))
        if i % 5 == 0:
            out.append(Case("lying header", f"inspect: {name}", ["inspect", str(path)], "error", setup))
    return out


def _tensor(name: str, key: str, value):
    def edit(ix):
        (t,) = [t for t in ix["tensors"] if t["name"] == name]
        t[key] = value
    return edit


def _layer(l: int, key: str, value):
    def edit(ix):
        ix["layers"][l][key] = value
    return edit


def _alias(name: str, other: str):
    def edit(ix):
        a, b = ([t for t in ix["tensors"] if t["name"] == n][0] for n in (name, other))
        a["offset"], a["crc32"] = b["offset"], b["crc32"]
    return edit


def _duplicate(name: str):
    def edit(ix):
        ix["tensors"].append(dict([t for t in ix["tensors"] if t["name"] == name][0]))
    return edit


LYING_INDEX = {
    "embed f16 read as u16": _tensor("embed", "dtype", "u16"),
    "wq f16 read as bf16": _tensor("layers.0.wq", "dtype", "bf16"),
    "norm f32 read as i32": _tensor("layers.0.attn_norm_w", "dtype", "i32"),
    "embed shape transposed": _tensor("embed", "shape", [256, 4096]),
    "wq shape 128x512": _tensor("layers.0.wq", "shape", [128, 512]),
    "perm read as f32": _tensor("layers.1.perm", "dtype", "f32"),
    "wk missing": _tensor("layers.0.wk", "name", "layers.0.wk_renamed"),
    "embed listed twice": _duplicate("embed"),
    "wq points at wk (crc too)": _alias("layers.0.wq", "layers.0.wk"),
    "bundles f16 read as bf16": _layer(1, "dtype", "bf16"),
    "layer n_hot lies": _layer(1, "n_hot", 65),
    "layer threshold nan": _layer(1, "threshold", NAN),
    "layer bundle_bytes lies": _layer(1, "bundle_bytes", 512),
    "layer gated lies": _layer(1, "gated", True),
    "layer n_neurons lies": _layer(1, "n_neurons", 1000),
    "layer permutation names wq": _layer(1, "permutation", "layers.1.wq"),
}
DUPLICATE_KEYS = {  # raw JSON text edits: json.loads keeps the last of duplicated keys
    "wq dtype given twice (f16, bf16)": ('"name":"layers.0.wq","dtype":"f16"', '"name":"layers.0.wq","dtype":"f16","dtype":"bf16"'),
    "embed offset given twice": ('"name":"embed","dtype":"f16","shape":[4096,256],"offset":128',
                                 '"name":"embed","dtype":"f16","shape":[4096,256],"offset":128,"offset":2101376'),
}


def lying_index(f: Fixtures, scratch: Path) -> list[Case]:
    blob = f.layout.read_bytes()
    p = preamble(blob)
    text = json.dumps(json.loads(blob[p["index_offset"]: p["index_offset"] + p["index_length"]]),
                      separators=(",", ":"))
    makers = {name: (lambda edit=edit: edit_index(blob, edit)) for name, edit in LYING_INDEX.items()}
    for name, (old, new) in DUPLICATE_KEYS.items():
        assert old in text, name
        makers[name] = lambda old=old, new=new: reassemble(blob, index=text.replace(old, new, 1).encode())
    out = []
    for i, (name, make) in enumerate(makers.items()):
        path = scratch / f"index-{i}.sflash"
        out.append(Case("lying index", f"run: {name}", [*STREAM, "--strategy", "all", "-m", str(path)], "error",
                        _writer(path, make)))
    return out


# ---- checkpoints and GGUF ------------------------------------------------------------------------

def _ckpt_copy(f: Fixtures, dest: Path, config_edit=None, tensors_edit=None) -> Callable[[], None]:
    def setup():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(f.ckpt, dest)
        if config_edit is not None:
            cfg = json.loads((dest / "config.json").read_text())
            config_edit(cfg)
            (dest / "config.json").write_text(json.dumps(cfg))
        if tensors_edit is not None:
            from safetensors.numpy import load_file, save_file

            tensors = load_file(dest / "model.safetensors")
            tensors_edit(tensors)
            save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return setup


def _tset(name: str, value):
    def edit(t):
        if value is _DELETE:
            del t[name]
        elif isinstance(value, tuple):
            t[name] = np.zeros(value, dtype=t[name].dtype)
        else:
            t[name] = t[name].copy()
            t[name].reshape(-1)[5] = value
    return edit


UP0 = "model.layers.0.mlp.up_proj.weight"
CONFIG_EDITS = {
    "num_hidden_layers 0": _set("num_hidden_layers", 0), "num_hidden_layers 3 (6 stored)": _set("num_hidden_layers", 3),
    "num_hidden_layers 8 (6 stored)": _set("num_hidden_layers", 8), "hidden_size 128": _set("hidden_size", 128),
    "num_attention_heads 8": _set("num_attention_heads", 8), "intermediate_size 512": _set("intermediate_size", 512),
    "norm_eps nan": _set("norm_eps", NAN), "norm_eps inf": _set("norm_eps", INF), "norm_eps -1": _set("norm_eps", -1.0),
    "rope_theta nan": _set("rope_parameters.rope_theta", NAN), "unknown hidden_act": _set("hidden_act", "swish9"),
    "unknown model_type": _set("model_type", "gpt99"), "vocab_size 100": _set("vocab_size", 100),
    "yarn without original_max_position_embeddings": _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0,
                                                                             "rope_theta": 10000.0}),
}
TENSOR_EDITS = {
    "a NaN weight": _tset(UP0, NAN), "an inf weight": _tset(UP0, INF),
    "k_proj missing": _tset("model.layers.1.self_attn.k_proj.weight", _DELETE),
    "up_proj of the wrong shape": _tset("model.layers.2.mlp.up_proj.weight", (512, 256)),
    "embedding missing": _tset("model.embed_tokens.weight", _DELETE),
}


def checkpoints(f: Fixtures, scratch: Path) -> list[Case]:
    out = []
    ppl = ["eval-ppl", "--text", str(f.heldout), "--tokens", "512", "--ctx", "128", "--json"]
    for i, (name, edit) in enumerate(CONFIG_EDITS.items()):
        dest = scratch / f"ckpt-config-{i}"
        out.append(Case("checkpoint/gguf", f"run: config {name}", [*DENSE, "-m", str(dest)], "error",
                        _ckpt_copy(f, dest, config_edit=edit)))
        if "nan" in name or "inf" in name:
            out.append(Case("checkpoint/gguf", f"eval-ppl: config {name}", [*ppl, "-m", str(dest)], "error",
                            _ckpt_copy(f, dest, config_edit=edit)))
    for i, (name, edit) in enumerate(TENSOR_EDITS.items()):
        dest = scratch / f"ckpt-tensors-{i}"
        out.append(Case("checkpoint/gguf", f"run: {name}", [*DENSE, "-m", str(dest)], "error",
                        _ckpt_copy(f, dest, tensors_edit=edit)))
        if "weight" in name and "NaN" in name or "inf" in name:
            out.append(Case("checkpoint/gguf", f"eval-ppl: {name}", [*ppl, "-m", str(dest)], "error",
                            _ckpt_copy(f, dest, tensors_edit=edit)))

    def broken(dest: Path, what: str):
        def setup():
            _ckpt_copy(f, dest)()
            if what == "config dir":
                (dest / "config.json").unlink()
                (dest / "config.json").mkdir()
            elif what == "config garbage":
                (dest / "config.json").write_text("{ not json")
            elif what == "config a list":
                (dest / "config.json").write_text("[1, 2]")
            elif what == "tokenizer garbage":
                (dest / "tokenizer.json").write_text("{ not json")
            elif what == "safetensors truncated":
                data = (dest / "model.safetensors").read_bytes()
                (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
            elif what == "safetensors missing":
                (dest / "model.safetensors").unlink()
        return setup

    for i, what in enumerate(("config dir", "config garbage", "config a list", "tokenizer garbage",
                              "safetensors truncated", "safetensors missing")):
        dest = scratch / f"ckpt-broken-{i}"
        out.append(Case("checkpoint/gguf", f"run: {what}", [*DENSE, "-m", str(dest)], "error", broken(dest, what)))
        if what == "config dir":
            out.append(Case("checkpoint/gguf", "info: config.json is a directory", ["info", "-m", str(dest)], "error",
                            broken(dest, what)))
    return out + _ggufs(f, scratch, ppl)


def _ggufs(f: Fixtures, scratch: Path, ppl: list[str]) -> list[Case]:
    size = f.gguf.stat().st_size
    out = []
    for i, cut in enumerate((16, 2000, size // 2, size - 1)):
        path = scratch / f"gguf-trunc-{i}.gguf"
        out.append(Case("checkpoint/gguf", f"run: GGUF truncated to {cut} bytes", [*DENSE, "-m", str(path)], "error",
                        _writer(path, lambda cut=cut: f.gguf.read_bytes()[:cut])))
    edits = {"token_embd relabelled F32 -> F16": gguf_relabel("token_embd.weight", 1),
             "blk.0.ffn_up relabelled F32 -> F16": gguf_relabel("blk.0.ffn_up.weight", 1),
             "a NaN in blk.0.ffn_up": gguf_poison("blk.0.ffn_up.weight", NAN),
             "block_count 0": gguf_kv("nemotron.block_count", 0),
             "block_count 3": gguf_kv("nemotron.block_count", 3),
             "layer_norm_epsilon nan": gguf_kv("nemotron.attention.layer_norm_epsilon", NAN)}
    for i, (name, edit) in enumerate(edits.items()):
        path = scratch / f"gguf-edit-{i}.gguf"

        def setup(path=path, edit=edit):
            path.unlink(missing_ok=True)
            shutil.copy(f.gguf, path)
            gguf_edit(path, edit)
        out.append(Case("checkpoint/gguf", f"run: GGUF {name}", [*DENSE, "-m", str(path)], "error", setup))
        if "nan" in name.lower():
            out.append(Case("checkpoint/gguf", f"eval-ppl: GGUF {name}", [*ppl, "-m", str(path)], "error", setup))
    path = scratch / "gguf-magic.gguf"
    out.append(Case("checkpoint/gguf", "run: GGUF with a garbage magic", [*DENSE, "-m", str(path)], "error",
                    _writer(path, lambda: b"GGUX" + f.gguf.read_bytes()[4:])))
    return out
