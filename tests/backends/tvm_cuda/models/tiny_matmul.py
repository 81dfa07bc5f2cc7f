"""A tiny matmul model (batched matmul + linear + softmax): GEMM, GEMV and reduction kernels."""

import torch


class TinyMatmul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 48) * 0.1)
        self.fc = torch.nn.Linear(48, 16)

    def forward(self, x):
        return torch.softmax(self.fc(torch.relu(x @ self.w)), dim=-1)


def build():
    torch.manual_seed(1)
    return TinyMatmul().eval(), (torch.randn(2, 8, 64),)
