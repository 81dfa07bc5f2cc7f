"""Peer engines for the language-model benchmark: llama.cpp, transformers fp32 and OpenVINO GenAI.

Each runner takes token ids (no tokenizer in the timed path), runs in this process with a fixed
thread count, does one untimed warm-up generation, then times greedy generation of exactly
``max_new_tokens`` tokens (EOS is ignored) and returns one dict:

    {"engine", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "new_tokens", "threads",
     "detail"}

``prefill_ms`` is the prompt's forward pass, ``ttft_ms`` adds picking the first token, and
``decode_tok_s`` counts the ``max_new_tokens - 1`` steps after the first token. Loading is not
timed; loaded models are kept per process (``clear_cache()`` drops them). A peer whose library or
model is missing raises ``PeerUnavailable``.
"""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from pathlib import Path


class PeerUnavailable(Exception):
    """A peer cannot run here (library not installed, model missing); ``reason`` says which."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _result(engine: str, prompt_len: int, prefill_s: float, ttft_s: float, decode_s: float,
            new_tokens: list[int], threads: int, detail: str) -> dict:
    """The one result shape every peer returns."""
    steps = len(new_tokens) - 1
    return {
        "engine": engine,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tok_s": prompt_len / prefill_s if prefill_s > 0 else float("nan"),
        "ttft_ms": ttft_s * 1e3,
        "decode_tok_s": steps / decode_s if steps > 0 and decode_s > 0 else float("nan"),
        "new_tokens": [int(t) for t in new_tokens],
        "threads": threads,
        "detail": detail,
    }


def _median_run(run, runs: int) -> tuple[float, float, float, list[int]]:
    """Warm up once, then time ``runs`` runs; medians of (prefill, ttft, decode) and the last tokens."""
    run()
    timings = [run() for _ in range(max(1, runs))]
    med = [statistics.median(t[i] for t in timings) for i in range(3)]
    return med[0], med[1], med[2], timings[-1][3]


def clear_cache() -> None:
    """Drop the models loaded by the runners."""
    for loader in (_llama_model, _hf_model, _ov_pipeline):
        loader.cache_clear()


# ---------------------------------------------------------------- llama.cpp


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # also catches a broken shared library (OSError is wrapped by it)
        raise PeerUnavailable(f"llama-cpp-python is not installed ({e})") from e
    return llama_cpp


@functools.lru_cache(maxsize=4)
def _llama_model(gguf_path: str, threads: int, n_ctx: int, vocab_only: bool = False):
    llama_cpp = _import_llama_cpp()
    if not Path(gguf_path).is_file():
        raise PeerUnavailable(f"GGUF file not found: {gguf_path}")
    return llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads,
                           n_ctx=n_ctx, n_batch=min(n_ctx, 2048), vocab_only=vocab_only,
                           verbose=False)


def llama_cpp_tokenize(gguf_path, text: str) -> list[int]:
    """llama.cpp's token ids for ``text`` (no BOS added, special tokens parsed): the GGUF's reference ids."""
    llm = _llama_model(str(gguf_path), 1, 512, vocab_only=True)
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def llama_cpp(gguf_path, prompt_ids: list[int], max_new_tokens: int, threads: int,
              n_ctx: int = 2048, *, runs: int = 1) -> dict:
    """llama.cpp (llama-cpp-python) on a GGUF as shipped: greedy, EOS ignored."""
    import numpy as np

    llama_cpp_mod = _import_llama_cpp()
    if len(prompt_ids) + max_new_tokens > n_ctx:
        raise ValueError(f"prompt + new tokens ({len(prompt_ids) + max_new_tokens}) exceed n_ctx {n_ctx}")
    llm = _llama_model(str(gguf_path), threads, n_ctx)

    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        # eval() no longer copies logits to llm.scores (0.3.x, logits_all off): read the context's
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run():
        llm.reset()  # n_tokens = 0; eval() then drops the stale KV cache entries
        t0 = time.perf_counter()
        llm.eval(list(prompt_ids))
        t1 = time.perf_counter()
        tok = last_argmax()
        t2 = time.perf_counter()
        out = [tok]
        for _ in range(max_new_tokens - 1):
            llm.eval([tok])
            tok = last_argmax()
            out.append(tok)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t0, t3 - t2, out

    prefill, ttft, decode, out = _median_run(run, runs)
    detail = (f"llama-cpp-python {llama_cpp_mod.__version__}, {Path(gguf_path).name} as shipped, "
              f"n_ctx={n_ctx}, eval() + argmax")
    return _result("llama.cpp", len(prompt_ids), prefill, ttft, decode, out, threads, detail)


# ---------------------------------------------------------------- transformers


@functools.lru_cache(maxsize=2)
def _hf_model(model_dir_or_gguf: str):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise PeerUnavailable(f"torch/transformers not installed ({e})") from e
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its loading bars would break the bench's own lines
    path = Path(model_dir_or_gguf)
    if not path.exists():
        raise PeerUnavailable(f"model not found: {path}")
    if path.suffix == ".gguf":  # dequantized to fp32; needs the gguf package (and accelerate)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def transformers_fp32(model_dir_or_gguf, prompt_ids: list[int], max_new_tokens: int, threads: int,
                      *, runs: int = 1) -> dict:
    """transformers eager fp32 (a HF folder or a GGUF it dequantizes): greedy with KV cache, EOS ignored."""
    import torch
    import transformers

    model = _hf_model(str(model_dir_or_gguf))
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generate() does

    def step(input_ids, cache=None):
        out = model(input_ids=input_ids, use_cache=True, **{cache_kw: cache}, **extra)
        return int(out.logits[0, -1].argmax()), getattr(out, cache_kw)

    def run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **extra)
            t1 = time.perf_counter()
            tok, cache = int(out.logits[0, -1].argmax()), getattr(out, cache_kw)
            t2 = time.perf_counter()
            toks = [tok]
            for _ in range(max_new_tokens - 1):
                tok, cache = step(torch.tensor([[tok]]), cache)
                toks.append(tok)
            t3 = time.perf_counter()
        return t1 - t0, t2 - t0, t3 - t2, toks

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prefill, ttft, decode, toks = _median_run(run, runs)
    finally:
        torch.set_num_threads(before)
    detail = (f"transformers {transformers.__version__} eager fp32, torch {torch.__version__}, "
              f"manual greedy loop with DynamicCache")
    return _result("transformers-fp32", len(prompt_ids), prefill, ttft, decode, toks, threads, detail)


# ---------------------------------------------------------------- OpenVINO GenAI


@functools.lru_cache(maxsize=2)
def _ov_pipeline(ir_dir: str, threads: int, precision: str | None):
    try:
        import openvino_genai
    except ImportError as e:
        raise PeerUnavailable(f"openvino-genai is not installed ({e})") from e
    if not (Path(ir_dir) / "openvino_model.xml").is_file():
        raise PeerUnavailable(f"no OpenVINO IR (openvino_model.xml) in {ir_dir}")
    props = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        props["INFERENCE_PRECISION_HINT"] = precision
    return openvino_genai.LLMPipeline(ir_dir, "CPU", **props)


def openvino_genai(ir_dir, prompt_ids: list[int], max_new_tokens: int, threads: int,
                   precision: str | None = None, *, runs: int = 1) -> dict:
    """OpenVINO GenAI LLMPipeline on an optimum-intel IR, fed token ids; ``precision`` e.g. "f32"."""
    import numpy as np

    pipe = _ov_pipeline(str(ir_dir), threads, precision)
    import openvino
    import openvino_genai as ov_genai

    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    inputs = ov_genai.TokenizedInputs(openvino.Tensor(ids), openvino.Tensor(np.ones_like(ids)))
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = max_new_tokens
    config.ignore_eos = True
    config.do_sample = False

    # The stateful pipeline keeps its KV cache between generate() calls and reuses the common
    # prefix, so a repeated prompt would skip its prefill: run one token of another prompt first.
    other = np.asarray([[int(prompt_ids[0]) + 1]], dtype=np.int64)
    flush_inputs = ov_genai.TokenizedInputs(openvino.Tensor(other), openvino.Tensor(np.ones_like(other)))
    flush_config = ov_genai.GenerationConfig()
    flush_config.max_new_tokens = 1

    def run():
        pipe.generate(flush_inputs, flush_config)
        res = pipe.generate(inputs, config)
        pm = res.perf_metrics
        ttft = pm.get_ttft().mean / 1e3  # ms -> s; GenAI has no separate prefill figure
        tpot = pm.get_tpot().mean / 1e3  # mean time per token after the first
        toks = [int(t) for t in res.tokens[0]]
        return ttft, ttft, tpot * (len(toks) - 1), toks

    prefill, ttft, decode, toks = _median_run(run, runs)
    detail = (f"openvino-genai {ov_genai.__version__}, openvino {openvino.__version__}, "
              f"precision={precision or 'default'}, TokenizedInputs, perf_metrics ttft/tpot "
              f"(prefill_ms = ttft)")
    engine = "openvino-genai" + (f"-{precision}" if precision else "")
    return _result(engine, len(prompt_ids), prefill, ttft, decode, toks, threads, detail)
