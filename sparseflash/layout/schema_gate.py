"""The quality-gate record of a model layout's header (``header.predictors.gate``, written by
layout/quality_gate.decide_gate), checked field by field when read: docs/layout-format.md."""

from __future__ import annotations

from .schema_check import REBUILD, _Check

GATE_KEYS = ("strategy", "own_strategy", "fallback", "max_rise_pct", "ppl_dense", "ppl", "rise_pct",
             "predicted_share", "heldout_tokens", "ppl_p", "ppl_p_sparsity", "min_sparsity", "too_dense")
# cost-aware selection (optional: newer)
GATE_MISS_KEYS = ("heldout_hash", "miss_recalls", "miss_rise_pct", "miss_recall", "miss_share", "cached_share", "miss_larger",
                  "miss_layer_recalls", "miss_layer_rise_pct")
LARGER_KEYS = ("share", "miss_rise_pct", "miss_recall", "miss_layer_recalls", "miss_layer_rise_pct")


def kept_cut(record: dict) -> tuple[str, float] | None:
    """(label, validated rise %) of the miss cut a gate record (the gate, or one of its ``miss_larger``
    entries) kept: one recall ("0.97") or one per layer ("0.99/0.9/0.9/0.96"); None when it kept none."""
    layers = record.get("miss_layer_recalls")
    if layers:
        return "/".join(f"{v:g}" for v in layers), float(record["miss_layer_rise_pct"])
    r = record.get("miss_recall")
    return None if r is None else (f"{r:g}", float(record["miss_rise_pct"][f"{r:g}"]))


def read_gate(c: _Check, gate, strategies: tuple[str, ...]) -> None:
    """prepare's quality-gate record (layout/quality_gate.decide_gate): every field `run` and `inspect`
    print is checked here, so a lying header is one error line, not a crash when it is shown."""
    where = "header.predictors.gate"
    c.object(gate, where, GATE_KEYS + GATE_MISS_KEYS, optional=GATE_MISS_KEYS)
    chosen = c.str(gate["strategy"], f"{where}.strategy", (*strategies, "all"))
    c.str(gate["own_strategy"], f"{where}.own_strategy", strategies)
    for key in ("fallback", "too_dense"):
        if type(gate[key]) is not bool:
            c.fail(f"{where}.{key}", "must be true or false", gate[key])
    for key in ("max_rise_pct", "ppl_p", "ppl_p_sparsity", "min_sparsity"):
        c.number(gate[key], f"{where}.{key}")
    if c.number(gate["ppl_dense"], f"{where}.ppl_dense") <= 0:
        c.fail(f"{where}.ppl_dense", "must be positive", gate["ppl_dense"])
    c.int(gate["heldout_tokens"], f"{where}.heldout_tokens")
    if "heldout_hash" in gate:
        c.str(gate["heldout_hash"], f"{where}.heldout_hash")
    for key in ("ppl", "rise_pct", "predicted_share"):
        table = c.object(gate[key], f"{where}.{key}")
        for s, v in table.items():
            c.str(s, f"{where}.{key} key", strategies)
            c.number(v, f"{where}.{key}.{s}")
    if chosen != "all" and chosen not in gate["rise_pct"]:
        c.fail(f"{where}.rise_pct.{chosen}", f"is missing (the chosen strategy's rise); {REBUILD}")
    recalls = gate.get("miss_recalls", [])
    if not isinstance(recalls, list):
        c.fail(f"{where}.miss_recalls", "must be a list", type(recalls).__name__)
    for i, r in enumerate(recalls):
        c.number(r, f"{where}.miss_recalls[{i}]")
    rises = c.object(gate.get("miss_rise_pct", {}), f"{where}.miss_rise_pct")
    for k, v in rises.items():
        c.number(v, f"{where}.miss_rise_pct.{k}")
    for key in ("miss_share", "cached_share"):
        if key in gate and not 0 <= c.number(gate[key], f"{where}.{key}") <= 1:
            c.fail(f"{where}.{key}", "must be in [0, 1]", gate[key])
    chosen_miss = gate.get("miss_recall")
    if chosen_miss is not None:
        c.number(chosen_miss, f"{where}.miss_recall")
        if f"{chosen_miss:g}" not in rises:
            c.fail(f"{where}.miss_rise_pct", f"has no entry for the chosen miss recall {chosen_miss:g}; {REBUILD}")
    _layer_recalls(c, gate, where, recalls)
    larger = gate.get("miss_larger", [])
    if not isinstance(larger, list):
        c.fail(f"{where}.miss_larger", "must be a list", type(larger).__name__)
    for i, entry in enumerate(larger):
        at = f"{where}.miss_larger[{i}]"
        c.object(entry, at, LARGER_KEYS, optional=LARGER_KEYS[3:])
        _layer_recalls(c, entry, at, recalls)
        if not 0 < c.number(entry["share"], f"{at}.share") <= 1:
            c.fail(f"{at}.share", "must be in (0, 1]", entry["share"])
        table = c.object(entry["miss_rise_pct"], f"{at}.miss_rise_pct")
        for k, v in table.items():
            c.number(v, f"{at}.miss_rise_pct.{k}")
        if entry["miss_recall"] is not None and f"{c.number(entry['miss_recall'], f'{at}.miss_recall'):g}" not in table:
            c.fail(f"{at}.miss_rise_pct", f"has no entry for the chosen miss recall; {REBUILD}")


def _layer_recalls(c: _Check, record: dict, where: str, recalls: list) -> None:
    """A per-layer miss-cut choice: one of the candidate recalls per layer, with its validated rise."""
    chosen = record.get("miss_layer_recalls")
    if chosen is None:
        return
    if not isinstance(chosen, list) or not chosen:
        c.fail(f"{where}.miss_layer_recalls", "must be a non-empty list or null", chosen)
    for i, r in enumerate(chosen):
        if c.number(r, f"{where}.miss_layer_recalls[{i}]") not in recalls:
            c.fail(f"{where}.miss_layer_recalls[{i}]", "is not one of miss_recalls", r)
    c.number(record.get("miss_layer_rise_pct"), f"{where}.miss_layer_rise_pct")
