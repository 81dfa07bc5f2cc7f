"""A language-model package on the device: tokens in, tokens out, over TVM's paged KV cache.

    lm = rt.load("lm.edgepkg")
    new_ids = lm.generate(prompt_ids, max_new_tokens=32)           # greedy
    for token in lm.stream(prompt_ids, temperature=0.7, top_p=0.9, seed=1): ...
    print(lm.chat("Turn on the kitchen lights"))

The cache keeps the tokens of the last call, so the next call that starts with them (the next turn of a chat)
prefills only what is new. One generation runs at a time per loaded model: calls from other threads wait
for it (a lock), and each gets exactly what it would have alone. The tokenizer (the ``tokenizers`` library)
and the chat template (``jinja2``) load on first use, so a device that only moves token ids needs neither.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime import device
from edgellm.runtime.package import check_device, load_npz, read_package
from edgellm.runtime.threads import choose as choose_threads

WEIGHTS = "weights.npz"
TOKENIZER = "tokenizer.json"
REFERENCE = "reference.npz"
PAGE_SIZE = 16


class GenerationError(EdgeError):
    """A generation request this package cannot serve (too long a prompt, no tokenizer, bad sampling settings)."""


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc (0 where there is none)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


class Sampler:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus), with its own seed."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise GenerationError(f"bad sampling settings (temperature {temperature}, top_k {top_k}, top_p {top_p})",
                                  "temperature >= 0, top_k >= 0, 0 < top_p <= 1")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z)
        if self.top_k:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])


class LanguageModel:
    """A verified language-model package, loaded with TVM's runtime library."""

    def __init__(self, path: str | Path, threads: int | None = None, loaded: tuple[dict, dict] | None = None, trusted_keys=None):
        """``loaded``: (manifest, members) already in memory (the build checks its package before writing it).
        ``trusted_keys``: .pub paths or hex keys; the package must be signed by one (see runtime/package.py)."""
        from edgellm.runtime.engines.tvm import PoolSizer, import_tvm

        t0 = time.perf_counter()
        tvm = import_tvm()
        self._rss_baseline = _rss_mb()[0]  # this process with the runtime loaded, before the model: the runtime's own baseline
        self.path = Path(path)
        self.manifest, members = loaded if loaded else read_package(self.path, trusted_keys)
        members = dict(members)
        check_device(self.manifest, device.cpu_flags())
        lm = self.manifest["llm"]
        self.config = lm["config"]
        self.max_seq_len = int(lm["max_seq_len"])
        self.prefill_chunk = int(lm["prefill_chunk"])
        self.eos_ids = set(self.config.get("eos_ids") or [])
        self.threads, self.threads_from = choose_threads(self.manifest, threads)  # runtime/threads.py
        self._size_pool = PoolSizer(tvm, self.threads)
        self._tvm = tvm
        self._dev = tvm.cpu(0)
        with tempfile.TemporaryDirectory(prefix="edgellm-") as tmp:  # dlopen needs a file; the mapping outlives it
            so = Path(tmp) / self.manifest["backend"]["module"]
            so.write_bytes(members.pop(self.manifest["backend"]["module"]))
            self._vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(so)), self._dev)
        with np.load(io.BytesIO(members.pop(WEIGHTS)), allow_pickle=False) as npz:
            self._params = [tvm.runtime.tensor(npz[p["name"]], self._dev) for p in lm["params"]]
        self._tokenizer_json = members.pop(TOKENIZER, None)
        self._reference = load_npz(members[REFERENCE]) if REFERENCE in members else None
        del members
        from tvm_ffi import Shape

        self._shape = Shape
        get = tvm.get_global_func
        self._begin, self._end = get("vm.builtin.kv_state_begin_forward"), get("vm.builtin.kv_state_end_forward")
        self._popn = get("vm.builtin.kv_state_popn")
        self._kv = self._vm["create_paged_kv_cache"](Shape([1]), Shape([self.max_seq_len]), Shape([self.prefill_chunk]),
                                                     Shape([PAGE_SIZE]), Shape([0]))
        get("vm.builtin.kv_state_add_sequence")(self._kv, 0)
        self._fns = {name: self._vm[name] for name in ("prefill", "prefill_logits", "decode")}
        self._seq0, self._one = Shape([0]), Shape([1])
        self._decode_in = tvm.runtime.empty((1, 1), "int32", self._dev)
        self._decode_view = np.from_dlpack(self._decode_in)
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds
        self._lock = threading.RLock()
        self._tokenizer = None
        self._template = None
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def __repr__(self) -> str:
        c = self.config
        return (f"<edgellm LanguageModel {self.path.name}: {c['arch']} {c['layers']} layers, vocab {c['vocab']}, "
                f"weights {self.manifest['llm']['weights']}, max_seq_len {self.max_seq_len}>")

    # ------------------------------------------------------------ the model

    def _forward(self, fn: str, ids: list[int]) -> np.ndarray:
        """Run ``fn`` on tokens appended to the cache; logits as float32 numpy (a view: use it before the next call)."""
        self._size_pool()
        if fn == "decode":  # the per-token path: its input tensor and shapes are made once
            if self._decode_view.flags.writeable:
                self._decode_view[0, 0] = ids[0]
            else:  # numpy < 2 gives read-only DLPack views
                self._decode_in.copyfrom(np.asarray([ids], np.int32))
            tokens, lengths = self._decode_in, self._one
        else:
            tokens, lengths = self._tvm.runtime.tensor(np.asarray(ids, np.int32)[None], self._dev), self._shape([len(ids)])
        self._begin(self._kv, self._seq0, lengths)
        try:
            out = self._fns[fn](tokens, self._kv, self._params)
        finally:
            self._end(self._kv)
        self._cached.extend(ids)
        return np.from_dlpack(out[0])

    def _prefill(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` in chunks the package was built for; the last position's logits (or every position's)."""
        chunks = []
        for start in range(0, len(ids), self.prefill_chunk):
            part = ids[start:start + self.prefill_chunk]
            logits = self._forward("prefill_logits" if all_logits else "prefill", part)
            chunks.append(logits[0])
        return np.concatenate(chunks) if all_logits else chunks[-1][-1]

    def _reuse(self, prompt: list[int]) -> list[int]:
        """Drop cached tokens that the prompt does not start with; the part of the prompt left to prefill."""
        keep = 0
        for a, b in zip(self._cached, prompt[:-1]):  # at least one prompt token is fed: its logits start generation
            if a != b:
                break
            keep += 1
        if len(self._cached) > keep:
            self._popn(self._kv, 0, len(self._cached) - keep)
            del self._cached[keep:]
        return prompt[keep:]

    def reset(self) -> None:
        """Forget the cached conversation."""
        with self._lock:
            if self._cached:
                self._popn(self._kv, 0, len(self._cached))
                self._cached.clear()

    def _check_prompt(self, prompt_ids) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise GenerationError("the prompt is empty", "give at least one token")
        if len(ids) > self.max_seq_len:
            raise GenerationError(f"the prompt has {len(ids)} tokens, more than this package's max-seq-len {self.max_seq_len}",
                                  "shorten the prompt or rebuild with a larger --max-seq-len")
        bad = [i for i in ids if not 0 <= i < self.config["vocab"]]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.config['vocab'] - 1})")
        return ids

    # ------------------------------------------------------------ generation

    def stream(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop: list[int] | None = None, ignore_eos: bool = False) -> Iterator[int]:
        """New token ids as they are made. Stops at EOS (unless ``ignore_eos``), a ``stop`` id, ``max_new_tokens``, or a full cache."""
        ids = self._check_prompt(prompt_ids)
        sample = Sampler(temperature, top_k, top_p, seed)
        stops = set(stop or ()) | (set() if ignore_eos else self.eos_ids)
        with self._lock:
            logits = self._prefill(self._reuse(ids))
            for step in range(max_new_tokens):
                token = sample(logits)
                yield token
                if token in stops or step + 1 == max_new_tokens or len(self._cached) >= self.max_seq_len:
                    break
                logits = self._forward("decode", [token])[0, -1]

    def generate(self, prompt_ids, max_new_tokens: int = 64, **sampling) -> list[int]:
        """The new token ids (greedy by default); see :meth:`stream` for the options."""
        return list(self.stream(prompt_ids, max_new_tokens, **sampling))

    def logits(self, ids) -> np.ndarray:
        """Next-token logits at every position of ``ids`` [len, vocab], from an empty cache (perplexity, checks)."""
        ids = self._check_prompt(ids)
        with self._lock:
            self.reset()
            try:
                return self._prefill(ids, all_logits=True)
            finally:
                self.reset()

    def perplexity(self, ids) -> float:
        """exp(mean negative log-likelihood) of ``ids[1:]`` given what precedes each."""
        logits = self.logits(ids).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return float(np.exp(-logp[np.arange(len(ids) - 1), np.asarray(ids[1:])].mean()))

    # ------------------------------------------------------------ text

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_json is None:
                raise GenerationError(f"{self.path.name} carries no tokenizer", "pass token ids, or rebuild from a source with tokenizer files")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise GenerationError("text in and out needs the tokenizers library", "pip install tokenizers") from None
            self._tokenizer = Tokenizer.from_str(self._tokenizer_json.decode())
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.get("bos_id")
        return ([bos] if self.config.get("add_bos") and bos is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for ``messages`` ([{'role': 'user', 'content': ...}, ...]) by the model's own template."""
        template = self.manifest["llm"].get("chat_template")
        if not template:
            raise GenerationError(f"{self.path.name} has no chat template", "use generate() with your own prompt")
        if self._template is None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise GenerationError("chat templates need jinja2", "pip install jinja2") from None

            def raise_exception(message):
                raise GenerationError(f"the chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
            self._template = env.from_string(template)
        return self._template.render(messages=messages, add_generation_prompt=True, **self.manifest["llm"].get("special_tokens", {}))

    def chat_stream(self, message, **options) -> Iterator[str]:
        """Text pieces of the reply to ``message`` (a string, or a list of chat messages), as they are made."""
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
        ids = self.encode(self.apply_chat_template(messages))
        made: list[int] = []
        shown = ""
        for token in self.stream(ids, **options):
            if token in self.eos_ids:
                break
            made.append(token)
            text = self.decode(made)
            if not text.endswith("\ufffd"):  # a multi-byte character still being spelled out
                yield text[len(shown):]
                shown = text

    def chat(self, message, **options) -> str:
        """The reply to ``message`` (a string, or a list of chat messages), chat template applied."""
        return "".join(self.chat_stream(message, **options))

    # ------------------------------------------------------------ checks and figures

    def run(self, *args, **kwargs):
        raise GenerationError(f"{self.path.name} is a language model", "call generate(), stream() or chat(), or `edgellm generate`")

    def check_reference(self, tolerance: float | None = None) -> dict:
        """The build's reference prompt: logits against the stored reference's, and the greedy tokens."""
        from edgellm.runtime.accuracy import compare

        if self._reference is None:
            raise EdgeError(f"{self.path.name} carries no reference sample", "rebuild it with this edgellm")
        prompt = self._reference["prompt"].tolist()
        stats = compare(self._reference["logits"], self.logits(prompt)[-1])
        self.reset()
        tokens = self.generate(prompt, len(self._reference["tokens"]), ignore_eos=True)
        self.reset()
        expected = self._reference["tokens"].tolist()
        tol = float(tolerance if tolerance is not None else self.manifest.get("verification", {}).get("tolerance", 1e-3))
        agree = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
        return {"outputs": {"logits": stats}, "rel_max_abs": stats["rel_max_abs"], "max_abs": stats["max_abs"], "cosine_min": stats["cosine"],
                "tolerance": tol, "tokens": tokens, "expected_tokens": expected, "tokens_equal": tokens == expected,
                "tokens_agree_first": agree, "passed": bool(stats["rel_max_abs"] <= tol and tokens == expected)}

    def profile(self, prompt_len: int = 128, gen_len: int = 64, runs: int = 3, long_context: int | None = None) -> dict:
        """Time to first token, prefill and decode tokens/s (short and long context), memory: ``edgellm.lm-profile/1``."""
        rng = np.random.default_rng(0)
        vocab = self.config["vocab"]
        long_context = long_context or max(prompt_len, (self.max_seq_len - gen_len) * 3 // 4)
        if prompt_len + gen_len > self.max_seq_len:
            raise GenerationError(f"prompt {prompt_len} + generation {gen_len} tokens exceed max-seq-len {self.max_seq_len}")
        rss_peak = 0.0

        def one(n_prompt: int) -> dict:
            nonlocal rss_peak
            prompt = rng.integers(0, vocab, n_prompt).tolist()
            self.reset()
            t0 = time.perf_counter()
            stream = self.stream(prompt, gen_len, ignore_eos=True)
            next(stream)
            t1 = time.perf_counter()
            n = 1 + sum(1 for _ in stream)
            t2 = time.perf_counter()
            rss_peak = max(rss_peak, _rss_mb()[0])
            return {"ttft_ms": (t1 - t0) * 1e3, "prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1)}

        with self._lock:
            one(min(prompt_len, 16))  # warm-up: first calls fault in the weights and the cache
            short = [one(prompt_len) for _ in range(runs)]
            long = one(long_context) if long_context + gen_len <= self.max_seq_len else None
            self.reset()

        def med(key, rows):
            return float(np.median([r[key] for r in rows]))

        rss_now, rss_hwm = _rss_mb()
        weights_mb = sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in self._params) / 1e6
        c = self.config
        kv_mb = 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * 4 * self.max_seq_len / 1e6
        return {
            "schema": "edgellm.lm-profile/1", "package": str(self.path), "target": self.manifest["target"]["name"],
            "weights": self.manifest["llm"]["weights"], "threads": self.threads, "runs": runs,
            "prompt_tokens": prompt_len, "new_tokens": gen_len,
            "ttft_ms": med("ttft_ms", short), "prefill_tok_s": med("prefill_tok_s", short), "decode_tok_s": med("decode_tok_s", short),
            "long_context": ({"prompt_tokens": long_context, "ttft_ms": long["ttft_ms"], "prefill_tok_s": long["prefill_tok_s"],
                              "decode_tok_s": long["decode_tok_s"]} if long else None),
            "memory_mb": {"rss_generating": max(rss_peak, rss_now), "rss_peak": rss_hwm, "baseline": self._rss_baseline,
                          "weights": weights_mb, "kv_cache": kv_mb,
                          # resident memory while generating, above the baseline, per MB of weights + KV cache
                          "overhead_ratio": (max(rss_peak, rss_now) - self._rss_baseline) / (weights_mb + kv_mb)},
            "load_ms": self.load_ms,
        }


def is_language_model(manifest: dict) -> bool:
    return manifest.get("kind") == "llm"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
