"""Does a reconstruction-error curve have an elbow? A documented test on log-log slopes.

An error curve y(x) (FVU against L0, or against dictionary size) is read on log-log axes, where a
power law y = c * x^a is a straight line of slope a. Between consecutive points the slope is
s_i = (log y_{i+1} - log y_i) / (log x_{i+1} - log x_i); its change at interior point i,
c_i = s_i - s_{i-1}, is the second difference of log-error per unit of log x. An elbow is a point
past which extra sparsity budget (or latents) suddenly buys much less: the curve falls steeply,
then flattens. Point i is an elbow when both

- c_i >= min_slope_change (default 0.5: the slope rises by half a decade of error per decade of x), and
- |s_i| <= flatten_ratio * |s_{i-1}| (default 0.5: the descent at least halves), with s_{i-1} < 0.

The reported elbow is the interior point with the largest c_i among those that pass. A pure power
law (constant slope) never passes; a curve that steepens (c_i < 0) never passes either.
"""
from __future__ import annotations

import math

import numpy as np


def log_slopes(x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points sorted by x -> (x [m], y [m], slopes [m-1]) on log-log axes.

    x, y: sequences of positive finite numbers of equal length m >= 2; equal x values are averaged
    (their mean log y), so repeated settings do not produce infinite slopes.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x has {x.size} points but y has {y.size}")
    for name, values in (("x", x), ("y", y)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"{name} must hold positive finite numbers (log-log axes), got {values.tolist()}")
    unique_x = np.unique(x)
    if unique_x.size < 2:
        raise ValueError(f"x needs at least 2 distinct values, got {x.tolist()}")
    mean_log_y = np.array([np.log(y[x == value]).mean() for value in unique_x])
    slopes = np.diff(mean_log_y) / np.diff(np.log(unique_x))
    return unique_x, np.exp(mean_log_y), slopes


def find_elbow(x, y, min_slope_change: float = 0.5, flatten_ratio: float = 0.5) -> dict:
    """The elbow test of this module's docstring on the curve y(x).

    Returns {"elbow": bool, "at": x of the elbow or None, "slopes": [m-1], "slope_changes": [m-2],
    "max_slope_change": float or None, "points": m, "testable": m >= 3}. With fewer than 3
    distinct x values there is no interior point: "elbow" is False and "testable" False.
    """
    if not (isinstance(min_slope_change, (int, float)) and math.isfinite(min_slope_change) and min_slope_change > 0):
        raise ValueError(f"min_slope_change must be a positive number, got {min_slope_change!r}")
    if not (isinstance(flatten_ratio, (int, float)) and 0 < flatten_ratio < 1):
        raise ValueError(f"flatten_ratio must be in (0, 1), got {flatten_ratio!r}")
    xs, _, slopes = log_slopes(x, y)
    changes = np.diff(slopes)
    passing = [i for i, change in enumerate(changes)
               if change >= min_slope_change and slopes[i] < 0 and abs(slopes[i + 1]) <= flatten_ratio * abs(slopes[i])]
    best = max(passing, key=lambda i: changes[i]) if passing else None
    return {"elbow": best is not None, "at": float(xs[best + 1]) if best is not None else None,
            "slopes": [float(s) for s in slopes], "slope_changes": [float(c) for c in changes],
            "max_slope_change": float(changes.max()) if changes.size else None,
            "points": int(xs.size), "testable": bool(xs.size >= 3)}
