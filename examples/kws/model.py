"""A user-supplied keyword-spotting model, as edgellm's CLI expects it.

`edgellm build examples/kws/model.py:build` imports this file and calls
``build()``, which returns ``(module, example_inputs)``. Only torch is needed
here; nothing from edgellm.
"""

import torch
from torch import nn

FRAMES, MEL_BINS, NUM_CLASSES = 49, 40, 12  # 1 s of audio as 49 frames x 40 log-mel bins


class TinyKWS(nn.Module):
    """Three conv stages with pooling, then a linear classifier (~5k parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(1, 8), stage(8, 16), stage(16, 24))
        self.head = nn.Linear(24, num_classes)

    def forward(self, features):
        return self.head(self.body(features).mean(dim=(2, 3)))


def build():
    """Seeded random weights and a random log-mel input; swap in your trained weights here."""
    with torch.random.fork_rng(devices=[]):  # deterministic without touching the caller's RNG
        torch.manual_seed(0)
        model = TinyKWS()
        example = torch.randn(1, 1, FRAMES, MEL_BINS)
    return model.eval(), (example,)
