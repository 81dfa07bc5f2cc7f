import numpy as np
import pytest

from edgellm.compress.evaluate import check_drop, evaluate, side_by_side
from edgellm.errors import EdgeError


def _samples(n=10):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 12)).astype(np.float32)} for _ in range(n)]


def test_classifier_top1_and_cosine():
    samples = _samples()
    ref = lambda s: [s["x"] * 2.0]
    flip = {id(samples[0]["x"]), id(samples[1]["x"])}

    def cand(s):  # two samples of ten get another argmax
        out = s["x"] * 2.0
        if id(s["x"]) in flip:
            out = out.copy()
            out[0, out.argmin()] = 100.0
        return [out]

    report = evaluate(cand, ref, samples, ["logits"])
    stats = report["outputs"]["logits"]
    assert report["samples"] == 10 and stats["kind"] == "classifier"
    assert stats["top1"] == pytest.approx(0.8) and stats["drop_pp"] == pytest.approx(20.0)
    assert stats["cosine_min"] < stats["cosine_mean"] < 1.0 and stats["max_abs"] > 90
    assert check_drop(report, 25.0, "int8")["passed"]
    with pytest.raises(EdgeError) as e:
        check_drop(report, 1.0, "int8")
    msg = str(e.value)
    assert "int8 model drops 20.00 percentage points of top-1 agreement" in msg and "--max-drop 1" in msg and "'logits'" in msg


def test_embedding_uses_cosine():
    samples = _samples()
    report = evaluate(lambda s: [s["x"] + 0.05], lambda s: [s["x"]], samples, ["embedding"])
    stats = report["outputs"]["embedding"]
    assert stats["kind"] == "other"
    assert stats["drop_pp"] == pytest.approx((1 - stats["cosine_mean"]) * 100)
    assert check_drop(report, None)["passed"]  # no limit: report only
    with pytest.raises(EdgeError, match="percentage points of cosine similarity"):
        check_drop(report, stats["drop_pp"] / 2)


def test_side_by_side_times_each():
    times = side_by_side({"a": lambda: None, "b": lambda: sum(range(1000))}, blocks=2, per_block=5, warmup=1)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
