"""TVM int8 on x86_64: the packed u8 x s8 -> s32 dense really runs the target's instruction (vpdpbusd with
AVX-512 VNNI or AVX-VNNI, vpmaddubsw + vpmaddwd on AVX2 / AVX-512BW), is exact, and a small model built
with ``--quantize int8`` keeps its fp32 answers. A kernel whose instructions this CPU lacks runs on an
emulated Intel core that has them (tests/x86_emulator.py: Bochs), so every form is checked for its results.

Tolerances: the int8 kernel is integer arithmetic, compared for exact equality with numpy (int64).
The small model: cosine >= 0.995 vs fp32 and top-1 agreement >= 90% on 32 held-out random inputs
(measured 0.9999 / 100%).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgellm import backends, targets
from edgellm.backends.tvm_int8.compute import dense_int8_primfunc, pack_weight, packing
from edgellm.backends.tvm_int8.x86 import PackedDenseX86
from edgellm.runtime import device, engines
from tests import x86_emulator

AVX512_VNNI = targets.resolve("x86_64-avx512")
CAN_RUN = {"avx512f", "avx512_vnni"} <= set(device.cpu_flags()) if hasattr(device, "cpu_flags") else False


def _tvm_target(t=AVX512_VNNI):
    return tvm.target.Target(t.tvm)


def _x86(mcpu: str):
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})


def test_packing_is_chosen_from_the_target():
    assert packing(_tvm_target())[:3] == (16, "uint8", 127)
    assert packing(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))[:3] == (4, "int8", 127)
    # AVX2 / AVX-512 without VNNI: vpmaddubsw's int16 pair sums hold 2 * 255 * 63, not 2 * 255 * 127: 7-bit weights
    assert packing(_x86("x86-64-v3"))[:3] == (8, "uint8", 63)
    assert packing(_x86("x86-64-v4"))[:3] == (16, "uint8", 63)
    assert packing(_x86("alderlake"))[:3] == (8, "uint8", 127)  # AVX-VNNI: ymm vpdpbusd
    assert packing(_x86("x86-64-v2")) is None  # SSE only


def test_int8_without_avx2_is_a_clear_error(tmp_path):
    from edgellm.errors import EdgeError

    sse = targets.Target(**{**targets.resolve("x86_64").to_dict(), "name": "x86_64-sse",
                            "tvm": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2"}})
    with pytest.raises(EdgeError, match="needs AVX2 or AVX-512"):
        backends.get("tvm").compile(_Small.traced(), sse, {"quantize": "int8", "calibration": []}, tmp_path)


#: (target, instruction and register the kernel must use, /proc/cpuinfo flags needed to run it, the Bochs
#: CPU model that has them, for hosts that do not)
KERNELS = [
    (AVX512_VNNI.tvm, r"vpdpbusd\s+.*zmm", {"avx512f", "avx512_vnni"}, "sapphire_rapids"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}, r"vpmaddubsw\s+.*ymm", {"avx2"}, "skylake_x"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}, r"vpmaddubsw\s+.*zmm", {"avx512f", "avx512bw"},
     "skylake_x"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}, r"vpdpbusd\s+.*ymm", {"avx2", "avx_vnni"},
     "arrow_lake"),
]


@pytest.mark.parametrize("target_dict, instruction, flags, emulated", KERNELS, ids=["avx512-vnni", "avx2", "avx512bw", "avx-vnni"])
@pytest.mark.parametrize("m,k,n", [(49, 96, 160), (8, 64, 16), (1, 256, 64)])
def test_packed_dense_is_exact_with_the_targets_instruction(target_dict, instruction, flags, emulated, m, k, n):
    target = tvm.target.Target(target_dict)
    pk = packing(target)
    sch = PackedDenseX86().apply(dense_int8_primfunc(m, k, n, pk.lanes, "uint8"), target, False)
    assert sch is not None, "the x86 int8 rule did not schedule the packed dense"
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target)
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert re.search(instruction, asm), f"no {instruction} in the generated code"
    rng = np.random.default_rng(0)
    # the extremes included: 255 x +-weight_max in every pair is where vpmaddubsw's int16 sums would saturate
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-pk.weight_max, pk.weight_max + 1, (n, k)).astype(np.int8)
    a[0, :] = 255
    w[0, :], w[-1, :] = pk.weight_max, -pk.weight_max
    packed = pack_weight(w, pk.lanes)
    if flags <= set(device.cpu_flags()):
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros((m, n), np.int32), dev)
        lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(packed, dev), out)
        out = out.numpy()
    else:
        out = x86_emulator.run_primfunc(lib, [a, packed, np.zeros((m, n), np.int32)], emulated)[2]
    np.testing.assert_array_equal(out, a.astype(np.int64) @ w.astype(np.int64).T)


def test_emulated_cpu_refuses_an_instruction_its_model_lacks():
    """The emulator is a real check: Skylake-X has AVX-512 but no VNNI, so the VNNI kernel stops there
    with #UD, while the same kernel returns on Sapphire Rapids (above)."""
    target = _tvm_target()
    pk = packing(target)
    sch = PackedDenseX86().apply(dense_int8_primfunc(8, 64, 16, pk.lanes, "uint8"), target, False)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target)
    arrays = [np.ones((8, 64), np.uint8), np.ones((1, 16, 16, 4), np.int8), np.zeros((8, 16), np.int32)]
    with pytest.raises(x86_emulator.EmulationError, match="#UD"):
        x86_emulator.run_primfunc(lib, arrays, "skylake_x")


