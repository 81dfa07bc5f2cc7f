"""Latency, throughput, load time and memory of a loaded package, in one JSON schema.

The schema (``edgellm.profile/1``, documented in docs/profile-schema.md) is what every
backend and every place (here, a device, an emulator) fills the same way.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import numpy as np

from edgellm import __version__
from edgellm.runtime import device

SCHEMA = "edgellm.profile/1"


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def time_runs(run, runs: int, warmup: int = 0) -> list[float]:
    """Seconds each of ``runs`` calls of ``run()`` took, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return seconds


WAKE_S = 0.02  # untimed running of an engine before each of its timed blocks
SETTLE_S = 0.1  # a pause before that: the last engine's workers stop spinning


def wake(run: Callable[[], object], seconds: float = WAKE_S) -> None:
    """Pause ``SETTLE_S``, then run ``run`` untimed for ``seconds`` (at least once): the last engine's
    spinning workers give the cores back, and this engine's threads wake. One call was not enough (kws-cnn:
    ONNX Runtime 0.077 ms right after TVM, 0.124 ms after PyTorch; TVM 0.157 ms right after ONNX Runtime's
    block, 0.077 alone), nor was running on for 20 ms when a call takes longer than ORT's workers spin
    (the int8 1024^3 dense: 174 GOP/s right after ORT's block, 258 after a 0.1 s pause)."""
    time.sleep(SETTLE_S)
    until = time.perf_counter() + seconds
    run()
    while time.perf_counter() < until:
        run()


def side_by_side(runners: dict[str, Callable[[], object]], blocks: int = 6, per_block: int = 20, warmup: int = 5) -> dict[str, float]:
    """p50 milliseconds of each zero-argument ``runners`` callable, measured in alternating blocks in this
    process (A x per_block, B x per_block, A, B, ...) so drift in clocks or load hits all of them alike."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(blocks):
        for name, run in runners.items():
            wake(run)
            for _ in range(per_block):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def latency_stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "min": float(ms.min()),
        "mean": float(ms.mean()),
        "std": float(ms.std()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


def per_op_table(events: list[tuple[str, float]], runs: int) -> list[dict]:
    """Time per VM call, summed by name, per inference, largest share first."""
    totals: dict[str, list[float]] = {}
    for name, seconds in events:
        totals.setdefault(name, []).append(seconds)
    grand = sum(sum(v) for v in totals.values()) or 1.0
    rows = [
        {
            "name": name,
            "kind": "runtime" if name.startswith("vm.builtin.") else "kernel",
            "calls": len(v) // runs,
            "ms": sum(v) * 1e3 / runs,
            "share": sum(v) / grand,
        }
        for name, v in totals.items()
    ]
    return sorted(rows, key=lambda r: r["ms"], reverse=True)


def profile(model, runs: int = 100, warmup: int = 10, per_op: bool = False, inputs: dict | None = None) -> dict:
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    inputs = inputs if inputs is not None else model.example_inputs()
    arrays = model._arrange((), inputs)
    model.run(*arrays)  # the first inference, timed by the model itself
    for _ in range(warmup):
        model._engine.run(arrays)
    t_all = time.perf_counter()
    seconds = time_runs(lambda: model._engine.run(arrays), runs)
    wall = time.perf_counter() - t_all
    manifest = model.manifest
    report = {
        "schema": SCHEMA,
        "edgellm_version": __version__,
        "package": str(model.path),
        "model": manifest.get("model", {}).get("name", model.path.stem),
        "backend": manifest["backend"]["name"],
        "target": manifest["target"]["name"],
        "device": {**device.describe(), "threads": model.threads, "emulated": False},
        "runs": runs,
        "warmup": warmup,
        "load_ms": model.load_ms,
        "first_inference_ms": model.first_inference_ms,
        "latency_ms": latency_stats(seconds),
        "throughput_per_s": runs / wall,
        "peak_rss_mb": _peak_rss_mb(),
        "per_op": None,
    }
    if per_op:
        op_runs = max(1, min(runs, 20))
        report["per_op"] = per_op_table(model._engine.op_times(arrays, op_runs), op_runs)
    return report


def format_report(report: dict, top: int = 15) -> str:
    """The human twin of the JSON report."""
    lat = report["latency_ms"]
    dev = report["device"]
    lines = [
        f"{report['model']}  [{report['backend']} on {report['target']}]  "
        f"{dev['machine']} {dev['cpu']}, {dev['threads']} thread(s)" + ("  (EMULATED: not device speed)" if dev.get("emulated") else ""),
        f"  latency ms   p50 {lat['p50']:.3f}   p90 {lat['p90']:.3f}   p99 {lat['p99']:.3f}   "
        f"min {lat['min']:.3f}   mean {lat['mean']:.3f}   max {lat['max']:.3f}   ({report['runs']} runs, {report['warmup']} warm-up)",
        f"  throughput   {report['throughput_per_s']:.1f} inferences/s",
        f"  load {report['load_ms']:.1f} ms   first inference {report['first_inference_ms']:.1f} ms   peak RSS {report['peak_rss_mb']:.0f} MB",
    ]
    if report.get("per_op"):
        lines.append(f"  {'share':>6}  {'ms':>9}  {'calls':>5}  op")
        for row in report["per_op"][:top]:
            lines.append(f"  {row['share'] * 100:5.1f}%  {row['ms']:9.3f}  {row['calls']:>5}  {row['name']}")
        rest = report["per_op"][top:]
        if rest:
            lines.append(f"  {sum(r['share'] for r in rest) * 100:5.1f}%  {sum(r['ms'] for r in rest):9.3f}         ({len(rest)} more)")
    return "\n".join(lines)


def format_lm_report(report: dict) -> str:
    """The human twin of a language model's ``edgellm.lm-profile/1`` report."""
    mem = report["memory_mb"]
    lines = [
        f"{report['package']}  [{report['weights']} weights on {report['target']}], {report['threads']} thread(s)",
        f"  prompt {report['prompt_tokens']} tokens: time to first token {report['ttft_ms']:.1f} ms, prefill {report['prefill_tok_s']:.0f} tok/s",
        f"  decode {report['decode_tok_s']:.1f} tok/s over {report['new_tokens']} new tokens (median of {report['runs']} runs)",
    ]
    long = report.get("long_context")
    if long:
        lines.append(f"  long context ({long['prompt_tokens']} tokens): first token {long['ttft_ms']:.0f} ms, "
                     f"prefill {long['prefill_tok_s']:.0f} tok/s, decode {long['decode_tok_s']:.1f} tok/s")
    lines.append(f"  memory: {mem['rss_generating']:.0f} MB resident while generating = runtime baseline {mem['baseline']:.0f} MB + "
                 f"{mem['overhead_ratio']:.2f} x (weights {mem['weights']:.0f} MB + KV cache {mem['kv_cache']:.0f} MB); "
                 f"peak while loading {mem['rss_peak']:.0f} MB; load {report['load_ms']:.0f} ms")
    return "\n".join(lines)
