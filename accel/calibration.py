"""TeaCache's rescaling polynomial: fitting it from observed steps, saving and loading it (torch-free).

TeaCache accumulates `poly(x)` over steps, where x is the relative L1 change of block 0's modulated input
and `poly` maps it onto the relative change of what the skipped blocks would have produced. The paper fits
`poly` per model; nobody has for Kandinsky 5, so `k5serve calibrate teacache` records (x, y) on the real
weights (y: the relative L1 change of the visual-block residual, the thing a reused step copies) and fits a
degree-4 polynomial, as the TeaCache authors do (`numpy.polyfit`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEGREE = 4


def fit_teacache(xs: Sequence[float], ys: Sequence[float], degree: int = DEGREE) -> dict:
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} (x, y) samples to fit a degree-{degree} polynomial, got {len(x)}")
    coefficients = np.polyfit(x, y, degree)
    fitted = np.polyval(coefficients, x)
    return {
        "method": "teacache",
        "coefficients": [float(c) for c in coefficients],  # highest degree first (numpy.polyval)
        "samples": int(len(x)),
        "rmse": float(np.sqrt(np.mean((fitted - y) ** 2))),
        "identity_rmse": float(np.sqrt(np.mean((x - y) ** 2))),  # the uncalibrated default, for comparison
        "x_range": [float(x.min()), float(x.max())],
        "y_mean": float(y.mean()),
    }


def load_coefficients(path: str | Path) -> tuple[float, ...]:
    data = json.loads(Path(path).read_text())
    coefficients = data["coefficients"] if isinstance(data, dict) else data
    if not (isinstance(coefficients, list) and coefficients and all(isinstance(c, (int, float)) for c in coefficients)):
        raise ValueError(f"{path}: expected {{'coefficients': [numbers]}} as written by `k5serve calibrate teacache`")
    return tuple(float(c) for c in coefficients)
