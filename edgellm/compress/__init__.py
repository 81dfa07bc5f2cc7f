"""Compression that pays: structured/unstructured pruning, int8 quantization, and the accuracy checks around them.

- ``calibration``: load calibration / evaluation samples (a folder of .npy/.npz, one .npz, or "random") and split them.
- ``prune``: structured pruning with torch-pruning (channels, FFN units, attention heads) or magnitude sparsity.
- ``quantize``: int8 with NNCF for the OpenVINO backend (static PTQ, or weight-only), and ``int8_share``.
- ``evaluate``: agreement of a compressed model with the fp32 one on held-out samples, and the ``--max-drop`` check.

Heavy imports (torch, torch-pruning, NNCF, OpenVINO) happen inside the functions that need them.
"""

from __future__ import annotations

from edgellm.compress.calibration import load_samples, split
from edgellm.compress.evaluate import check_drop, evaluate

__all__ = ["check_drop", "evaluate", "load_samples", "split"]
