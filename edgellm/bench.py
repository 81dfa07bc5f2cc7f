"""`edgellm bench`: edgellm's packages against the peers, side by side in one process.

Peers: PyTorch eager, ONNX Runtime and plain OpenVINO, both with its defaults (on a CPU with bf16
that means bf16 arithmetic; the accuracy column shows what that costs) and with the f32 hint that
edgellm's OpenVINO packages use to stay within the fp32 tolerance. edgellm: one package per
backend the host target allows, and the one `--backend auto` would keep. Same inputs, same
thread count, warm-up, runs in short blocks that take turns, so load drift hits every engine alike.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from edgellm import api, precision, targets
from edgellm.compress.evaluate import wake
from edgellm.runtime import device
from edgellm.runtime.accuracy import compare

SCHEMA = "edgellm.bench/1"
PEERS = ("pytorch", "onnxruntime", "openvino", "openvino-f32", "onnxruntime-int8")


def _ort_int8(onnx_path: Path, samples: list[dict], workdir: Path) -> Path:
    """ONNX Runtime's own static int8 (QDQ, per-channel weights), calibrated on the same samples as edgellm."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    out = workdir / "model-int8.onnx"
    logging.disable(logging.WARNING)  # quantize_static warns on the root logger (LayerNorm axes, pre-processing advice)
    try:
        quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return out


def _peers(src, traced, threads: int, workdir: Path, int8_samples: list[dict] | None = None) -> dict:
    """{peer: run(feed) -> list of arrays} for the peers this source can feed."""
    import onnxruntime as ort
    import openvino as ov
    import torch

    ort.set_default_logger_severity(3)  # ORT's own warnings (unused initializers) reach the user otherwise; quantize_static's sessions too
    runners = {}
    feed_order = [s.name for s in traced.inputs]
    if isinstance(src.model, torch.nn.Module):
        torch.set_num_threads(threads)
        module = src.model

        def run_torch(feed):
            with torch.no_grad():
                out = module(*[torch.from_numpy(feed[n]) for n in feed_order])
            return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

        runners["pytorch"] = run_torch
        onnx_path = workdir / "model.onnx"
        args = tuple(torch.from_numpy(traced.example_inputs[n]) for n in feed_order)
        torch.onnx.export(module, args, str(onnx_path), input_names=feed_order, dynamo=False)
    elif src.kind == "onnx":
        onnx_path = workdir / "model.onnx"
        onnx_path.write_bytes(src.model.SerializeToString())
    else:
        return runners
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for name, path in [("onnxruntime", onnx_path)] + ([("onnxruntime-int8", _ort_int8(onnx_path, int8_samples, workdir))] if int8_samples else []):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda feed, s=session: s.run(None, feed)
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    model.reshape({model.inputs[i]: list(s.shape) for i, s in enumerate(traced.inputs)})
    for name, hints in (("openvino", {}), ("openvino-f32", {"INFERENCE_PRECISION_HINT": "f32"})):
        request = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, **hints}).create_infer_request()
        runners[name] = lambda feed, r=request: [np.array(v) for v in r.infer([feed[n] for n in feed_order]).values()]
    return runners


