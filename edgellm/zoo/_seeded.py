"""Deterministic random weights for zoo models that ship without trained weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Seed torch's global RNG for the block, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_batchnorm(module: nn.Module) -> None:
    """Give every BatchNorm random running statistics (from the current RNG).

    Fresh BatchNorm layers have mean 0 / var 1, which makes them (nearly) an
    identity in eval mode; random statistics keep BN folding and numerics
    honest. Set directly instead of calibrated on data so the values are
    bit-identical regardless of thread count.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
