"""``edgellm build`` for a causal language model: source -> weights -> compile -> verify -> evaluate -> package.

Verification runs the package's own code here (when this machine is its device) on a reference prompt and
compares the last position's logits and 16 greedy tokens with the numpy reference on the same (dequantized)
weights. Evaluation measures what compression costs: perplexity on edgellm's fixed English text and greedy
agreement, each against the source's float32 weights; ``--max-drop`` fails a build whose perplexity rises more
than that many percent.
"""

from __future__ import annotations

import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgellm import __version__, targets
from edgellm.errors import EdgeError
from edgellm.package import check_output, npz_bytes, write_package
from edgellm.runtime import device

TOLERANCE = 1e-3  # max |logit error| relative to the largest logit: fp32 sums in another order over 30 layers
REFERENCE_TOKENS = 16
AGREEMENT_TOKENS = 32
PROMPT = "Turn on the kitchen lights and tell me tomorrow's weather in Paris."


def _stage_runner(progress, seconds):
    from edgellm.build_result import _stage

    return lambda name, detail: _stage(name, progress, seconds, detail)


def reference_prompt(src, tokenizer) -> list[int]:
    """The chat-formatted reference prompt when the model has a tokenizer and template, else fixed token ids."""
    if tokenizer is None:
        return np.random.default_rng(0).integers(0, src.config.vocab, 24).tolist()
    text = PROMPT
    if src.chat_template:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(src.chat_template).render(messages=[{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                       **src.special_tokens)
    return tokenizer.encode(text, add_special_tokens=False).ids


def eval_ids(tokenizer, limit: int) -> list[int] | None:
    from edgellm.llm.eval_text import TEXT

    return tokenizer.encode(TEXT, add_special_tokens=False).ids[:limit] if tokenizer is not None else None


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) > 1]


def reference_perplexity(ref, ids: list[int], size: int) -> float:
    nll, n = 0.0, 0
    for w in windows(ids, size):
        ref.reset()
        logits = ref.forward(w).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(w) - 1), np.asarray(w[1:])].sum()
        n += len(w) - 1
    return float(np.exp(nll / n))


def package_perplexity(lm, ids: list[int], size: int) -> float:
    nll, n = 0.0, 0
    for w in windows(ids, size):
        ppl = lm.perplexity(w)
        nll += np.log(ppl) * (len(w) - 1)
        n += len(w) - 1
    return float(np.exp(nll / n))


