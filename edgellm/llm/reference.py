"""A numpy Llama-family decoder: the build-time reference a compiled package is checked against.

It runs any of the supported architectures on the weights exactly as the package will hold them (dequantized),
so a build needs neither torch nor transformers to know its kernels are right; the tests check this reference
and the packages against transformers itself.
"""

from __future__ import annotations

import numpy as np

from edgellm.llm.config import LMConfig


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """transformers' RoPE: rotate the two halves of each head ([s, heads, d])."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    freqs = positions[:, None].astype(np.float64) * inv[None]
    cos = np.cos(np.concatenate([freqs, freqs], -1)).astype(np.float32)[:, None]
    sin = np.sin(np.concatenate([freqs, freqs], -1)).astype(np.float32)[:, None]
    half = d // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class ReferenceLM:
    """``weights``: edgellm's names (``layers.3.q``, ``embed``, ...) -> float32 arrays."""

    def __init__(self, config: LMConfig, weights: dict[str, np.ndarray]):
        self.c, self.w = config, weights
        self.head = weights.get("lm_head", weights["embed"])
        self.reset()

    def reset(self) -> None:
        self.k = [np.zeros((0, self.c.kv_heads, self.c.head_dim), np.float32) for _ in range(self.c.layers)]
        self.v = [np.zeros_like(k) for k in self.k]

    def forward(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] for the next tokens after the cached ones plus ``ids``."""
        c, w = self.c, self.w
        start = self.k[0].shape[0]
        pos = np.arange(start, start + len(ids))
        x = w["embed"][np.asarray(ids)]
        group = c.heads // c.kv_heads
        mask = np.triu(np.full((len(ids), start + len(ids)), -np.inf, np.float32), k=start + 1)
        for i in range(c.layers):
            p = f"layers.{i}."
            h = _rms(x, w[p + "attn_norm"], c.rms_eps)
            q, k, v = (h @ w[p + n].T + (w[p + n + "_bias"] if c.qkv_bias else 0) for n in ("q", "k", "v"))
            q = q.reshape(len(ids), c.heads, c.head_dim)
            k = k.reshape(len(ids), c.kv_heads, c.head_dim)
            v = v.reshape(len(ids), c.kv_heads, c.head_dim)
            if c.qk_norm:
                q, k = _rms(q, w[p + "q_norm"], c.rms_eps), _rms(k, w[p + "k_norm"], c.rms_eps)
            q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
            self.k[i] = K = np.concatenate([self.k[i], k])
            self.v[i] = V = np.concatenate([self.v[i], v])
            K, V = np.repeat(K, group, axis=1), np.repeat(V, group, axis=1)
            scores = np.matmul(q.transpose(1, 0, 2), K.transpose(1, 2, 0)) / np.float32(np.sqrt(c.head_dim)) + mask  # [h, s, t]
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = np.matmul(scores / scores.sum(-1, keepdims=True), V.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(len(ids), -1)
            x = x + attn @ w[p + "o"].T
            h = _rms(x, w[p + "ffn_norm"], c.rms_eps)
            gate, up = h @ w[p + "gate"].T, h @ w[p + "up"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "down"].T
        return _rms(x, w["norm"], c.rms_eps) @ self.head.T

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        self.reset()
        logits = self.forward(prompt)[-1]
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(logits)))
            logits = self.forward(out[-1:])[-1]
        return out
