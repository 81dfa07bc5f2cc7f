"""How much a compressed model disagrees with the fp32 one, on held-out samples, and the ``--max-drop`` gate.

Statistics per sample come from ``edgellm.runtime.accuracy.compare`` (the one set used everywhere); here they
are aggregated over the evaluation set, per output:

- ``top1``: share of samples whose argmax over the last axis agrees (classifiers: last dim > 1 and not an
  embedding, see ``kind``);
- ``cosine_mean`` / ``cosine_min``; ``max_abs`` (worst over samples) / ``mean_abs`` (mean over samples);
  ``sqnr_db_min``.

The drop that ``--max-drop`` limits is in percentage points: for a classifier ``(1 - top1) * 100``, for
anything else ``(1 - cosine_mean) * 100``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime.accuracy import compare
from edgellm.runtime.profile import WAKE_S, side_by_side, wake  # noqa: F401  (the timers live in the runtime: a device times too)

Sample = dict[str, np.ndarray]


def output_kind(shape, name: str = "") -> str:
    """'classifier' for logits-like outputs ([.., C] with C > 1 and a name that is not an embedding), else 'other'."""
    shape = tuple(shape)
    if len(shape) >= 1 and shape[-1] > 1 and not any(w in name.lower() for w in ("embed", "hidden", "feature", "pool")):
        return "classifier"
    return "other"


def evaluate(run_candidate: Callable[[Sample], list[np.ndarray]], run_reference: Callable[[Sample], list[np.ndarray]],
             samples: list[Sample], output_names: list[str]) -> dict:
    """Agreement of ``run_candidate`` with ``run_reference`` over ``samples``: {"samples": n, "outputs": {name: stats}}."""
    if not samples:
        raise EdgeError("no evaluation samples")
    per: dict[str, list[dict]] = {n: [] for n in output_names}
    shapes: dict[str, tuple] = {}
    for sample in samples:
        ref, got = run_reference(sample), run_candidate(sample)
        if len(ref) != len(output_names) or len(got) != len(output_names):
            raise EdgeError(f"the models give {len(ref)} and {len(got)} outputs, expected {len(output_names)}")
        for name, r, g in zip(output_names, ref, got):
            per[name].append(compare(r, g))
            shapes[name] = np.shape(r)
    outputs = {}
    for name, stats in per.items():
        kind = output_kind(shapes[name], name)
        sqnr = [s["sqnr_db"] for s in stats if s["sqnr_db"] is not None]
        agg = {
            "kind": kind,
            "cosine_mean": float(np.mean([s["cosine"] for s in stats])),
            "cosine_min": float(np.min([s["cosine"] for s in stats])),
            "max_abs": float(np.max([s["max_abs"] for s in stats])),
            "mean_abs": float(np.mean([s["mean_abs"] for s in stats])),
            "rel_max_abs": float(np.max([s["rel_max_abs"] for s in stats])),
            "sqnr_db_min": float(min(sqnr)) if sqnr else None,
        }
        if "top1" in stats[0] and kind == "classifier":
            agg["top1"] = float(np.mean([s["top1"] for s in stats]))
        agg["drop_pp"] = drop_pp(agg)
        outputs[name] = agg
    return {"samples": len(samples), "outputs": outputs}


def drop_pp(stats: dict, kind: str | None = None) -> float:
    """The drop in percentage points: of top-1 agreement for a classifier, of cosine otherwise."""
    kind = kind or stats.get("kind", "other")
    if kind == "classifier" and "top1" in stats:
        return float((1.0 - stats["top1"]) * 100.0)
    return float(max(0.0, 1.0 - stats["cosine_mean"]) * 100.0)


def check_drop(report: dict, max_drop: float | None, kind: str = "compressed") -> dict:
    """Raise EdgeError when any output's drop exceeds ``max_drop`` percentage points; ``kind`` names what was done
    (e.g. "int8", "pruned 0.3"). Returns {"max_drop": limit, "drop_pp": worst, "output": its name, "passed": True}."""
    worst_name, worst = max(((n, s["drop_pp"] if "drop_pp" in s else drop_pp(s)) for n, s in report["outputs"].items()),
                            key=lambda t: t[1])
    stats = report["outputs"][worst_name]
    measure = "top-1 agreement" if stats.get("kind") == "classifier" and "top1" in stats else "cosine similarity"
    value = stats["top1"] * 100 if measure == "top-1 agreement" else stats["cosine_mean"] * 100
    if max_drop is not None and worst > max_drop:
        raise EdgeError(f"the {kind} model drops {worst:.2f} percentage points of {measure} on output {worst_name!r} "
                        f"({value:.2f}% agreement with fp32 over {report['samples']} evaluation samples), over the limit "
                        f"--max-drop {max_drop:g}",
                        ("calibrate on more representative data or use --quantize int8-weights" if "int8" in kind else
                         "lower the --prune ratio or fine-tune the pruned model") + ", or raise --max-drop")
    return {"max_drop": max_drop, "drop_pp": worst, "output": worst_name, "measure": measure, "passed": True}


def torch_runner(module, input_names: list[str]) -> Callable[[Sample], list[np.ndarray]]:
    """Run a PyTorch module (eager, fp32) on a feed dict: the reference for evaluation."""
    import torch

    from edgellm.trace import _flatten

    def run(sample: Sample) -> list[np.ndarray]:
        with torch.no_grad():
            return _flatten(module(*(torch.from_numpy(np.ascontiguousarray(sample[n])) for n in input_names)))

    return run


def reference_runner(src, input_names: list[str]) -> Callable[[Sample], list[np.ndarray]]:
    """The original fp32 model of an ``edgellm.source.Source``: PyTorch eager, or ONNX Runtime for ONNX.
    Make it before pruning: it keeps the unpruned model."""
    if src.kind == "onnx":
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # ORT's graph warnings are not the user's business
        session = ort.InferenceSession(src.model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda sample: session.run(None, {n: sample[n] for n in input_names})
    module = src.model.module() if src.kind == "pt2" else src.model
    return torch_runner(module, input_names)


def engine_runner(engine, input_names: list[str]) -> Callable[[Sample], list[np.ndarray]]:
    """Run an edgellm runtime engine (``engine.run(list of arrays)``) on a feed dict."""
    return lambda sample: engine.run([sample[n] for n in input_names])

