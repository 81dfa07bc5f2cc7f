"""The int8 rewrite's pieces: scales, weight codes, which layers it takes, calibration on the build
machine for a cross target."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgellm.backends.tvm_int8.compute import pack_weight  # noqa: E402
from edgellm.backends.tvm_int8.rewrite import act_params, quantize_weight  # noqa: E402


def test_activation_params_cover_the_range_and_keep_zero_exact():
    s, zp = act_params(0.0, 6.0, "uint8")  # ReLU6 output: all 256 codes, zero point 0
    assert zp == 0 and s == pytest.approx(6.0 / 255)
    s, zp = act_params(-1.0, 3.0, "uint8")
    assert 0 < zp < 255 and (0 - zp) * s == pytest.approx(-1.0, abs=s)  # code 0 decodes to ~min
    assert (round(0.0 / s) + zp - zp) * s == 0.0  # real zero is exactly representable
    s, zp = act_params(-2.0, 2.0, "int8")
    assert -128 <= zp <= 127 and s == pytest.approx(4.0 / 255)


def test_weight_codes_are_per_channel_symmetric_and_packing_is_a_permutation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32) * np.arange(1, 33, dtype=np.float32)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and np.abs(q).max(axis=1).tolist() == [127] * 32
    assert np.abs(q * s[:, None] - w).max() <= s.max() / 2 + 1e-6
    p = pack_weight(q, 16)
    assert p.shape == (2, 2, 16, 4) and p[1, 1, 3, 2] == q[16 + 3, 4 + 2]


def test_cross_target_int8_calibrates_here_and_builds_dot_product_code():
    """--target rpi5 from this machine: the calibration model runs here (compiled for the host), the
    package gets arm64 int8 kernels (sdot) from the arm rule."""
    from edgellm import api

    with tempfile.TemporaryDirectory() as tmp:
        res = api.build("zoo:kws-cnn", "rpi5", Path(tmp) / "k.edgepkg", backend="tvm", quantize="int8", calib="random")
        q = res.manifest["compression"]["quantize"]
        assert q["calibration_samples"] > 0 and q["layers_int8"] == 6 and "sdot" in q["compute"]  # stem (im2col) + 5
        objdump = shutil.which("aarch64-linux-gnu-objdump")
        if objdump is None:
            pytest.skip("no aarch64 objdump to look at the code")
        with zipfile.ZipFile(res.path) as z:
            z.extract("model.so", tmp)
        asm = subprocess.run([objdump, "-d", str(Path(tmp) / "model.so")], capture_output=True, text=True, check=True).stdout
        assert len(re.findall(r"\bsdot\b", asm)) > 0
