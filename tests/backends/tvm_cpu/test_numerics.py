"""Numerics of small torch models compiled with edgellm's TVM CPU pipeline vs torch fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_cpu_helpers import AVX2, check_close, randomize_bn

torch.manual_seed(0)


class MatmulBiasGelu(nn.Module):
    def __init__(self, k=96, n=160):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return F.gelu(self.fc(x))


class ConvBnRelu(nn.Module):
    def __init__(self, cin=16, cout=32, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 1, bias=True)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return F.relu(self.conv2(y) + y)


class Depthwise(nn.Module):
    def __init__(self, c=32, stride=1):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu6(self.bn(self.dw(x)))


class Attention(nn.Module):
    def __init__(self, d=64, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(b, s, self.h, -1).transpose(1, 2)
        k = k.view(b, s, self.h, -1).transpose(1, 2)
        v = v.view(b, s, self.h, -1).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, dim=-1) @ v
        return self.ln(x + self.o(a.transpose(1, 2).reshape(b, s, d)))


class AvgPoolLinear(nn.Module):
    def __init__(self, c=32, n=10):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        y = F.avg_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_matmul_bias_gelu():
    check_close(MatmulBiasGelu(), torch.randn(2, 24, 96))


def test_matmul_odd_shapes():
    # N = 100 is not a multiple of 16 lanes, M = 7 is prime
    check_close(MatmulBiasGelu(k=33, n=100), torch.randn(7, 33))


def test_conv_bn_relu():
    check_close(randomize_bn(ConvBnRelu()), torch.randn(1, 16, 20, 20))


def test_conv_stride2():
    check_close(randomize_bn(ConvBnRelu(cin=8, cout=48, stride=2)), torch.randn(1, 8, 28, 28))


def test_depthwise():
    check_close(randomize_bn(Depthwise()), torch.randn(1, 32, 28, 28))


def test_depthwise_stride2():
    check_close(randomize_bn(Depthwise(c=48, stride=2)), torch.randn(1, 48, 14, 14))


def test_attention_softmax_layernorm():
    check_close(Attention(), torch.randn(1, 32, 64))


def test_avgpool_linear():
    check_close(AvgPoolLinear(), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("target", [AVX2], ids=["avx2"])
def test_avx2_target(target):
    check_close(Attention(), torch.randn(1, 16, 64), target)
    check_close(randomize_bn(ConvBnRelu()), torch.randn(1, 16, 12, 12), target)


class PointwiseStack(nn.Module):
    """1x1 convs (stride 1: rewritten as matmul; stride 2: a conv) with bias, residual, ReLU6."""

    def __init__(self, c=24, e=96):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1)
        self.project = nn.Conv2d(e, c, 1)
        self.down = nn.Conv2d(c, 2 * c, 1, stride=2)

    def forward(self, x):
        y = x + self.project(F.relu6(self.expand(x)))
        return self.down(y)


def test_pointwise_convs():
    check_close(PointwiseStack(), torch.randn(1, 24, 14, 14))


@pytest.mark.parametrize("c,hw,stride", [(64, (25, 20), 1), (16, (13, 13), 1), (48, (7, 7), 2), (40, (9, 11), 2),
                                         (8, (5, 3), 1)],
                         ids=["kws", "prime-w", "7x7-s2", "c40-odd", "c8-tiny"])
def test_depthwise_shapes(c, hw, stride):
    check_close(randomize_bn(Depthwise(c=c, stride=stride)), torch.randn(1, c, *hw))


def test_unpadded_conv():
    # padding 0: legalization's zero-width pad copy is inlined into the conv
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=0), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=0))
    check_close(model, torch.randn(1, 16, 17, 17))


@pytest.mark.parametrize("target", [AVX2, None], ids=["avx2", "host"])
def test_packed_weight_matmul_and_conv(target):
    """Shapes whose weights go through the packed-panel path (matmul 1024-wide, conv 7x7 / 14x14 with 256-512
    channels, a residual epilogue) match torch."""
    check_close(nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 384)), torch.randn(96, 512), target)
    conv = nn.Sequential(nn.Conv2d(256, 512, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1))
    check_close(conv, torch.randn(1, 256, 14, 14) * 0.1, target)


class PaddedPools(nn.Module):
    """A ResNet stem's 3x3 stride-2 max pool with padding, and padded average pools (the pad is inlined into the
    window reads: -inf / 0 outside, and the divisor with or without the padded taps)."""

    def __init__(self, c=32):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x)) - 0.5  # negatives: a max pool that padded with 0 would show
        return torch.cat([F.max_pool2d(y, 3, 2, 1), F.avg_pool2d(y, 3, 2, 1),
                          F.avg_pool2d(y, 3, 2, 1, count_include_pad=False)], dim=1)


def test_padded_pools():
    check_close(PaddedPools(), torch.randn(1, 3, 28, 27))