def _interleaved(runners: dict, feed: dict, runs: int, warmup: int, rounds: int = 5, wake_s: float | None = None) -> dict[str, list[float]]:
    """Each engine runs in short blocks, the blocks taking turns: drift in machine load hits every
    engine alike, while a block keeps one engine's thread pool warm and the others' spinning
    threads out of its way (per-call round-robin measures thread-pool wake-ups, not the engines)."""
    for run in runners.values():
        for _ in range(warmup):
            run(feed)
    times = {k: [] for k in runners}
    per_block = max(1, runs // rounds)
    while min(len(v) for v in times.values()) < runs:
        for name, run in runners.items():
            wake(lambda: run(feed)) if wake_s is None else wake(lambda: run(feed), wake_s)
            for _ in range(min(per_block, runs - len(times[name]))):
                t0 = time.perf_counter()
                run(feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def bench_one(ref: str, threads: int, runs: int, warmup: int, build_dir: Path, progress=None,
              quantize: str | None = None, calib: str = "random", tune: int | None = None, tune_budget: float | None = None) -> dict:
    from edgellm import runtime
    from edgellm import source as sources
    from edgellm.errors import EdgeError
    from edgellm.trace import trace

    say = progress or (lambda message: None)
    src = sources.load(ref)
    traced = trace(src)
    host = targets.host()
    int8_samples = None
    if quantize:
        from edgellm.compress.calibration import load_samples, split

        int8_samples = split(load_samples(calib, traced.inputs), None)[0]  # what edgellm calibrates on, too
    variants = [(f"edgellm-{b}", {"backend": b}) for b in host.backends]
    if tune and "tvm" in host.backends:  # MetaSchedule, kept only where it beats edgellm's rules
        variants.append(("edgellm-tvm-tuned", {"backend": "tvm", "tune": tune, "tune_budget": tune_budget}))
    if quantize:
        variants += [(f"edgellm-{b}-{quantize}", {"backend": b, "quantize": quantize, "calib": calib}) for b in host.backends]
    if precision.has_bf16(host):  # the peers' bf16 (plain OpenVINO's default here) meets edgellm's own
        variants += [(f"edgellm-{b}-bf16", {"backend": b, "precision": "bf16"}) for b in precision.backends_for(host, "bf16")]
    skipped = {}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp:
        say(f"{src.name}: setting up the peers")
        runners = _peers(src, traced, threads, Path(tmp), int8_samples)
        sizes = {}
        for name, options in variants:
            say(f"{src.name}: building {name}")
            try:
                pkg = api.build(ref, host, build_dir / f"{src.name}-{name}.edgepkg", **options).path
            except EdgeError as e:
                skipped[name] = str(e)
                continue
            engine = runtime.load(pkg, threads=threads)._engine
            runners[name] = lambda feed, e=engine: e.run([feed[s.name] for s in traced.inputs])
            sizes[name] = pkg.stat().st_size
        feed = traced.example_inputs
        accuracy = {}
        for name, run in runners.items():
            outs = run(feed)
            stats = [compare(traced.reference[s.name], o) for s, o in zip(traced.outputs, outs)]
            accuracy[name] = {"rel_max_abs": max(s["rel_max_abs"] for s in stats), "cosine": min(s["cosine"] for s in stats)}
        say(f"{src.name}: timing {len(runners)} engines, {runs} interleaved runs")
        times = _interleaved(runners, feed, runs, warmup)
    p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
    best_peer = min((p50[k] for k in PEERS if k in p50), default=min(p50.values()))
    engines = {k: {"p50_ms": p50[k], "p90_ms": float(np.percentile(times[k], 90)), "ratio_to_best_peer": p50[k] / best_peer,
                   "package_bytes": sizes.get(k), **accuracy[k]} for k in runners}
    correct = [k for k in sizes if engines[k]["rel_max_abs"] <= 1e-4]
    auto = min(correct, key=lambda k: p50[k]) if correct else None
    return {"model": src.name, "source": ref, "engines": engines, "best_peer_p50_ms": best_peer, "skipped": skipped,
            "auto_choice": auto, "auto_ratio_to_best_peer": engines[auto]["ratio_to_best_peer"] if auto else None}


def bench(refs: list[str], threads: int = 2, runs: int = 50, warmup: int = 5, build_dir: str | Path | None = None, progress=None,
          quantize: str | None = None, calib: str = "random", tune: int | None = None, tune_budget: float | None = None) -> dict:
    """With ``quantize``, also ONNX Runtime's static int8 as a peer and edgellm's int8 packages, calibrated alike;
    with ``tune``, also a TVM package tuned with that many MetaSchedule trials."""
    build_dir = Path(build_dir or tempfile.mkdtemp(prefix="edgellm-bench-pkgs-"))
    build_dir.mkdir(parents=True, exist_ok=True)
    results = [bench_one(ref, threads, runs, warmup, build_dir, progress, quantize, calib, tune, tune_budget) for ref in refs]
    return {"schema": SCHEMA, "threads": threads, "runs": runs, "warmup": warmup, "quantize": quantize, "calib": calib,
            "device": device.describe(), "models": results}


def format_table(report: dict) -> str:
    lines = [f"p50/p90 ms over {report['runs']} interleaved runs, {report['threads']} threads, {report['device']['cpu']}; "
             "ratio = p50 / fastest peer's p50 (peers: PyTorch eager, ONNX Runtime (+ its static int8 with --quantize), "
             "plain OpenVINO at its default and at f32 precision)",
             f"{'model':<14}{'engine':<24}{'p50':>9}{'p90':>9}{'ratio':>7}{'size MB':>9}{'max err':>10}{'cosine':>10}"]
    for m in report["models"]:
        for name, e in m["engines"].items():
            size = f"{e['package_bytes'] / 1e6:.2f}" if e["package_bytes"] else "-"
            mark = "  <- auto" if name == m["auto_choice"] else ""
            lines.append(f"{m['model']:<14}{name:<24}{e['p50_ms']:>9.3f}{e['p90_ms']:>9.3f}{e['ratio_to_best_peer']:>7.2f}"
                         f"{size:>9}{e['rel_max_abs']:>10.1e}{e['cosine']:>10.6f}{mark}")
        lines += [f"{m['model']:<14}{name:<24}  skipped: {why}" for name, why in m.get("skipped", {}).items()]
    return "\n".join(lines)


def write_html(report: dict, path: str | Path) -> None:
    """A page with the table and a grouped bar chart of p50 latency (matplotlib, embedded PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    engines = list(dict.fromkeys(e for m in models for e in m["engines"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        names = [e for e in engines if e in m["engines"]]
        values = [m["engines"][e]["p50_ms"] for e in names]
        colors = ["#2a7ab9" if e.startswith("edgellm") else "#9a9a9a" for e in names]
        ax.barh(names, values, color=colors)
        ax.set_title(m["model"])
        ax.set_xlabel("p50 latency, ms (lower is better)")
        ax.invert_yaxis()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    from html import escape

    Path(path).write_text(f"""<!doctype html><meta charset="utf-8"><title>edgellm bench</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}</style>
<h1>edgellm bench</h1><img alt="p50 latency per engine" src="data:image/png;base64,{image}">
<pre>{escape(format_table(report))}</pre>""")