def build_lm(source: str, target="host", output=None, *, weights: str = "fp32", max_seq_len: int | None = None,
             prefill_chunk: int = 256, tolerance: float = TOLERANCE, max_drop: float | None = None, progress=None):
    from edgellm.build_result import BuildResult
    from edgellm.llm import source as sources
    from edgellm.llm import weights as wt
    from edgellm.llm.compile import compile_lm
    from edgellm.llm.reference import ReferenceLM

    tgt = targets.resolve(target)
    if weights not in wt.CHOICES:
        raise EdgeError(f"unknown --weights {weights!r}", f"choose one of {', '.join(wt.CHOICES)}")
    out = check_output(output or f"{Path(source[4:] if source.startswith('zoo:') else source.rstrip('/')).stem}.edgepkg")
    seconds: dict[str, float] = {}
    stage = _stage_runner(progress, seconds)

    detail: list[str] = []
    with stage("source", detail):
        src = sources.load(source)
        c = src.config
        max_seq_len = int(max_seq_len or min(c.context, 1024))
        if not 16 <= max_seq_len <= c.context:
            raise EdgeError(f"--max-seq-len {max_seq_len} is outside 16..{c.context} (the model's context)", f"give a value in 16..{c.context}")
        chunk = min(prefill_chunk, max_seq_len)
        tokenizer = None
        if src.tokenizer_json:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(src.tokenizer_json)
        detail.append(f"{src.kind} {src.name}: {c.arch}, {c.layers} layers, hidden {c.hidden}, vocab {c.vocab}, weights {src.weights}")
    detail = []
    with stage("weights", detail):
        schemes = wt.plan(weights, src)
        packed = wt.pack_all(src, schemes)
        size = sum(a.nbytes for a in packed.params.values())
        detail.append(f"{weights}: layers {schemes['layers'].kind}, head {schemes['head'].kind}; {packed.carried} layers carried over "
                      f"from the source's blocks, {packed.requantized} quantized; {size / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory(prefix="edgellm-build-") as tmp:
        detail = []
        with stage("compile", detail):
            so, params, info = compile_lm(c, schemes, tgt, Path(tmp))
            detail.append(f"tvm for {tgt.name}: prefill, decode over a paged KV cache of {max_seq_len} tokens")
        missing = [n for n, _, _ in params if n not in packed.params]
        if missing:
            raise EdgeError(f"internal: no weights for compiled parameter {missing[0]}", "report this as an edgellm bug")
        for name, shape, dtype in params:
            a = packed.params[name]
            if tuple(a.shape) != shape or str(a.dtype) != dtype:
                raise EdgeError(f"internal: weight {name} is {a.dtype}{list(a.shape)}, the module takes {dtype}{list(shape)}",
                                "report this as an edgellm bug")
        detail = []
        with stage("reference", detail):
            prompt = reference_prompt(src, tokenizer)
            if len(prompt) + REFERENCE_TOKENS > max_seq_len:
                prompt = prompt[-(max_seq_len // 2):]
            ref = ReferenceLM(c, packed.dequantized)
            ref_logits = ref.forward(prompt)[-1]
            ref_tokens = ref.greedy(prompt, REFERENCE_TOKENS)
            detail.append(f"numpy reference on the package's weights: {len(prompt)}-token prompt, {REFERENCE_TOKENS} greedy tokens")
        members = {
            "model.so": so.read_bytes(),
            "weights.npz": npz_bytes({n: packed.params[n] for n, _, _ in params}),
            "reference.npz": npz_bytes({"prompt": np.asarray(prompt, np.int32), "logits": ref_logits.astype(np.float32),
                                        "tokens": np.asarray(ref_tokens, np.int32)}),
            **({"tokenizer.json": src.tokenizer_json.encode()} if src.tokenizer_json else {}),
        }
    manifest = {
        "edgellm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": "llm",
        "recipe": {"source": source, "target": tgt.name, "backend": "tvm", "weights": weights, "max_seq_len": max_seq_len,
                   "tolerance": tolerance, **({"max_drop": max_drop} if max_drop is not None else {})},
        "model": {"name": src.name, "description": src.description, "weights": src.weights},
        "source": {"ref": source, "kind": src.kind, "sha256": src.sha256},
        "target": tgt.to_dict(),
        "backend": info,
        "runtime_requires": [f"apache-tvm=={info['tvm']}", f"apache-tvm-ffi=={info['tvm_ffi']}", "numpy", "tokenizers", "jinja2"],
        "inputs": [{"name": "input_ids", "shape": [1, max_seq_len], "dtype": "int32"}],
        "outputs": [{"name": "logits", "shape": [1, c.vocab], "dtype": "float32"}],
        "llm": {"config": c.to_dict(), "weights": weights, "schemes": {k: s.to_dict() for k, s in schemes.items()},
                "max_seq_len": max_seq_len, "prefill_chunk": chunk, "chat_template": src.chat_template,
                "special_tokens": src.special_tokens, "tokenizer": tokenizer is not None,
                "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params]},
    }
    from edgellm.runtime.package import check_device

    engine_ok = True
    try:
        check_device({"target": tgt.to_dict()}, device.cpu_flags())
    except EdgeError as e:
        engine_ok, why_not = False, e.problem
    lm = None
    detail = []
    with stage("verify", detail):
        if not engine_ok:
            manifest["verification"] = {"status": "skipped", "reason": f"{why_not}; run `edgellm verify` for the device", "tolerance": tolerance}
            detail.append(f"skipped: {why_not}")
        else:
            from edgellm.runtime.lm import LanguageModel

            lm = LanguageModel(out, loaded=({**manifest, "verification": {"tolerance": tolerance}}, members))
            check = lm.check_reference(tolerance)
            manifest["verification"] = {"status": "passed" if check["passed"] else "failed", "tolerance": tolerance,
                                        "rel_max_abs": check["rel_max_abs"], "cosine_min": check["cosine_min"],
                                        "tokens_equal": check["tokens_equal"], "tokens_agree_first": check["tokens_agree_first"]}
            detail.append(f"{manifest['verification']['status']}: logits error {check['rel_max_abs']:.2g} of scale (tolerance {tolerance:g}), "
                          f"greedy tokens {'equal' if check['tokens_equal'] else 'differ from ' + str(check['tokens_agree_first'])}")
            if not check["passed"]:
                raise EdgeError(f"the compiled model disagrees with the reference (logits error {check['rel_max_abs']:.3g} of scale, "
                                f"tokens {'equal' if check['tokens_equal'] else 'differ'})", "report this as a compiler bug")
    if lm is not None:
        detail = []
        with stage("evaluate", detail):
            manifest["llm"]["accuracy"] = acc = _evaluate(lm, src, packed, weights, tokenizer, prompt, max_seq_len)
            detail.append(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items() if k != "text"))
        if max_drop is not None and "perplexity_increase_pct" in acc and acc["perplexity_increase_pct"] > max_drop:
            raise EdgeError(f"perplexity rises {acc['perplexity_increase_pct']:.2f}% over fp32 (limit --max-drop {max_drop})",
                            "use more bits (--weights int8 / fp32) or raise --max-drop")
    if lm is not None:  # this machine ran it: decode timed at 1, 2, 4 .. physical cores threads (runtime/threads.py)
        from edgellm.runtime import threads

        detail = []
        with stage("threads", detail):
            manifest["threads"] = threads.measure_lm(lm)
            detail.append(threads.summary(manifest["threads"]))
    detail = []
    with stage("package", detail):
        manifest["build"] = {"host": platform.machine(), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        manifest = write_package(out, manifest, members)
        detail.append(f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    return BuildResult(out, manifest, seconds)


def _evaluate(lm, src, packed, weights, tokenizer, prompt, max_seq_len) -> dict:
    """Perplexity on the fixed text and greedy agreement, for the package and for the source's fp32 weights."""
    from edgellm.llm.reference import ReferenceLM
    from edgellm.llm.weights import source_f32

    acc: dict = {}
    window = min(max_seq_len, 1024)
    ids = eval_ids(tokenizer, 4096)
    tokens = lm.generate(prompt, AGREEMENT_TOKENS, ignore_eos=True)
    lm.reset()
    if ids is not None:
        acc["text_tokens"] = len(ids)
        acc["perplexity"] = package_perplexity(lm, ids, window)
    if weights == "fp32":
        if ids is not None:
            acc["perplexity_fp32"] = acc["perplexity"]
        acc["greedy_agreement"] = 1.0
        return acc
    fp32 = ReferenceLM(src.config, source_f32(src))
    fp32_tokens = fp32.greedy(prompt, AGREEMENT_TOKENS)
    first = next((i for i, (a, b) in enumerate(zip(tokens, fp32_tokens)) if a != b), AGREEMENT_TOKENS)
    acc["greedy_agreement"] = float(np.mean([a == b for a, b in zip(tokens, fp32_tokens)]))
    acc["greedy_equal_prefix"] = first
    if ids is not None and packed.requantized == 0:  # every layer carried over: the package computes with the source's own weights
        acc["perplexity_fp32"], acc["perplexity_increase_pct"], acc["weights_exact"] = acc["perplexity"], 0.0, True
    elif ids is not None:
        acc["perplexity_fp32"] = reference_perplexity(fp32, ids, window)
        acc["perplexity_increase_pct"] = (acc["perplexity"] / acc["perplexity_fp32"] - 1) * 100
    return acc
