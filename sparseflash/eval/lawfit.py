"""Least-squares fits of the Sparsing Law's activation-ratio laws, in plain numpy.

Forms (A: activation ratio = 1 - sparsity; D: training tokens / ``tokens_unit``):
- ``logspace`` (ReLU family): ``A(D) = exp(-c * D**alpha + b) + A0``; log(A - A0) is a power law in D.
- ``power`` (SiLU / GELU): ``A(D) = -c * D**(-alpha) + A0``; with c, alpha > 0 it rises to A0.
- ``hinge`` (width/depth): two line segments that meet at a breakpoint (the bottleneck).

The laws are fitted by ordinary least squares on A itself, as the paper does (scipy's curve_fit,
i.e. Levenberg–Marquardt, on activation ratio vs tokens): here a damped Gauss-Newton
(Levenberg–Marquardt) run from several starting points, the lowest residual kept. Standard errors
are ``sqrt(diag(s2 * inv(J^T J)))`` at the optimum, ``s2 = RSS / (n - k)``; R² = 1 - RSS / TSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparseflash.errors import SparseflashError

FORMS = ("logspace", "power")
PARAMS = {"logspace": ("c", "alpha", "b", "A0"), "power": ("c", "alpha", "A0")}
FORMULAS = {"logspace": "A(D) = exp(-c*D^alpha + b) + A0", "power": "A(D) = -c*D^(-alpha) + A0"}
HINGE_PARAMS = ("breakpoint", "ratio_at_breakpoint", "slope_below", "slope_above")


def logspace_law(d, c, alpha, b, a0):
    """Decreasing logspace power law (ReLU family), D in ``tokens_unit``."""
    return np.exp(-c * d**alpha + b) + a0


def power_law(d, c, alpha, a0):
    """Convergent power law (SiLU / GELU), D in ``tokens_unit``."""
    return -c * d ** (-alpha) + a0


def _logspace_jac(d, c, alpha, b, a0):
    da = d**alpha
    e = np.exp(-c * da + b)
    return np.stack([-da * e, -c * da * np.log(d) * e, e, np.ones_like(d)], axis=1)


def _power_jac(d, c, alpha, a0):
    dn = d ** (-alpha)
    return np.stack([-dn, c * dn * np.log(d), np.ones_like(d)], axis=1)


_MODELS = {"logspace": (logspace_law, _logspace_jac), "power": (power_law, _power_jac)}


def min_points(form: str) -> int:
    """Fewest points a fit of ``form`` accepts: its parameters + 1 (one degree of freedom for the error)."""
    return (len(HINGE_PARAMS) if form == "hinge" else len(PARAMS[form])) + 1


def tokens_unit(max_tokens: float) -> float:
    """Unit of D: 1e9 (the paper's billions) down to 1e3 tokens, whichever keeps D around 1..1000."""
    for unit in (1e9, 1e6, 1e3):
        if max_tokens >= unit:
            return unit
    return 1.0


@dataclass(frozen=True)
class LawFit:
    """A fitted activation-ratio law. ``stderr`` entries (and ``covariance``) are None where J^T J is singular."""

    form: str
    params: dict[str, float]
    stderr: dict[str, float | None]
    tokens_unit: float
    r2: float | None
    rmse: float
    points: int
    covariance: list[list[float]] | None = None  # of the parameters, in PARAMS[form] order

    def limit(self) -> tuple[float | None, float | None]:
        """(value, standard error) of the activation ratio as D -> infinity; (None, None) if the law diverges.

        A0 when the law converges to it (power: alpha > 0; logspace: alpha > 0, c >= 0); a logspace law
        with alpha < 0 converges to exp(b) + A0 instead. The error is propagated from the covariance.
        """
        p, names = self.params, PARAMS[self.form]
        grad = np.zeros(len(names))
        grad[names.index("A0")] = 1.0
        if p["alpha"] > 0 and (self.form == "power" or p["c"] >= 0):
            value = p["A0"]
        elif self.form == "logspace" and p["alpha"] < 0:
            value = math.exp(p["b"]) + p["A0"] if p["b"] < 700 else math.inf
            grad[names.index("b")] = math.exp(min(p["b"], 700))
        else:
            return None, None
        if self.covariance is None or not math.isfinite(value):
            return (value if math.isfinite(value) else None), None
        var = float(grad @ np.asarray(self.covariance) @ grad)
        return value, (math.sqrt(var) if var >= 0 and math.isfinite(var) else None)

    @property
    def limit_ratio(self) -> float | None:
        """The activation ratio the law converges to as D -> infinity (usually A0); None if it diverges."""
        return self.limit()[0]

    def predict(self, tokens) -> np.ndarray:
        """Activation ratio at ``tokens`` (raw token counts)."""
        d = np.asarray(tokens, dtype=np.float64) / self.tokens_unit
        with np.errstate(all="ignore"):
            return _MODELS[self.form][0](d, *(self.params[k] for k in PARAMS[self.form]))

    @classmethod
    def from_dict(cls, d: dict) -> LawFit:
        """The fit back from ``to_dict`` (trend.json)."""
        return cls(d["form"], d["params"], d["stderr"], d["tokens_unit"], d["r2"], d["rmse"], d["points"],
                   d.get("covariance"))

    @property
    def note(self) -> str | None:
        """Why the parameters may read oddly: a logspace fit that slid to its alpha -> 0 limit."""
        p = self.params
        if self.form == "logspace" and abs(p["alpha"]) < 0.05 and abs(p["c"]) > 20:
            # exp(-c D^alpha + b) -> exp(b - c) D^(-c alpha) as alpha -> 0 with c alpha fixed
            return (f"alpha -> 0 limit: A = A0 + exp(b - c) * D^(-c*alpha), a plain power law with exponent "
                    f"c*alpha = {p['c'] * p['alpha']:.3g}; c, alpha and b are not separately determined")
        if any(v is None for v in self.stderr.values()):
            return "J^T J is singular at the optimum: the parameters are not separately determined by this series"
        return None

    def to_dict(self) -> dict:
        return {"form": self.form, "formula": FORMULAS[self.form], "tokens_unit": self.tokens_unit,
                "params": dict(self.params), "stderr": dict(self.stderr), "limit_ratio": self.limit()[0],
                "limit_ratio_stderr": self.limit()[1], "r2": self.r2, "rmse": self.rmse, "points": self.points,
                "note": self.note, "covariance": self.covariance}


def levenberg_marquardt(model, jac, p0, x: np.ndarray, y: np.ndarray, max_iter: int = 400) -> tuple[np.ndarray, float]:
    """Minimise sum((model(x, *p) - y)**2) from p0. Returns (p, residual sum of squares)."""
    p = np.asarray(p0, dtype=np.float64)
    with np.errstate(all="ignore"):
        r = model(x, *p) - y
        cost = float(r @ r)
    if not np.isfinite(cost):
        return p, math.inf
    lam = 1e-3
    for _ in range(max_iter):
        with np.errstate(all="ignore"):
            j = jac(x, *p)  # (points, params)
        if not np.all(np.isfinite(j)):
            break
        with np.errstate(all="ignore"):
            h, g = j.T @ j, j.T @ r
        scale = np.maximum(np.diag(h), 1e-12)
        accepted = False
        while lam < 1e14:
            try:
                step = np.linalg.solve(h + lam * np.diag(scale), -g)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            with np.errstate(all="ignore"):
                r_new = model(x, *(p + step)) - y
                new_cost = float(r_new @ r_new)
            if np.isfinite(new_cost) and new_cost < cost:
                done = cost - new_cost <= 1e-13 * cost
                p, r, cost = p + step, r_new, new_cost
                lam = max(lam / 10, 1e-15)
                accepted = True
                break
            lam *= 10
        if not accepted or done:
            break
    return p, cost


def _starts(form: str, d: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Starting points: for a grid of A0 outside the data (and of alpha, for logspace), the
    linearised law solved by linear least squares."""
    span = float(y.max() - y.min()) or 1e-3 * max(abs(float(y.mean())), 1e-3)
    offsets = span * np.array([0.01, 0.05, 0.2, 0.5, 1.0, 3.0])
    below, above = y.min() - offsets, y.max() + offsets
    starts = []
    if form == "power":  # log|A - A0| = log|c| - alpha log D
        for a0 in np.concatenate([below, above]):
            sign = np.sign(y.max() - a0)
            slope, intercept = np.polyfit(np.log(d), np.log(np.abs(y - a0)), 1)
            starts.append(np.array([-sign * math.exp(intercept), -slope, a0]))
    else:  # log(A - A0) = b - c D^alpha
        for a0 in below:
            z = np.log(y - a0)
            for alpha in (-1.0, -0.3, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5):
                slope, intercept = np.polyfit(d**alpha, z, 1)
                starts.append(np.array([-slope, alpha, intercept, a0]))
    return starts


def _covariance(j: np.ndarray, rss: float, n: int) -> np.ndarray | None:
    """Parameter covariance s2 (J^T J)^-1, s2 = RSS / (n - k); None where J^T J is singular."""
    k = j.shape[1]
    with np.errstate(all="ignore"):
        h = j.T @ j
        if not np.all(np.isfinite(h)) or np.linalg.cond(h) > 1e14:
            return None
        return np.linalg.inv(h) * (rss / (n - k))


def _stderr(cov: np.ndarray | None, k: int) -> list[float | None]:
    if cov is None:
        return [None] * k
    return [_finite(math.sqrt(v)) if v >= 0 else None for v in np.diag(cov)]


def _r2(rss: float, y: np.ndarray) -> float | None:
    tss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - rss / tss if tss > 0 else None


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _check_series(x, y, form: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise SparseflashError(f"{what} and activation ratios must be two lists of one length, got {x.shape} and {y.shape}")
    if len(x) < min_points(form):
        raise SparseflashError(f"a {form} fit needs at least {min_points(form)} points "
                               f"({min_points(form) - 1} parameters + 1), got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise SparseflashError(f"{what} and activation ratios must be finite numbers")
    return x, y


def fit_law(tokens, ratio, form: str) -> LawFit:
    """Least-squares fit of ``form`` ('logspace' or 'power') to activation ratio vs training tokens."""
    if form not in FORMS:
        raise SparseflashError(f"unknown law form {form!r} (known: {', '.join(FORMS)})")
    x, y = _check_series(tokens, ratio, form, "token counts")
    if np.any(x <= 0):
        raise SparseflashError("token counts must be > 0 for a power-law fit")
    unit = tokens_unit(float(x.max()))
    d = x / unit
    model, jac = _MODELS[form]
    scored = []
    for p0 in _starts(form, d, y):
        with np.errstate(all="ignore"):
            r = model(d, *p0) - y
            cost = float(r @ r)
        if np.isfinite(cost):
            scored.append((cost, p0))
    scored.sort(key=lambda t: t[0])
    best, best_cost = None, math.inf
    for _, p0 in scored[:8]:  # polish the most promising starts
        p, cost = levenberg_marquardt(model, jac, p0, d, y)
        if cost < best_cost:
            best, best_cost = p, cost
    if best is None:
        raise SparseflashError(f"the {form} fit found no finite solution for this series")
    with np.errstate(all="ignore"):
        cov = _covariance(jac(d, *best), best_cost, len(d))
    names = PARAMS[form]
    return LawFit(form=form, params={k: float(v) for k, v in zip(names, best)},
                  stderr=dict(zip(names, _stderr(cov, len(names)))), tokens_unit=unit,
                  r2=_r2(best_cost, y), rmse=math.sqrt(best_cost / len(d)), points=len(d),
                  covariance=None if cov is None else cov.tolist())


@dataclass(frozen=True)
class HingeFit:
    """Two-segment continuous piecewise-linear fit; the breakpoint is the bottleneck."""

    params: dict[str, float]
    stderr: dict[str, float | None]
    r2: float | None
    rmse: float
    points: int

    @property
    def breakpoint(self) -> float:
        return self.params["breakpoint"]

    def predict(self, x) -> np.ndarray:
        p = self.params
        dx = np.asarray(x, dtype=np.float64) - p["breakpoint"]
        return p["ratio_at_breakpoint"] + p["slope_below"] * np.minimum(dx, 0) + p["slope_above"] * np.maximum(dx, 0)

    def to_dict(self) -> dict:
        return {"form": "hinge", "formula": "A(x) = A_b + s_below*min(x - x_b, 0) + s_above*max(x - x_b, 0)",
                "params": dict(self.params), "stderr": dict(self.stderr), "bottleneck": self.breakpoint,
                "r2": self.r2, "rmse": self.rmse, "points": self.points}


def fit_hinge(x, y, grid: int = 2001) -> HingeFit:
    """Piecewise-linear fit of y vs x: a grid over the breakpoint (between the second and the
    second-to-last x, so each segment spans two points), linear least squares for the rest."""
    x, y = _check_series(x, y, "hinge", "width/depth ratios")
    xs = np.unique(x)
    if len(xs) < min_points("hinge"):
        raise SparseflashError(f"a hinge fit needs at least {min_points('hinge')} distinct x values, got {len(xs)}")
    candidates = np.unique(np.concatenate([np.linspace(xs[1], xs[-2], grid), xs[1:-1]]))
    best = (math.inf, 0.0, None)
    for bp in candidates:
        design = np.stack([np.ones_like(x), np.minimum(x - bp, 0), np.maximum(x - bp, 0)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        rss = float(((design @ coef - y) ** 2).sum())
        if rss < best[0]:
            best = (rss, float(bp), coef)
    rss, bp, (a_b, s1, s2) = best
    jac = np.stack([np.where(x < bp, -s1, -s2), np.ones_like(x), np.minimum(x - bp, 0), np.maximum(x - bp, 0)], axis=1)
    err = _stderr(_covariance(jac, rss, len(x)), len(HINGE_PARAMS))
    values = (bp, float(a_b), float(s1), float(s2))
    return HingeFit(params=dict(zip(HINGE_PARAMS, values)), stderr=dict(zip(HINGE_PARAMS, err)),
                    r2=_r2(rss, y), rmse=math.sqrt(rss / len(x)), points=len(x))
