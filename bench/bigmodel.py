"""A random-weight nemotron checkpoint larger than the bundled one, and its layout.

Random weights have no trained sparsity structure: about half of each layer's ReLU² neurons are
nonzero for any token, with no strongly hot neurons and no co-activation clusters to exploit. What
such a model shows is the I/O machinery at a realistic size (bytes moved, latency hidden or not),
not the sparsity a trained model gives.

Its layout is made like `sparseflash prepare` makes one (profile -> predictors -> layout, each
step cached), with one change: "active" is defined by the CETT-0.2 thresholds, not by the PPL-p%
search. A random model's perplexity (about 9,000) does not move when neurons are dropped, so the
PPL-p% search would declare 99.9% of neurons inactive and the streamed run would read almost
nothing. CETT 0.2 keeps the neurons that carry 80% of each token's FFN output norm, about 16% of
them here, which is in the range trained ReLU² models show; the PPL search is skipped
(ppl_steps=0) since it would only cost time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sparseflash.layout.params import PredictorParams, ProfileParams, TrainParams


@dataclass(frozen=True)
class BigShape:
    hidden: int = 2048
    layers: int = 16
    intermediate: int = 8192
    vocab: int = 4096  # the bundled tokenizer's
    head_dim: int = 128
    kv_groups: int = 4  # query heads per key/value head (GQA, as in Nemotron-4 / Minitron)
    context: int = 512
    seed: int = 0

    @property
    def name(self) -> str:
        return f"random-nemotron-h{self.hidden}-l{self.layers}-i{self.intermediate}"

    @property
    def heads(self) -> int:
        return max(1, self.hidden // self.head_dim)

    def ffn_bytes_f16(self) -> int:
        return self.layers * 2 * self.hidden * self.intermediate * 2


# Small token counts: on 2 idle cores this takes a few minutes for the default shape.
PROFILE = ProfileParams(tokens=1024, cett_tokens=512, ppl_tokens=512, ppl_steps=0, cett_bound=0.2)
PREDICTORS = PredictorParams(tokens=2048, val_tokens=512, thresholds="cett", train=TrainParams(epochs=5))
LAYOUT = {"order": "coact", "dtype": "f16", "hot_fraction": 0.1, "thresholds": "cett"}


def build_random_nemotron(shape: BigShape, out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike) -> Path:
    """Write a random-weight NemotronForCausalLM (f16 safetensors + tokenizer.json) to ``out_dir``.

    Written to a temporary folder that is renamed into place, so a crash leaves nothing half-made.
    """
    import torch
    import transformers

    out = Path(out_dir)
    made = out / "bench_shape.json"
    if made.exists() and json.loads(made.read_text()) == asdict(shape):
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        config = transformers.NemotronConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=max(1, shape.heads // shape.kv_groups), head_dim=shape.head_dim,
            max_position_embeddings=shape.context, partial_rotary_factor=0.5, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, hidden_act="relu2")
        torch.manual_seed(shape.seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        shutil.copy(tokenizer_json, tmp / "tokenizer.json")
        (tmp / "bench_shape.json").write_text(json.dumps(asdict(shape), indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_random(checkpoint: str | os.PathLike, corpus: str | os.PathLike, heldout: str | os.PathLike,
                   out_dir: str | os.PathLike, log=print) -> Path:
    """profile -> predictors -> layout of ``checkpoint`` in ``out_dir`` with the CETT thresholds;
    a step is redone only when its parameters or the checkpoint changed. Returns the layout path."""
    from sparseflash.layout.build import build_layout
    from sparseflash.layout.params import LayoutParams
    from sparseflash.layout.predictors_build import build_predictors
    from sparseflash.layout.profile import load_profile, run_profile
    from sparseflash.model.checkpoint import checkpoint_hash
    from sparseflash.model.loader import open_dense
    from sparseflash.model.text import corpus_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = checkpoint_hash(checkpoint)
    record_path = out / "bench_prepare.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("source_hash") != source:
        record = {"source_hash": source}
    steps = {"profile": asdict(PROFILE), "predictors": asdict(PREDICTORS), "layout": LAYOUT}
    layout_path = out / "model.sflash"
    artefacts = {"profile": out / "profile" / "profile.json", "predictors": out / "predictors" / "predictors.json",
                 "layout": layout_path}
    stale = [s for s in steps if record.get(s) != steps[s] or not artefacts[s].exists()]
    if not stale:
        return layout_path
    first = min(list(steps).index(s) for s in stale)
    model = open_dense(checkpoint)
    calib = corpus_ids(corpus, model.tokenizer, max(PROFILE.tokens, PREDICTORS.tokens))
    held = corpus_ids(heldout, model.tokenizer, max(PROFILE.ppl_tokens, PREDICTORS.val_tokens))
    for step in list(steps)[first:]:
        log(f"[prepare] {step} ...")
        if step == "profile":
            run_profile(model, calib[: PROFILE.tokens], held, out / "profile", PROFILE, source, quiet=True)
        elif step == "predictors":
            build_predictors(model, load_profile(out / "profile"), out / "profile", calib[: PREDICTORS.tokens], held,
                             out / "predictors", PREDICTORS, source, quiet=True)
        else:
            build_layout(model, out / "profile", layout_path, out / "predictors", LayoutParams(**LAYOUT),
                         source_hash=source, quiet=True)
        record[step] = steps[step]
        tmp = record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, record_path)
    return layout_path
