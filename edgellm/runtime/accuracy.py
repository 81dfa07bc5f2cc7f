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


def meets(stats: dict[str, dict], contract: dict) -> tuple[bool, str | None]:
    """Whether outputs (``compare`` per output name) meet a package's accuracy contract, and the first
    problem when not: max error relative to the output scale; ``min_cosine``; outputs below unit scale
    keep ``small_scale_min_cosine`` (their relative error says nothing); ``top1_outputs`` agree at top-1."""
    name, worst = max(stats.items(), key=lambda kv: kv[1]["rel_max_abs"])
    if worst["rel_max_abs"] > contract["tolerance"]:
        return False, f"error {worst['rel_max_abs']:.3g} of the output scale > tolerance {contract['tolerance']:g} (output {name!r})"
    name, low = min(stats.items(), key=lambda kv: kv[1]["cosine"])
    if low["cosine"] < contract.get("min_cosine", -1.0):
        return False, f"cosine {low['cosine']:.5f} < {contract['min_cosine']} (output {name!r})"
    for name, s in stats.items():
        if 0 < s.get("scale", 1) < 1 and s["cosine"] < contract.get("small_scale_min_cosine", -1.0):
            return False, f"cosine {s['cosine']:.5f} < {contract['small_scale_min_cosine']} on output {name!r} (below unit scale)"
    for name in contract.get("top1_outputs", []):
        if name in stats and stats[name].get("top1", 1.0) < contract.get("min_top1", 1.0):
            return False, f"top-1 agreement {stats[name]['top1']:.0%} < {contract['min_top1']:.0%} on classifier output {name!r}"
    return True, None
