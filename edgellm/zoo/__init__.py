"""Built-in reference models for edgellm.

Each zoo entry is a module exposing ``DESCRIPTION`` and ``build() -> ZooModel``.
Modules are imported lazily so that listing the zoo (e.g. ``edgellm zoo``)
does not pay for importing torch or loading weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ZOO: dict[str, str] = {
    "kws-cnn": "edgellm.zoo.kws_cnn",
    "mobilenet-v2": "edgellm.zoo.mobilenet_v2",
    "minilm": "edgellm.zoo.minilm",
}


@dataclass
class ZooModel:
    """A ready-to-export model with deterministic example inputs.

    ``inputs`` is ordered like ``module.forward``'s positional arguments and
    keyed by their names, with static batch-1 shapes.
    """

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output_names: list[str]
    description: str
    weights: str


def names() -> list[str]:
    return list(ZOO)


def _module(name: str):
    if name not in ZOO:
        raise KeyError(name)
    return importlib.import_module(ZOO[name])


def describe(name: str) -> str:
    return _module(name).DESCRIPTION


def build(name: str) -> ZooModel:
    return _module(name).build()
