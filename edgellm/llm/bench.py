"""`edgellm bench` for a language model: edgellm's packages against llama.cpp, transformers and OpenVINO GenAI.

Every engine gets the same prompt token ids (edgellm's fixed English text, cut to ``prompt_len``; no tokenizer in
the timed path), the same thread count, one untimed warm-up generation, then ``runs`` timed greedy generations of
exactly ``gen_len`` tokens (EOS ignored); medians are reported. Peers run in this process (edgellm/llm/peers.py):
llama.cpp on the GGUF as shipped (when the source is one), transformers fp32 eager, OpenVINO GenAI on an IR
exported beforehand (``--ov-ir``, or ``EDGELLM_OV_GENAI_IR``). A peer that cannot run here is listed with why.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import time
from pathlib import Path

from edgellm import api
from edgellm.runtime import device

SCHEMA = "edgellm.lm-bench/1"


def _time_package(lm, prompt: list[int], gen_len: int, runs: int) -> dict:
    def once():
        lm.reset()
        t0 = time.perf_counter()
        stream = lm.stream(prompt, gen_len, ignore_eos=True)
        tokens = [next(stream)]
        t1 = time.perf_counter()
        tokens += list(stream)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    once()
    timings = [once() for _ in range(runs)]
    ttft, decode = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
    lm.reset()
    return {"prefill_ms": ttft * 1e3, "ttft_ms": ttft * 1e3, "prefill_tok_s": len(prompt) / ttft,
            "decode_tok_s": (gen_len - 1) / decode, "new_tokens": timings[-1][2], "threads": lm.threads}


def _gguf_of(source: str) -> str | None:
    if source.startswith("zoo:"):
        from edgellm.llm.source import zoo_file

        return str(zoo_file(source[4:]))
    return source if source.endswith(".gguf") else None


def bench_lm(source: str, weights: list[str] | tuple[str, ...] = ("int4",), threads: int = 2, prompt_len: int = 128, gen_len: int = 64,
             runs: int = 3, build_dir: str | Path = "build/bench", ov_ir: str | None = None, progress=None) -> dict:
    from edgellm import runtime
    from edgellm.llm import peers
    from edgellm.llm.eval_text import TEXT

    say = progress or (lambda message: None)
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = Path(source[4:] if source.startswith("zoo:") else source.rstrip("/")).stem
    engines: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    prompt = None
    for w in weights:
        say(f"building {source} with --weights {w}")
        built = api.build(source, "host", build_dir / f"{name}-{w}.edgepkg", weights=w)
        lm = runtime.load(built.path, threads=threads)
        if prompt is None:
            ids = lm.encode(TEXT) if lm.manifest["llm"]["tokenizer"] else list(range(3, 3 + prompt_len))
            prompt = (ids * (prompt_len // len(ids) + 1))[:prompt_len]
        say(f"timing edgellm-{w}")
        engines[f"edgellm-{w}"] = {**_time_package(lm, prompt, gen_len, runs), "package_bytes": built.path.stat().st_size,
                                   "perplexity": lm.manifest["llm"].get("accuracy", {}).get("perplexity")}
        del lm
    gguf = _gguf_of(source)
    ov_ir = ov_ir or os.environ.get("EDGELLM_OV_GENAI_IR")
    runners = {
        "llama.cpp": (lambda: peers.llama_cpp(gguf, prompt, gen_len, threads, n_ctx=max(512, prompt_len + gen_len + 8), runs=runs))
        if gguf else None,
        "transformers-fp32": lambda: peers.transformers_fp32(gguf or source, prompt, gen_len, threads, runs=runs),
        "openvino-genai": (lambda: peers.openvino_genai(ov_ir, prompt, gen_len, threads, runs=runs)) if ov_ir else None,
    }
    for peer, run in runners.items():
        if run is None:
            skipped[peer] = "no GGUF source" if peer == "llama.cpp" else "no IR: export one with optimum-intel, pass --ov-ir"
            continue
        say(f"timing {peer}")
        try:
            engines[peer] = run()
        except peers.PeerUnavailable as e:
            skipped[peer] = e.reason
    peers.clear_cache()
    best_decode = max((e["decode_tok_s"] for n, e in engines.items() if not n.startswith("edgellm")), default=None)
    best_prefill = max((e["prefill_tok_s"] for n, e in engines.items() if not n.startswith("edgellm")), default=None)
    reference = engines.get("transformers-fp32", {}).get("new_tokens")
    for e in engines.values():
        e["decode_vs_best_peer"] = e["decode_tok_s"] / best_decode if best_decode else None
        e["prefill_vs_best_peer"] = e["prefill_tok_s"] / best_prefill if best_prefill else None
        if reference:
            e["tokens_equal_fp32_prefix"] = next((i for i, (a, b) in enumerate(zip(e["new_tokens"], reference)) if a != b), len(reference))
    return {"schema": SCHEMA, "model": name, "source": source, "threads": threads, "prompt_tokens": prompt_len, "new_tokens": gen_len,
            "runs": runs, "device": device.describe(), "engines": engines, "skipped": skipped}


def format_table(report: dict) -> str:
    lines = [f"{report['model']}: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, greedy, {report['threads']} threads, "
             f"median of {report['runs']} runs, {report['device']['cpu']}; ratio = tok/s / fastest peer's",
             f"{'engine':<24}{'decode tok/s':>13}{'ratio':>7}{'prefill tok/s':>14}{'ratio':>7}{'TTFT ms':>9}{'size MB':>9}{'= fp32 for':>11}"]
    for name, e in report["engines"].items():
        size = f"{e['package_bytes'] / 1e6:.1f}" if e.get("package_bytes") else "-"
        ratio = (lambda v: f"{v:.2f}" if v else "-")
        agree = e.get("tokens_equal_fp32_prefix")
        lines.append(f"{name:<24}{e['decode_tok_s']:>13.1f}{ratio(e['decode_vs_best_peer']):>7}{e['prefill_tok_s']:>14.0f}"
                     f"{ratio(e['prefill_vs_best_peer']):>7}{e['ttft_ms']:>9.1f}{size:>9}{(str(agree) + ' tok') if agree is not None else '-':>11}")
    lines += [f"{name:<24}skipped: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines)


def write_html(report: dict, path: str | Path) -> None:
    """The table and a bar chart of decode and prefill tokens/s per engine (matplotlib, embedded PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from html import escape

    import matplotlib.pyplot as plt

    names = list(report["engines"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 1.5))
    for ax, key, label in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode", "prefill")):
        ax.barh(names, [report["engines"][n][key] for n in names], color=["#2a7ab9" if n.startswith("edgellm") else "#9a9a9a" for n in names])
        ax.set_xlabel(f"{label} tokens/s (higher is better)")
        ax.invert_yaxis()
    fig.suptitle(report["model"])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    Path(path).write_text(f"""<!doctype html><meta charset="utf-8"><title>edgellm bench: {escape(report['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}</style>
<h1>edgellm bench</h1><img alt="tokens/s per engine" src="data:image/png;base64,{image}">
<pre>{escape(format_table(report))}</pre>""")
