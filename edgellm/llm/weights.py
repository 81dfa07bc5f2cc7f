"""``--weights fp32 | int8 | int4``: which scheme each linear layer gets, and its packed arrays.

int8 is per output channel (or GGUF Q8_0's groups of 32, carried over as they are); int4 is groups of 32 with a
scale and a minimum (GGUF Q4_1 / Q4_0 blocks carried over as they are). The output head (and the embedding table
it shares) stays int8 under int4, as llama.cpp keeps it: it is the one layer whose error every token sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgellm.errors import EdgeError
from edgellm.llm import layers
from edgellm.llm.source import LMSource, Tensor

CHOICES = ("fp32", "int8", "int4")
BITS = {"f32": 32, "q8": 8, "q4": 4}


@dataclass(frozen=True)
class Scheme:
    kind: str  # f32 | q8 | q4
    group: int | None = None  # along K; None: the whole row (per output channel)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "group": self.group}


def _linear_roles(src: LMSource) -> dict[str, list[str]]:
    """Each compiled linear layer (its module path) -> the source tensors stacked into it, in row order."""
    roles = {}
    for i in range(src.config.layers):
        p = f"layers.{i}."
        roles[p + "attn.qkv"] = [p + "q", p + "k", p + "v"]
        roles[p + "attn.o"] = [p + "o"]
        roles[p + "mlp.gate_up"] = [p + "gate", p + "up"]
        roles[p + "mlp.down"] = [p + "down"]
    roles["lm_head"] = ["embed" if src.config.tie_embeddings else "lm_head"]
    if not src.config.tie_embeddings:
        roles["embed"] = ["embed"]
    return roles


def plan(weights: str, src: LMSource) -> dict[str, Scheme]:
    """{'layers': Scheme, 'head': Scheme} for ``--weights``."""
    if weights not in CHOICES:
        raise EdgeError(f"unknown --weights {weights!r}", f"choose one of {', '.join(CHOICES)}")
    roles = _linear_roles(src)
    layer_types = {src.tensor(n).gguf_type for m, names in roles.items() if m.startswith("layers.") for n in names}
    head_type = src.tensor(roles["lm_head"][0]).gguf_type
    if weights == "fp32":
        return {"layers": Scheme("f32"), "head": Scheme("f32")}
    head = Scheme("q8", 32 if head_type == "Q8_0" else None)
    if weights == "int8":
        return {"layers": Scheme("q8", 32 if layer_types == {"Q8_0"} else None), "head": head}
    if src.config.hidden % 32 or src.config.intermediate % 32 or src.config.q_size % 32:
        raise EdgeError(f"--weights int4 needs layer widths that are multiples of 32 (hidden {src.config.hidden}, "
                        f"FFN {src.config.intermediate})", "use --weights int8")
    return {"layers": Scheme("q4", 32), "head": head}


def _stack(tensors: list[Tensor]) -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    kinds = {t.gguf_type for t in tensors}
    if len(kinds) == 1 and None not in kinds:
        raw = np.concatenate([t.raw for t in tensors])
        return Tensor((raw.shape[0], tensors[0].shape[1]), gguf_type=tensors[0].gguf_type, raw=raw)
    array = np.concatenate([t.f32() for t in tensors])
    return Tensor(array.shape, array=array)


def _pack(t: Tensor, scheme: Scheme) -> tuple[dict[str, np.ndarray], bool]:
    """(arrays, carried over from the source's blocks as they are)."""
    if scheme.kind == "q4" and t.gguf_type in ("Q4_0", "Q4_1"):
        return layers.pack("q4", gguf_type=t.gguf_type, gguf_raw=t.raw), True
    if scheme.kind == "q8" and t.gguf_type == "Q8_0" and scheme.group == 32:
        return layers.pack("q8", group=32, gguf_type="Q8_0", gguf_raw=t.raw), True
    return layers.pack(scheme.kind, w=t.f32(), group=scheme.group), False


@dataclass
class Packed:
    params: dict[str, np.ndarray]  # compiled parameter name -> array
    dequantized: dict[str, np.ndarray]  # source name -> float32 weight as the package computes with it
    carried: int  # linear layers carried over from GGUF blocks unchanged
    requantized: int


def pack_all(src: LMSource, schemes: dict[str, Scheme]) -> Packed:
    params: dict[str, np.ndarray] = {}
    deq: dict[str, np.ndarray] = {}
    carried = requantized = 0
    for module, names in _linear_roles(src).items():
        scheme = schemes["layers" if module.startswith("layers.") else "head"]
        tensors = [src.tensor(n) for n in names]
        arrays, was_carried = _pack(_stack(tensors), scheme)
        carried += was_carried
        requantized += not was_carried and scheme.kind != "f32"
        params.update({f"{module}.linear.{k}": v for k, v in arrays.items()})
        full = layers.dequantize(scheme.kind, arrays)
        start = 0
        for n, t in zip(names, tensors):
            deq[n] = full[start:start + t.shape[0]]
            start += t.shape[0]
    c = src.config
    for i in range(c.layers):
        p = f"layers.{i}."
        if c.qkv_bias:
            params[p + "attn.qkv.bias"] = np.concatenate([src.tensor(p + n + "_bias").f32() for n in "qkv"]).astype(np.float32)
        for n in ("attn_norm", "ffn_norm") + (("q_norm", "k_norm") if c.qk_norm else ()):
            params[p + (f"attn.{n}" if n in ("q_norm", "k_norm") else n) + ".weight"] = src.tensor(p + n).f32()
    params["norm.weight"] = src.tensor("norm").f32()
    for name, t in src.tensors.items():  # norms and biases: the reference takes them as they are
        if name not in deq:
            deq[name] = t.f32()
    return Packed(params, deq, carried, requantized)


def source_f32(src: LMSource) -> dict[str, np.ndarray]:
    """The source's weights in float32: the reference every compressed package is measured against."""
    return {n: t.f32() for n, t in src.tensors.items()}
