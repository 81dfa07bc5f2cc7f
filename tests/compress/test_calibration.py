import logging

import numpy as np
import pytest

from edgellm.compress.calibration import RANDOM_COUNT, fingerprint, load_samples, prepare, split
from edgellm.errors import EdgeError
from edgellm.runtime.model import TensorSpec

ONE = [TensorSpec("features", (1, 1, 49, 40), "float32")]
TWO = [TensorSpec("input_ids", (1, 8), "int64"), TensorSpec("attention_mask", (1, 8), "int64")]


def _ids(i):
    return np.full((1, 8), i, np.int64)


def test_folder_of_npy(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.full((1, 1, 49, 40), i, np.float32))
    (tmp_path / "README.txt").write_text("not a sample")
    samples = load_samples(tmp_path, ONE)
    assert len(samples) == 3
    assert [float(s["features"][0, 0, 0, 0]) for s in samples] == [0, 1, 2]
    assert samples[0]["features"].dtype == np.float32 and samples[0]["features"].shape == (1, 1, 49, 40)


def test_folder_batch_axis_left_out_and_float64_converted(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 49, 40)))  # float64, no batch axis
    (s,) = load_samples(tmp_path, ONE)
    assert s["features"].shape == (1, 1, 49, 40) and s["features"].dtype == np.float32


def test_folder_of_npz_two_inputs(tmp_path):
    for i in range(4):
        np.savez(tmp_path / f"{i}.npz", input_ids=_ids(i), attention_mask=np.ones((1, 8), np.int64))
    samples = load_samples(tmp_path, TWO)
    assert len(samples) == 4 and list(samples[0]) == ["input_ids", "attention_mask"]


def test_single_npz_many_samples(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.arange(10 * 8).reshape(10, 1, 8), attention_mask=np.ones((10, 8), np.int32))
    samples = load_samples(path, TWO)
    assert len(samples) == 10
    assert samples[3]["input_ids"].shape == (1, 8) and samples[3]["attention_mask"].dtype == np.int64
    assert samples[3]["input_ids"][0, 0] == 24


def test_random_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="edgellm.compress"):
        samples = load_samples("random", TWO)
    assert len(samples) == RANDOM_COUNT
    assert "meaningless" in caplog.text or "say nothing" in caplog.text
    again = load_samples("random", TWO)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))  # seeded
    assert len({fingerprint(s) for s in samples}) == len(samples)


@pytest.mark.parametrize("make, words", [
    (lambda d: np.save(d / "x.npy", np.zeros((1, 1, 48, 40), np.float32)), ["x.npy", "shape [1, 1, 48, 40]", "[1, 1, 49, 40]"]),
    (lambda d: np.save(d / "x.npy", np.zeros((1, 1, 49, 40), np.int64)), ["x.npy", "int64", "float32"]),
    (lambda d: np.save(d / "x.npy", np.full((1, 1, 49, 40), np.nan, np.float32)), ["x.npy", "NaN"]),
    (lambda d: (d / "x.npy").write_bytes(b"garbage"), ["x.npy", "not a readable"]),
    (lambda d: None, ["has no .npy or .npz"]),
])
def test_bad_folder(tmp_path, make, words):
    make(tmp_path)
    with pytest.raises(EdgeError) as e:
        load_samples(tmp_path, ONE)
    for w in words:
        assert w in str(e.value)


def test_bad_npz_names(tmp_path):
    np.savez(tmp_path / "a.npz", input_ids=_ids(0))
    with pytest.raises(EdgeError, match="a.npz: no array for input 'attention_mask'"):
        load_samples(tmp_path, TWO)
    np.savez(tmp_path / "a.npz", input_ids=_ids(0), attention_mask=_ids(1), token_type_ids=_ids(0))
    with pytest.raises(EdgeError, match="'token_type_ids' is not an input"):
        load_samples(tmp_path, TWO)
    np.save(tmp_path / "b.npy", _ids(0))
    (tmp_path / "a.npz").unlink()
    with pytest.raises(EdgeError, match="b.npy: a .npy holds one array, the model takes 2 inputs"):
        load_samples(tmp_path, TWO)


def test_bad_single_npz(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input_ids=np.zeros((5, 1, 8), np.int64), attention_mask=np.zeros((4, 1, 8), np.int64))
    with pytest.raises(EdgeError, match="different sample counts"):
        load_samples(path, TWO)
    np.savez(path, input_ids=np.zeros((5, 1, 9), np.int64), attention_mask=np.zeros((5, 1, 8), np.int64))
    with pytest.raises(EdgeError, match=r"c.npz: input 'input_ids' has shape \[5, 1, 9\], expected \[N, 1, 8\]"):
        load_samples(path, TWO)
    with pytest.raises(EdgeError, match="does not exist"):
        load_samples(tmp_path / "nope", TWO)


def test_split_disjoint_and_noted():
    samples = [{"input_ids": _ids(i), "attention_mask": _ids(1)} for i in range(20)]
    calib, ev, note = split(samples, None)
    assert (len(calib), len(ev)) == (16, 4)
    assert not {fingerprint(s) for s in calib} & {fingerprint(s) for s in ev}
    assert "no --eval set" in note and "16/4" in note
    # duplicates of calibration samples never land in eval
    dup = samples[:5] * 4
    calib, ev, _ = split(dup, None)
    assert ev and not {fingerprint(s) for s in calib} & {fingerprint(s) for s in ev}


def test_split_given_eval_must_be_disjoint():
    samples = [{"input_ids": _ids(i), "attention_mask": _ids(1)} for i in range(6)]
    calib, ev, note = split(samples[:4], samples[4:])
    assert len(calib) == 4 and len(ev) == 2 and "given" in note
    with pytest.raises(EdgeError, match="1 of the 3 evaluation samples are also calibration samples"):
        split(samples[:4], samples[3:])
    with pytest.raises(EdgeError, match="cannot be split"):
        split(samples[:1], None)


def test_prepare_random_eval_is_disjoint(caplog):
    calib, ev, note = prepare(None, "random", TWO)
    assert len(calib) == RANDOM_COUNT and len(ev) == 8 and "random" in note