def test_rule_leaves_float_matmuls_alone():
    from tvm import te

    a = te.placeholder((16, 64), "float32", name="A")
    b = te.placeholder((64, 32), "float32", name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((16, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    assert PackedDenseX86().apply(te.create_prim_func([a, b, c]), _tvm_target(), False) is None


class _Small:
    """1x1 convs (int8) around a depthwise conv (fp32), then a linear classifier (int8)."""

    @staticmethod
    def traced():
        import torch
        from torch import nn

        from edgellm.source import Source
        from edgellm.trace import trace

        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6(),
            nn.Conv2d(32, 48, 1), nn.Flatten(), nn.Linear(48 * 6 * 6, 10)).eval()
        x = torch.randn(1, 8, 6, 6)
        src = Source("small", "torch", "small", model, {"x": x})
        return trace(src)


def _objdump_count(so: Path, instruction: str) -> int:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(rf"\b{instruction}\b", out))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("target, instruction, flags", [(AVX512_VNNI, "vpdpbusd", {"avx512f", "avx512_vnni"}),
                                                        (targets.resolve("x86_64"), "vpmaddubsw", {"avx2"})],
                         ids=["avx512-vnni", "avx2"])
def test_small_model_int8_build_runs_int8_and_matches_fp32(target, instruction, flags):
    traced = _Small.traced()
    names = [s.name for s in traced.inputs]
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(64)]
    backend = backends.get("tvm")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a").mkdir()
        (Path(tmp) / "b").mkdir()
        fp32 = backend.compile(traced, target, {}, Path(tmp) / "a")
        int8 = backend.compile(traced, target, {"quantize": "int8", "calibration": samples[:32]}, Path(tmp) / "b")
        assert _objdump_count(int8.files["model.so"], instruction) > 0, f"no {instruction} in the int8 model.so"
        assert _objdump_count(fp32.files["model.so"], instruction) == 0
        info = int8.info["quantize"]
        assert info["layers_int8"] == 3 and info["activation_mode"] == "static" and info["calibration_samples"] == 32
        assert "conv2d: depthwise" in info["layers_fp32"] and info["depthwise_8bit_input"].startswith("1 of")
        assert info["weights"].startswith("int8" if instruction == "vpdpbusd" else "int7")
        if not flags <= set(device.cpu_flags()):
            pytest.skip(f"this CPU lacks {sorted(flags - set(device.cpu_flags()))}")
        run = {}
        for key, c in (("fp32", fp32), ("int8", int8)):
            members = {n: Path(p).read_bytes() for n, p in c.files.items()}
            run[key] = engines.get("tvm")({"backend": c.info, "target": target.to_dict()}, members, 2)
    cos, agree = [], []
    for s in samples[32:]:
        a = run["fp32"].run([s[n] for n in names])[0].ravel()
        b = run["int8"].run([s[n] for n in names])[0].ravel()
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        agree.append(a.argmax() == b.argmax())
    assert min(cos) >= 0.995, cos
    assert np.mean(agree) >= 0.9


@pytest.mark.slow
def test_small_model_int8_module_runs_on_an_emulated_vnni_core():
    """The small model's int8 module for x86_64-avx512 (VNNI: vpdpbusd dense and depthwise), every kernel run
    on Bochs's Sapphire Rapids with the inputs it gets when the same graph (compiled for this CPU) runs here:
    the integer kernels equal, the rest within 1e-5 of the output scale."""
    from edgellm.backends import tvm_int8
    from edgellm.backends.tvm_base import to_relax

    traced = _Small.traced()
    names = [s.name for s in traced.inputs]
    rng = np.random.default_rng(0)
    samples = [{n: rng.standard_normal(traced.example_inputs[n].shape).astype(np.float32) for n in names} for _ in range(8)]
    target = _tvm_target()
    mod, info = tvm_int8.quantize(to_relax(traced), target, {"quantize": "int8", "calibration": samples}, names)
    assert info["layers_int8"] == 3
    host = tvm.target.Target(targets.host().tvm)
    x = tvm.runtime.tensor(samples[0][names[0]])
    report = x86_emulator.check_module(x86_emulator.build_module(mod, host, False), x86_emulator.build_module(mod, target, True),
                                       "sapphire_rapids", lambda vm: vm["main"](x))
    checked = {k: v for k, v in report.items() if not isinstance(v, str)}
    dense = [k for k in report if "dense_int8" in k]
    assert dense and all(k in checked for k in dense), report
    assert max(checked.values()) <= 1e-5, report
