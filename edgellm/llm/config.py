"""What a causal language model is, in the terms the compiler and the runtime need: one dataclass that
the sources (GGUF, transformers folders) fill in and the package stores, so the runtime can rebuild it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgellm.errors import EdgeError

# transformers' names of the Llama family that edgellm compiles (model_type in config.json)
ARCHITECTURES = {
    "llama": "Llama (SmolLM, TinyLlama, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
}
SUPPORTED = ", ".join(ARCHITECTURES)


@dataclass(frozen=True)
class LMConfig:
    arch: str  # llama | mistral | qwen2 | qwen3
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    context: int = 2048  # the longest context the model was trained for
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)
    add_bos: bool = False  # does its tokenizer put BOS in front of a prompt

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise EdgeError(f"language-model architecture {self.arch!r} is not supported", f"supported: {SUPPORTED}")
        if self.heads % self.kv_heads:
            raise EdgeError(f"{self.heads} attention heads do not divide into {self.kv_heads} KV heads", "the model's config is inconsistent")

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        return cls(**{**d, "eos_ids": tuple(d.get("eos_ids", ()))})
