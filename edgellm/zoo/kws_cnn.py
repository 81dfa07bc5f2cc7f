"""DS-CNN keyword spotter (Zhang et al. 2017, "Hello Edge: Keyword Spotting on
Microcontrollers", size S) over log-mel features of 1 s of audio."""

from __future__ import annotations

import torch
from torch import nn

from edgellm.zoo import ZooModel
from edgellm.zoo._seeded import randomize_batchnorm, seeded

DESCRIPTION = "DS-CNN-S keyword spotter: log-mel [1,1,49,40] -> 12 classes (Hello Edge), random weights"

FRAMES, MEL_BINS, NUM_CLASSES, CHANNELS, NUM_BLOCKS = 49, 40, 12, 64, 4


def _conv_bn_relu(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DSCNN(nn.Module):
    """Conv 10x4/2 -> 4 x (depthwise 3x3 + pointwise 1x1) -> global avg pool -> linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, channels: int = CHANNELS, num_blocks: int = NUM_BLOCKS):
        super().__init__()
        # Padding (5, 1) reproduces TF "SAME" output size: 49x40 -> 25x20.
        layers = [_conv_bn_relu(1, channels, (10, 4), stride=2, padding=(5, 1))]
        for _ in range(num_blocks):
            layers.append(_conv_bn_relu(channels, channels, 3, padding=1, groups=channels))
            layers.append(_conv_bn_relu(channels, channels, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.features(features)
        return self.classifier(x.mean(dim=(2, 3)))


def build() -> ZooModel:
    with seeded(0):
        module = DSCNN()
        randomize_batchnorm(module)
        # Standardized log-mel features (zero mean, unit variance per bin), at half precision
        # so the package's reference sample is stored in half the bytes.
        features = torch.randn(1, 1, FRAMES, MEL_BINS).half().float()
    return ZooModel(
        module=module.eval(),
        inputs={"features": features},
        output_names=["logits"],
        description=DESCRIPTION,
        weights="random (seed 0)",
    )
