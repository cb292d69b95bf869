"""How far the runtime's eviction is from Belady, layer by layer, and whether another setting of its
rule (window, decay, probation) would read less: on a layout's own traces, held-out text
(docs/fetchless.md, "Held-out tokens the gate did not see").

    python bench/eviction_sweep.py --layout MODEL.sflash --corpus HELDOUT.txt.zst --tokens 4096 \
        --budgets 25%ffn,50%ffn --out sweep.json

The text is the io-report's (``--skip`` as there: by default the tokens after the ones the layout's
quality gate validated on). Per budget, the default run (no look-ahead) is streamed once, teacher-forced,
and its selected positions per layer and token recorded (the run's trace), next to the true active sets
of a dense forward (the oracle's trace). Each layer's trace is then replayed, with that layer's slots of
the run, through the runtime's frequency rule (``layout/cache_demand.replay_misses``: the replay the cache demand
and the simulator use) and through Belady; and the rule is replayed again at every (window, decay,
probation threshold) of the grid. The replay ignores that the selection depends on the cache (a run
with another rule would select a little differently), so it ranks settings, it does not replace a run.
Printed: per budget and layer, fetched a token by the rule and by Belady on both traces, and the best
three settings on the run's trace with the default's own figure. Misses count after 128 warm-up tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sparseflash.eval.heldout import eval_ids  # noqa: E402
from sparseflash.eval.io_report import _dense_pass, streamed_pass  # noqa: E402
from sparseflash.eval.simulate import simulate_layer  # noqa: E402
from sparseflash.layout.cache_demand import replay_misses  # noqa: E402
from sparseflash.layout.schema_cache import EVICTION_DECAY, EVICTION_WINDOW, PROBATION_USES  # noqa: E402
from sparseflash.model.perplexity import windows  # noqa: E402
from sparseflash.runtime.diskprobe import device_model_for  # noqa: E402
from sparseflash.runtime.layout_model import open_layout  # noqa: E402

WARMUP = 128
GRID = {"window": (1, 4, 8), "decay": (0.97, 0.99, 0.995, 0.999), "probation": (0.0, 2.0, 4.0)}


def mask(trace: list[np.ndarray], n_hot: int, neurons: int) -> np.ndarray:
    """(tokens, neurons) bool of the non-hot positions of a layer's trace (the hot region is pinned)."""
    out = np.zeros((len(trace), neurons), dtype=bool)
    for t, p in enumerate(trace):
        p = np.asarray(p, dtype=np.int64)
        out[t, p[p >= n_hot]] = True
    return out


def rule(active: np.ndarray, slots: int, window: int, decay: float, probation: float) -> float:
    """Fetched a token through the frequency rule, after the warm-up (the cache demand's own replay)."""
    return replay_misses(active, slots, window, decay, WARMUP, probation)


def belady(trace: list[np.ndarray], n_hot: int, slots: int) -> float:
    misses = simulate_layer(trace, n_hot, slots, "belady")[WARMUP:]
    return sum(len(m) for m in misses) / max(len(misses), 1)


def sweep(path: str, corpus: str, tokens: int, ctx: int, skip: int | None, budgets: list[str]) -> dict:
    lm = open_layout(path, with_ffn=True)
    try:
        gate = lm.header.predictors.gate if lm.header.predictors is not None else None
        ids, skipped, note = eval_ids(corpus, lm.tokenizer, tokens, ctx, skip, gate)
        if note:
            print(note, file=sys.stderr)
        seqs = windows(ids, ctx, tokens)
        _, _, oracle = _dense_pass(lm, seqs)
        n_hot = [r.n_hot for r in lm.file.layers]
        neurons = lm.config.intermediate_size
    finally:
        lm.close()
    default = (EVICTION_WINDOW, EVICTION_DECAY, PROBATION_USES)
    out = {"layout": path, "corpus": corpus, "tokens": int(seqs.numel()), "skipped_tokens": skipped, "budgets": {}}
    for budget in budgets:
        _, stats, memory, trace, _ = streamed_pass(path, budget, seqs, device_model_for(path), True, budget,
                                                   lookahead=False)
        layers = []
        for l, slots in enumerate(memory.layer_slots):
            run = mask(trace[l], n_hot[l], neurons)
            true = mask(oracle[l], n_hot[l], neurons)
            by_setting = {s: rule(run, slots, *s) for s in itertools.product(*GRID.values())}  # holds the default
            grid = sorted((f, *s) for s, f in by_setting.items())
            layers.append({"slots": int(slots), "run_rule": by_setting[default],
                           "run_belady": belady(trace[l], n_hot[l], slots),
                           "true_rule": rule(true, slots, *default), "true_belady": belady(oracle[l], n_hot[l], slots),
                           "best": [dict(zip(("fetched", *GRID), g)) for g in grid[:3]]})
        fetched = sum(s.misses + s.prefetched for s in stats) / seqs.numel()
        out["budgets"][budget] = {"run_fetched": fetched, "layers": layers}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--skip", type=int, default=None, help="leading tokens left out (default: the gate's, as io-report)")
    ap.add_argument("--budgets", default="25%ffn,50%ffn")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    a = ap.parse_args()
    r = sweep(a.layout, a.corpus, a.tokens, a.ctx, a.skip, [b.strip() for b in a.budgets.split(",")])
    print(f"{r['tokens']} tokens after the first {r['skipped_tokens']}; default rule: window {EVICTION_WINDOW}, "
          f"decay {EVICTION_DECAY}, probation below {PROBATION_USES:g} uses")
    for budget, b in r["budgets"].items():
        print(f"\n{budget}: the run fetched {b['run_fetched']:.2f} a token")
        print("| layer | slots | run trace: rule | Belady | true sets: rule | Belady | best settings on the run trace "
              "(fetched, window, decay, probation) |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for l, x in enumerate(b["layers"]):
            best = "; ".join(f"{g['fetched']:.2f} ({g['window']}, {g['decay']}, {g['probation']:g})" for g in x["best"])
            print(f"| {l} | {x['slots']} | {x['run_rule']:.2f} | {x['run_belady']:.2f} | {x['true_rule']:.2f} | "
                  f"{x['true_belady']:.2f} | {best} |")
        tot = {k: sum(x[k] for x in b["layers"]) for k in ("run_rule", "run_belady", "true_rule", "true_belady")}
        print(f"| all | | {tot['run_rule']:.2f} | {tot['run_belady']:.2f} | {tot['true_rule']:.2f} | "
              f"{tot['true_belady']:.2f} | best per layer: {sum(x['best'][0]['fetched'] for x in b['layers']):.2f} |")
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
