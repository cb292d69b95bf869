"""Field-by-field checks of a model layout's JSON header: each failure is one SchemaError line naming
the field (``header.predictors.gate.ppl``), the problem and the value. Used by layout/schema.py;
imports nothing from sparseflash but format_spec."""

from __future__ import annotations

import math

from .format_spec import LayoutError

REBUILD = "rebuild it with `sparseflash prepare` (or `sparseflash layout`)"


class SchemaError(LayoutError):
    """A layout file is a valid container but not a valid model layout of this schema version."""


class _Check:
    def __init__(self, path):
        self.path = path

    def fail(self, where: str, problem: str, value: object = ...):
        raise SchemaError(self.path, where, problem, value)

    def object(self, value, where: str, keys: tuple[str, ...] | None = None, optional: tuple[str, ...] = ()):
        if not isinstance(value, dict):
            self.fail(where, "must be a JSON object", type(value).__name__)
        if keys is not None:
            missing = [k for k in keys if k not in value and k not in optional]
            if missing:
                self.fail(f"{where}.{missing[0]}", f"is missing; {REBUILD}")
            unknown = sorted(set(value) - set(keys))
            if unknown:
                self.fail(f"{where}.{unknown[0]}", "unknown key (a newer sparseflash wrote this file?)")
        return value

    def int(self, value, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
        if type(value) is not int or not lo <= value <= hi:
            self.fail(where, f"must be an integer in [{lo}, {hi}]", value)
        return value

    def number(self, value, where: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            self.fail(where, "must be a finite number", value)
        return float(value)

    def str(self, value, where: str, allowed: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            self.fail(where, "must be a string" if allowed is None else f"must be one of {', '.join(allowed)}",
                      value)
        return value
