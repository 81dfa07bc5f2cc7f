"""Properties of the generated code: vector width per target, vectorized + parallel loops."""

from __future__ import annotations

import re

import pytest
import torch

from tvm_cpu_helpers import AVX2, AVX512, HOST_AVX512, NEON, compile_model, to_relax, tvm


def _scheduled(model, x, target_dict):
    """The PrimFuncs after edgellm's schedule rules (before lowering)."""
    from tvm.relax.backend.cpu_generic import pipeline as cg
    from tvm.s_tir import dlight

    from edgellm.backends.tvm_cpu import schedule_rules
    from edgellm.backends.tvm_cpu.relax_passes import layout_passes

    target = tvm.target.Target(target_dict)
    mod = to_relax(model, x)
    with target:
        mod = tvm.transform.Sequential(
            [layout_passes] + cg.legalize_passes(target)
            + [dlight.ApplyDefaultSchedule(*schedule_rules())])(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_vector_lanes_from_target():
    from edgellm.backends.tvm_cpu import vector_lanes

    assert vector_lanes(tvm.target.Target(AVX512)) == 16
    assert vector_lanes(tvm.target.Target(AVX2)) == 8
    assert vector_lanes(tvm.target.Target(NEON)) == 4


@pytest.mark.parametrize("target,lanes", [(AVX512, 16), (AVX2, 8)], ids=["avx512", "avx2"])
def test_matmul_is_tiled_vectorized_parallel(target, lanes):
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
    funcs = _scheduled(model, torch.randn(64, 256), target)
    mm = [f for n, f in funcs.items() if "matmul" in n]
    assert mm, funcs.keys()
    text = mm[0].script()
    assert "is_scheduled" in text
    assert "T.parallel(" in text
    assert re.search(rf"T\.vectorized\(T\.int64\({lanes}\)\)", text), text
    assert 'scope="local"' in text  # register-tile accumulator
    assert "T.max(" in text  # relu folded into the write-back


def test_tiny_reductions_run_on_one_thread():
    """Below PARALLEL_MIN_WORK multiply-adds a kernel has no parallel loop (waking the pool costs more than it
    saves, and waits a scheduler slice when another process holds a core); vectorized all the same."""
    from edgellm.backends.tvm_cpu._common import PARALLEL_MIN_WORK

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 36, 64))
    funcs = _scheduled(model, torch.randn(1, 16, 8, 8), AVX512)
    assert 32 * 36 * 16 * 9 < PARALLEL_MIN_WORK and 32 * 36 * 64 < PARALLEL_MIN_WORK
    kernels = {n: f.script() for n, f in funcs.items() if "conv2d" in n or "matmul" in n}
    assert len(kernels) == 2, funcs.keys()
    for name, text in kernels.items():
        assert "T.parallel(" not in text and "T.vectorized(T.int64(16))" in text, (name, text)


def test_every_function_is_parallel_or_tiny():
    """No PrimFunc of a small transformer block is left unscheduled."""
    from test_numerics import Attention

    funcs = _scheduled(Attention(d=128, h=4), torch.randn(1, 64, 128), AVX512)
    for name, f in funcs.items():
        text = f.script()
        assert "is_scheduled" in text, name


def test_avx512_asm_uses_zmm():
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU())
    ex = compile_model(model, torch.randn(32, 128), AVX512)
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert re.search(r"vfmadd\w*ps\s+.*zmm", asm), "no 512-bit FMA in the generated code"


def test_arm64_compiles():
    from test_numerics import Attention, ConvBnRelu, Depthwise

    compile_model(Attention(), torch.randn(1, 16, 64), NEON)
    compile_model(ConvBnRelu(), torch.randn(1, 16, 12, 12), NEON)
    compile_model(Depthwise(), torch.randn(1, 32, 12, 12), NEON)


