"""AMX tiles for the packed int8 and bf16 denses (edgellm/backends/tvm_amx.py).

Every machine compiles the kernels for x86_64-amx and finds ``tdpbusd`` / ``tdpbf16ps`` in them; a CPU with AMX
(``amx_int8`` / ``amx_bf16`` in /proc/cpuinfo) also runs them -- Bochs has no AMX, so elsewhere those checks skip.
Tolerances: int8 is exact (int64 numpy); bf16 multiplies bf16 values exactly and accumulates in fp32, held to 1e-6
of the output scale against a float64 product of the same bf16 inputs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgellm import api, targets
from edgellm.backends import tvm_amx, tvm_bf16, tvm_int8
from edgellm.backends.tvm_int8.compute import dense_int8_primfunc, pack_weight
from edgellm.runtime.device import cpu_flags

SPR = tvm.target.Target(targets.resolve("x86_64-amx").tvm)
needs_amx = pytest.mark.skipif(not {"amx_tile", "amx_int8", "amx_bf16"} <= cpu_flags(),
                               reason="/proc/cpuinfo lacks amx_tile / amx_int8 / amx_bf16 (and Bochs has no AMX)")


def test_plan_takes_shapes_the_tiles_fit_and_leaves_the_rest_to_the_vector_rules():
    P = tvm_amx.Plan
    assert tvm_amx.plan(tvm_amx.INT8, 128, 1536, 384) == P(tm=16, r=2, c=2, kstep=64)
    assert tvm_amx.plan(tvm_amx.BF16, 128, 384, 384) == P(16, 2, 2, 32)      # 32 bf16 = one 64-byte row
    assert tvm_amx.plan(tvm_amx.INT8, 784, 144, 192) == P(16, 1, 1, 64)      # 49 row tiles, 9 column tiles: odd
    assert tvm_amx.plan(tvm_amx.INT8, 1, 1000, 1280) is None                 # a GEMV: one row of a 16-row tile
    assert tvm_amx.plan(tvm_amx.INT8, 196, 64, 64) is None                   # rows not whole tiles
    assert tvm_amx.plan(tvm_amx.INT8, 3136, 96, 96) is None                  # K not whole 64-byte rows


def test_tile_configuration_is_palette_1_with_8_tiles_of_16_rows_by_64_bytes():
    cfg = tvm_amx.TILE_CONFIG
    assert len(cfg) == 64 and cfg[0] == 1 and not any(cfg[1:16])
    assert [int.from_bytes(cfg[16 + 2 * t:18 + 2 * t], "little") for t in range(16)] == [64] * 8 + [0] * 8
    assert list(cfg[48:64]) == [16] * 8 + [0] * 8


def _int8_case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    a[0], w[0] = 255, -128  # the extremes: the int32 accumulators must hold them
    return a, w, a.astype(np.int64) @ w.astype(np.int64).T


def _compile_int8(m, k, n):
    sch = tvm_int8.amx_dense_rule().apply(dense_int8_primfunc(m, k, n, 16, "uint8"), SPR, False)
    assert sch is not None, "the AMX rule did not schedule the packed dense"
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), SPR)


SHAPES = [(128, 384, 1536), (784, 192, 144), (64, 1536, 384), (32, 64, 16)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_dense_on_tiles_is_exact(m, k, n):
    lib = _compile_int8(m, k, n)
    assert re.search(r"\btdpbusd\b", lib.mod.inspect_source("asm")), "no tdpbusd in the generated code"
    if not {"amx_tile", "amx_int8"} <= cpu_flags():
        pytest.skip("/proc/cpuinfo lacks amx_int8: compiled and inspected only")
    a, w, ref = _int8_case(m, k, n)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(pack_weight(w, 16)), out)
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.parametrize("m,k,n", [(128, 384, 384), (784, 96, 48), (32, 64, 16)])
def test_bf16_dense_on_tiles_matches_float64(m, k, n):
    sch = tvm_bf16.bf16_rules()[0].apply(tvm_bf16.dense_bf16_primfunc(m, k, n), SPR, False)
    assert sch is not None, "the AMX rule did not schedule the packed bf16 dense"
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), SPR)
    assert re.search(r"\btdpbf16ps\b", lib.mod.inspect_source("asm")), "no tdpbf16ps in the generated code"
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        pytest.skip("/proc/cpuinfo lacks amx_bf16: compiled and inspected only")
    rng = np.random.default_rng(1)
    a = tvm_bf16.to_bf16_bits(rng.standard_normal((m, k)).astype(np.float32))
    w = tvm_bf16.to_bf16_bits(rng.standard_normal((n, k)).astype(np.float32))
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(tvm_bf16.pack_weight(w)), out)
    ref = tvm_bf16.bf16_bits_to_f32(a).astype(np.float64) @ tvm_bf16.bf16_bits_to_f32(w).astype(np.float64).T
    assert np.abs(out.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def _attention_module(b, m, k, n):
    from tvm import relax

    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((*b, m, k), "float32"))
    kt = relax.Var("kt", relax.TensorType((*b, k, n), "float32"))
    with bb.function("main", [q, kt]):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, kt))
            out = bb.emit_output(relax.op.multiply(s, relax.const(0.125, "float32")))
        bb.emit_func_output(out)
    return bb.get()


# MiniLM's Q K^T and P V ([heads, ...]); an ONNX export's 4-D [batch, heads, ...] form
@pytest.mark.parametrize("b,m,k,n", [((12,), 128, 32, 128), ((12,), 128, 128, 32), ((1, 4), 64, 64, 32)])
def test_attention_matmul_on_tiles_matches_float64(b, m, k, n):
    """Two activations multiplied (attention): both rounded to bf16 in the graph, the right one packed at run time,
    a batched dense on tiles with the scale fused; held to 1e-6 of the scale against float64 on the same bf16 values."""
    from edgellm.backends import tvm_pipelines

    mod = _attention_module(b, m, k, n)
    assert tvm_bf16.attention_to_tiles(mod, tvm.target.Target(targets.resolve("x86_64-avx512-bf16").tvm))[1] == 0
    mod, count = tvm_bf16.attention_to_tiles(mod, SPR)
    assert count == 1
    ex = tvm.compile(mod, SPR, relax_pipeline=tvm_pipelines.get("edgellm", SPR))
    assert re.search(r"\btdpbf16ps\b", ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ""), \
        "no tdpbf16ps in the generated code"
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        pytest.skip("/proc/cpuinfo lacks amx_bf16: compiled and inspected only")
    rng = np.random.default_rng(2)
    x, y = (rng.standard_normal(s).astype(np.float32) for s in ((*b, m, k), (*b, k, n)))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    xr, yr = (tvm_bf16.bf16_bits_to_f32(tvm_bf16.to_bf16_bits(v)).astype(np.float64) for v in (x, y))
    ref = 0.125 * (xr @ yr)
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()


_FOREIGN = r"""
#include <immintrin.h>
#include <stdint.h>
/* another library's AMX code: its own configuration (4 tiles of 8 rows x 32 bytes), left on the thread */
static const uint8_t cfg[64] __attribute__((aligned(64))) = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    32, 0, 32, 0, 32, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
void set_foreign(void) { _tile_loadconfig(cfg); }
void get_config(uint8_t *out) { _tile_storeconfig(out); }
"""


@needs_amx
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_configuration_another_library_left_on_the_thread_is_put_back(tmp_path):
    """ONNX Runtime's AMX kernels load their tile configuration once per thread and trust it to stay: an edgellm
    kernel run in between must leave it as it found it (before it did, an ORT int8 session run after one died of
    an illegal instruction). A small dense runs on the calling thread; three threads at once, many times."""
    import ctypes

    src = tmp_path / "foreign.c"
    src.write_text(_FOREIGN)
    subprocess.run(["gcc", "-O2", "-mamx-tile", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "foreign.so")], check=True)
    foreign = ctypes.CDLL(str(tmp_path / "foreign.so"))
    lib = _compile_int8(32, 64, 16)
    a, w, ref = _int8_case(32, 64, 16)
    args = (tvm.runtime.tensor(a), tvm.runtime.tensor(pack_weight(w, 16)))
    lib["main"](*args, tvm.runtime.tensor(np.zeros(ref.shape, np.int32)))  # the kernel asks Linux for the tile state
    errors = []

    def work():
        try:
            for _ in range(20):
                foreign.set_foreign()
                before, after = (ctypes.c_uint8 * 64)(), (ctypes.c_uint8 * 64)()
                foreign.get_config(before)
                out = tvm.runtime.tensor(np.zeros(ref.shape, np.int32))
                lib["main"](*args, out)
                foreign.get_config(after)
                np.testing.assert_array_equal(out.numpy(), ref)
                assert bytes(after) == bytes(before) and bytes(after) != tvm_amx.TILE_CONFIG
        except Exception as exc:  # pylint: disable=broad-except
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


_PERMISSION = """
import ctypes
from edgellm import targets
from edgellm.runtime import device
from edgellm.runtime.package import check_device
libc = ctypes.CDLL(None, use_errno=True)
def granted():  # ARCH_GET_XCOMP_PERM: the dynamic state components this process may use; bit 18 is XTILEDATA
    mask = ctypes.c_uint64()
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0
    return bool(mask.value >> 18 & 1)
