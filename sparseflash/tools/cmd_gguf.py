"""CLI command to write a checkpoint as GGUF for llama.cpp: export-gguf."""

from __future__ import annotations

import json

from sparseflash.paths import input_file, input_model, note, output_file, sweep_stale_temps
from sparseflash.units import fmt_bytes


def cmd_export_gguf(args) -> int:
    from sparseflash.model.gguf_export import export_gguf

    input_model(args.model)
    if args.tokenizer is not None:
        input_file(args.tokenizer, "tokenizer.json")
    output_file(args.output, "GGUF file")
    sweep_stale_temps(args.output, note)
    r = export_gguf(args.model, args.output, args.dtype, args.tokenizer)
    if args.json:
        print(json.dumps({"path": str(r.path), "arch": r.arch, "dtype": r.dtype, "tensors": r.tensors,
                          "bytes": r.nbytes, "tokenizer_pre": r.tokenizer_pre}))
    else:
        print(f"wrote {r.path}: {r.arch}, {r.tensors} tensors ({r.dtype} matrices), {fmt_bytes(r.nbytes)}, "
              f"tokenizer gpt2/{r.tokenizer_pre}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export-gguf", help="write a checkpoint as a GGUF file that llama.cpp can run")
    e.add_argument("-m", "--model", required=True, help="checkpoint folder or .gguf file")
    e.add_argument("-o", "--output", required=True, help="the .gguf file to write (replaced atomically)")
    e.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32",
                   help="type of the matrices; norms and biases stay f32 (default: f32)")
    e.add_argument("--tokenizer", default=None, metavar="TOKENIZER_JSON",
                   help="use this tokenizer.json instead of the source's own")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_export_gguf)