def test_rule_leaves_unmatched_function_untouched():
    """A rule that does not apply returns None (function left as is)."""
    from tvm.script import tirx as T

    from edgellm.backends.tvm_cpu.conv import ConvNHWC
    from edgellm.backends.tvm_cpu.matmul import Matmul

    @T.prim_func(private=True, s_tir=True)
    def add(a: T.Buffer((T.int64(4), T.int64(32)), "float32"),
            b: T.Buffer((T.int64(4), T.int64(32)), "float32")):
        for i, j in T.grid(T.int64(4), T.int64(32)):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] + T.float32(1.0)

    target = tvm.target.Target(AVX512)
    assert Matmul().apply(add, target, False) is None
    assert ConvNHWC().apply(add, target, False) is None


def test_depthwise_pads_per_row_and_unrolls_taps():
    """Depthwise: the pad is computed inside the parallel loop (no separate padded copy of the
    input), the 3x3 taps are unrolled, channels vectorized."""
    from test_numerics import Depthwise

    funcs = _scheduled(Depthwise(c=64), torch.randn(1, 64, 25, 20), AVX512)
    dw = [f for n, f in funcs.items() if "conv2d" in n]
    assert dw, funcs.keys()
    text = dw[0].script()
    par = text.index("T.parallel(")
    assert text.index('T.sblock("pad_temp")') > par, text  # padding under the parallel loop
    assert text.count("T.parallel(") == 1, text
    assert text.count("T.unroll(T.int64(3))") >= 2, text
    assert "T.vectorized(T.int64(16))" in text


def test_pointwise_conv_is_a_matmul_without_pad_copy():
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1), torch.nn.ReLU())
    funcs = _scheduled(model, torch.randn(1, 32, 14, 14), AVX512)
    names = list(funcs)
    assert any("matmul" in n for n in names) and not any("conv2d" in n for n in names), names
    for n, f in funcs.items():
        if "matmul" in n:
            assert "pad_temp" not in f.script()


def test_unpadded_conv_has_no_pad_copy():
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=0), torch.nn.ReLU())
    funcs = _scheduled(model, torch.randn(1, 16, 17, 17), AVX512)
    conv = [f for n, f in funcs.items() if "conv2d" in n]
    assert conv and "pad_temp" not in conv[0].script()


def test_core_info_per_mcpu_and_host():
    """The core description the tiles come from: registers/width from the ISA, caches per mcpu, host from sysfs."""
    from edgellm.backends.tvm_cpu.target_info import core_info, host_caches

    v3, v4 = core_info(tvm.target.Target(AVX2)), core_info(tvm.target.Target(AVX512))
    assert (v3.vector_bits, v3.vector_registers) == (256, 16)
    assert (v4.vector_bits, v4.vector_registers) == (512, 32)
    assert v3.l1d == 32 * 1024 and v3.l2 == 256 * 1024  # the smallest x86-64-v3 core (Haswell)
    assert v3.min_accumulators >= 8
    znver3 = core_info(tvm.target.Target({**AVX2, "mcpu": "znver3"}))
    assert znver3.l2 == 512 * 1024 and znver3.vector_bits == 256
    host = core_info(tvm.target.Target({**AVX2, "mcpu": "native"}))
    l1d, l2 = host_caches()
    assert host.l1d == (l1d or 32 * 1024) and host.l2 == (l2 or 256 * 1024)


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_large_matmul_packs_weight_panels_gemv_does_not(target):
    """A 1024-wide weight is copied into contiguous [N/w, K, w] panels (reused by many row tiles); a single-row
    matmul (GEMV: each weight element used once) reads the weight in place."""
    from edgellm.backends.tvm_cpu.target_info import vector_lanes

    lanes = vector_lanes(tvm.target.Target(target))
    big = _scheduled(torch.nn.Linear(1024, 1024), torch.randn(256, 1024), target)
    text = next(f.script() for n, f in big.items() if "matmul" in n)
    width = re.search(r"T\.sblock_alloc_buffer\(\(T\.int64\((\d+)\), T\.int64\(1024\), T\.int64\((\d+)\)\)", text)
    assert width, text
    assert int(width.group(1)) * int(width.group(2)) == 1024 and int(width.group(2)) % lanes == 0
    gemv = _scheduled(torch.nn.Linear(1024, 1024), torch.randn(1, 1024), target)
    text = next(f.script() for n, f in gemv.items() if "matmul" in n)
    assert "T.int64(1024), T.int64(" + str(lanes) not in text and text.count("sblock_alloc_buffer") <= 1, text