before = granted()
check_device({"target": targets.resolve("x86_64-amx").to_dict()}, device.cpu_flags())
print(before, granted())
"""


@needs_amx
def test_loading_an_amx_package_asks_linux_for_the_tile_state():
    """A fresh process has no tile state; the runtime's device check asks for it before any code of the package runs
    (a refusal is then an error line, not a SIGILL in the first tile instruction)."""
    out = subprocess.run([sys.executable, "-c", _PERMISSION], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"], out


def _package_asm(result, tmp_path) -> str:
    """The disassembly of a built package's model.so."""
    with zipfile.ZipFile(result.path) as z:
        (tmp_path / "model.so").write_bytes(z.read("model.so"))
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "model.so")], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_int8_package_for_amx_target_uses_tiles_and_verifies(tmp_path):
    result = api.build("zoo:minilm", "x86_64-amx", tmp_path / "m.edgepkg", quantize="int8", backend="tvm")
    m = result.manifest
    assert "AMX tdpbusd" in m["backend"]["quantize"]["compute"], m["backend"]["quantize"]
    asm = _package_asm(result, tmp_path)
    assert len(re.findall(r"\btdpbusd\b", asm)) >= 4  # each 128-row dense (M = the 128 tokens) on tiles
    assert m["backend"]["quantize"]["attention_matmuls"].startswith("12 ")  # Q K^T and P V of 6 layers, on tiles
    assert not any("activation x activation" in k for k in m["backend"]["quantize"]["layers_fp32"])
    assert len(re.findall(r"\btdpbf16ps\b", asm)) >= 2
    assert m["verification"]["status"] == ("passed" if {"amx_int8", "avx512_vnni"} <= cpu_flags() else "skipped"), m["verification"]


