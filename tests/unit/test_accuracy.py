import numpy as np

from edgellm.runtime.accuracy import compare


def test_identical_arrays_agree_exactly():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = compare(a, a)
    assert s["max_abs"] == 0 and s["rel_max_abs"] == 0 and s["sqnr_db"] is None
    assert abs(s["cosine"] - 1) < 1e-12 and s["top1"] == 1.0


def test_error_is_relative_to_the_output_scale():
    ref = np.array([[100.0, -50.0, 0.0]])
    s = compare(ref, ref + [[1.0, 0.0, 0.0]])
    assert s["max_abs"] == 1.0
    assert s["rel_max_abs"] == 0.01
    assert 30 < s["sqnr_db"] < 50


def test_top1_counts_argmax_disagreement():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert compare(ref, got)["top1"] == 0.5
