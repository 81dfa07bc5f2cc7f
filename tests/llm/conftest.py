"""Tiny random-weight language models made with transformers (the reference), and packages built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ARCHS = ("llama", "qwen2", "qwen3")


def make_folder(arch: str, out: Path, tie: bool | None = None, seed: int = 0) -> Path:
    """A 2-layer model of ``arch`` saved with save_pretrained; weights drawn so that greedy tokens are far from ties."""
    import torch
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=(arch != "llama") if tie is None else tie, bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        kw["head_dim"] = 16
    torch.manual_seed(seed)
    model = classes[1](classes[0](**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 and "norm" in name else 0.0))
    model.save_pretrained(out)
    return out


def hf_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (a manual loop: no EOS handling, exactly ``n`` tokens)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lm")
    return {arch: make_folder(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_packages(tiny_folders, tmp_path_factory):
    """(arch, weights) -> package, built on first use."""
    from edgellm import api

    out = tmp_path_factory.mktemp("tiny-lm-pkgs")
    cache: dict = {}

    def get(arch: str, weights: str = "fp32") -> Path:
        if (arch, weights) not in cache:
            cache[arch, weights] = api.build(str(tiny_folders[arch]), "host", out / f"{arch}-{weights}.edgepkg", weights=weights).path
        return cache[arch, weights]

    return get


PROMPT = np.random.default_rng(3).integers(3, 256, 11).tolist()