_CNN7 = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return model.eval(), (torch.randn(1, 3, 14, 14),)
'''


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("target,flags", [("x86_64-avx512", {"avx512_vnni"}), ("x86_64-amx", {"amx_int8", "avx512_vnni"})])
def test_int8_kxk_convs_run_as_int8_denses_and_on_amx_with_rows_padded_to_tiles(tmp_path, target, flags):
    """On x86 every kxk conv whose patches fit in IM2COL_MAX_BYTES is an int8 dense (3x3x64: K 576), not only a stem.
    On an AMX target its 49 rows (a 7x7 map) get zero rows up to 64, so it runs on tiles (``tdpbusd``: the stem's K 36
    and the 1-row linear layer do not fit them); on a CPU with the target's features the package verifies against
    fp32 within int8's contract (the build's own check)."""
    (tmp_path / "cnn7.py").write_text(_CNN7)
    result = api.build(f"{tmp_path / 'cnn7.py'}:build", target, tmp_path / "a.edgepkg", precision="int8", calib="random",
                       backend="tvm")
    q = result.manifest["backend"]["quantize"]
    assert q["layers_int8"] == 4 and not q["layers_fp32"], q
    asm = _package_asm(result, tmp_path)
    assert bool(re.search(r"\btdpbusd\b", asm)) == (target == "x86_64-amx")
    assert result.manifest["verification"]["status"] == ("passed" if flags <= cpu_flags() else "skipped")