def test_avx2_tile_prefers_rows():
    """AVX2 (16 ymm): 8 accumulators as 4 rows x 2 vectors (6 loads per 8 FMAs, 16-float weight panel)."""
    from edgellm.backends.tvm_cpu._common import choose_tile

    assert choose_tile(1024, 1024, 8, 16) == (8, 2, 4)
    assert choose_tile(1024, 1024, 16, 32) == (16, 4, 4)  # AVX-512: unchanged 4x4


def test_constant_weight_is_packed_at_compile_time():
    """The pack of a constant weight is split out of the kernel and folded: main calls only the prepacked kernel,
    on a constant already in [N/w, K, w] layout, and the result still matches torch."""
    import numpy as np

    from edgellm.backends.tvm_cpu import pre_schedule_passes, schedule_rules, weight_prepack_passes
    from edgellm.backends.tvm_cpu.apply import ApplyVerifiedSchedule

    target = tvm.target.Target(AVX2)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU()).eval()
    x = torch.randn(128, 1024)
    with target:
        mod = tvm.transform.Sequential(pre_schedule_passes(target) + [ApplyVerifiedSchedule(*schedule_rules())]
                                       + weight_prepack_passes())(to_relax(model, x))
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.endswith("_prepacked") for n in names) and not any("weight_prepack" in n for n in names), names
    kernel = next(f for gv, f in mod.functions_items() if gv.name_hint.endswith("_prepacked"))
    assert any(len(p.shape) == 3 and int(p.shape[1]) == 1024 for p in kernel.params), kernel.params
    from tvm_cpu_helpers import HOST_AVX2, run
    if HOST_AVX2:
        ex = compile_model(model, x, AVX2)
        with torch.no_grad():
            np.testing.assert_allclose(run(ex, x), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_slice_with_ragged_rows_vectorizes_whole_rows():
    """A gather whose innermost dim is not whole 16-lane vectors (MobileNet-V2's [3136, 32] -> [1, 56, 56, 24]
    slice + bias after a padded int8 dense) keeps that dim as its own loop, vectorized by 8, so its reads are
    contiguous rows (fused and gathered 16 lanes at a time it took 100 us of a 1.6 ms model); and it still
    computes the slice."""
    import numpy as np
    from tvm.script import tirx as T

    from edgellm.backends.tvm_cpu._common import schedule_injective

    @T.prim_func(s_tir=True)
    def slice_add(a: T.Buffer((T.int64(3136), T.int64(32)), "float32"), bias: T.Buffer((T.int64(24),), "float32"),
                  out: T.Buffer((T.int64(1), T.int64(56), T.int64(56), T.int64(24)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for n, h, w, c in T.grid(T.int64(1), T.int64(56), T.int64(56), T.int64(24)):
            with T.sblock("T_add"):
                vn, vh, vw, vc = T.axis.remap("SSSS", [n, h, w, c])
                out[vn, vh, vw, vc] = a[(vh * T.int64(56) + vc // T.int64(32) + vw) % T.int64(3136), vc % T.int64(32)] + bias[vc]

    sch = tvm.s_tir.Schedule(slice_add)
    schedule_injective(sch, sch.get_sblock("T_add"), 16)
    text = sch.mod["main"].script()
    assert "T.vectorized(T.int64(8))" in text and "T.parallel(" in text, text
    if not HOST_AVX512:
        return
    lib = tvm.compile(sch.mod, tvm.target.Target(AVX512))
    a, bias = np.random.rand(3136, 32).astype("float32"), np.random.rand(24).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 56, 56, 24), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(bias), out)
    np.testing.assert_array_equal(out.numpy(), (a[:, :24] + bias).reshape(1, 56, 56, 24))
