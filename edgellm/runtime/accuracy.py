"""One set of agreement statistics, used by builds, tests, verify and benchmarks alike."""

from __future__ import annotations

import numpy as np


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far ``candidate`` is from ``reference``.

    ``rel_max_abs`` is max|a-b| / max(1, max|a|): an error relative to the output's scale,
    the figure tolerances are stated in. SQNR in dB; cosine over the flattened tensors;
    ``top1`` is the argmax agreement over the last axis (meaningful for classifiers).
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref**2))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    stats = {
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "rel_max_abs": max_abs / scale,
        "scale": float(np.abs(ref).max()) if ref.size else 0.0,  # max|reference|: below 1, rel_max_abs is an absolute error
        "cosine": float(np.dot(ref.ravel(), got.ravel()) / norms) if norms else 1.0,
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise > 0 else None,  # None: identical
    }
    if ref.ndim >= 1 and ref.shape[-1] > 1:
        stats["top1"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return stats
