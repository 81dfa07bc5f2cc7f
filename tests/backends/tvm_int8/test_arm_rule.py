"""The aarch64 int8 schedule rule (edgellm/backends/tvm_int8/arm.py): packed s8 x s8 -> s32 dense,
inner 4x4 tensorized with ``sdot`` on dot-product cores and smull/saddlp/addp on plain NEON.

Default tests (fast, no emulation): the rule schedules the dense + fused dequantize epilogue for
aarch64 targets, the cross-compiled code has ``sdot`` for rpi5 and none for arm64 / rpi4 (a
Cortex-A53/A72 would die of SIGILL), and the rule leaves x86 and non-matching functions alone.
``arm64``-marked tests run the cross-compiled kernels in the emulated arm64 userland
(``edgellm.emulate``) on the target's own core and compare with numpy exactly.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te

from edgellm import targets
from edgellm.backends.tvm_cpu.apply import ApplyVerifiedSchedule
from edgellm.backends.tvm_int8 import arm

LANES = 4
#: (M, K, N): GEMV-like rows, a 7x7 feature map, a 14x14 feature map
ALL_SHAPES = [(m, k, n) for m in (1, 49, 196) for k in (64, 256) for n in (32, 96)]
FAST_SHAPES = [(1, 256, 96), (49, 64, 96), (196, 256, 32)]


def tvm_target(name: str) -> tvm.target.Target:
    return tvm.target.Target(targets.resolve(name).tvm)


# ---------------------------------------------------------------------------------------------
# the kernels under test: compute.py's packed dense with a fused epilogue (TE), and its inputs

def dense_with_epilogue(M: int, K: int, N: int, act: str = "int8", weight: str = "packed", quant_in: bool = False):
    """PrimFunc (A or X, W, zp, sc, b) -> E = relu(f32(C - zp[n]) * sc[n] + b[n]), C the packed int8 dense.

    ``quant_in``: the int8 activation is produced inside the function from a float32 input
    (``int8(clip(X, -128, 127))``), like the fused quantize of a real int8 layer."""
    if quant_in:
        X = te.placeholder((M, K), "float32", name="X")
        A = te.compute((M, K), lambda m, k: te.max(te.min(X[m, k], tvm.tirx.const(127.0, "float32")),
                                                    tvm.tirx.const(-128.0, "float32")).astype("int8"), name="A")
    else:
        X = A = te.placeholder((M, K), act, name="A")
    k = te.reduce_axis((0, K), name="k")
    if weight == "packed":
        W = te.placeholder((N // LANES, K // 4, LANES, 4), "int8", name="W")
        C = te.compute((M, N), lambda m, n: te.sum(
            A[m, k].astype("int32") * W[n // LANES, k // 4, n % LANES, k % 4].astype("int32"), axis=k), name="C")
    else:  # an unpacked [N, K] int8 weight: not the form the rule is for
        W = te.placeholder((N, K), "int8", name="W")
        C = te.compute((M, N), lambda m, n: te.sum(A[m, k].astype("int32") * W[n, k].astype("int32"), axis=k), name="C")
    zp = te.placeholder((N,), "int32", name="zp")
    sc = te.placeholder((N,), "float32", name="sc")
    b = te.placeholder((N,), "float32", name="b")
    D = te.compute((M, N), lambda m, n: C[m, n] - zp[n], name="D")
    E = te.compute((M, N), lambda m, n: te.max(D[m, n].astype("float32") * sc[n] + b[n], tvm.tirx.const(0.0, "float32")),
                   name="E")
    return te.create_prim_func([X, W, zp, sc, b, E])


def make_inputs(M: int, K: int, N: int, seed: int, quant_in: bool = False):
    """Random operands and the numpy reference.  Scales are powers of two and biases integers, so
    every float in the epilogue is exact (|C| < 2^22): the kernel must match bit for bit."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    a_in = a
    if quant_in:  # a float input; out-of-range values exercise the clip of the fused quantize
        a_in = a.astype(np.float32)
        a_in[::3, ::5] *= 3
        a = np.clip(a_in, -128, 127).astype(np.int8)
    w = rng.integers(-127, 128, (N, K), dtype=np.int8)
    zp = rng.integers(-300, 300, N).astype(np.int32)
    sc = (2.0 ** rng.integers(-2, 2, N)).astype(np.float32)
    b = rng.integers(-2000, 2000, N).astype(np.float32)
    c = a.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(c).max() < 2 ** 22
    ref = np.maximum((c - zp).astype(np.float64) * sc + b, 0).astype(np.float32)
    packed = np.ascontiguousarray(w.reshape(N // LANES, LANES, K // 4, 4).transpose(0, 2, 1, 3))
    return {"A": a_in, "W": packed, "zp": zp, "sc": sc, "b": b}, ref


def schedule(func, target):
    """The rule applied the way the build applies it (ApplyVerifiedSchedule: the schedule must lower)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        return ApplyVerifiedSchedule(arm.PackedDenseArm())(mod)


def is_scheduled(mod) -> bool:
    f = mod["main"]
    return "tirx.is_scheduled" in f.attrs and bool(int(f.attrs["tirx.is_scheduled"]))


def cross_compiler() -> str:
    from edgellm import emulate
    from edgellm.emulate import EmulationError

    try:
        return emulate.ensure_cross_compiler(install=False)
    except EmulationError as err:
        pytest.skip(str(err))


def objdump(so: Path, cxx: str) -> str:
    tool = Path(cxx).with_name("aarch64-linux-gnu-objdump")
    if not tool.exists():
        pytest.skip("aarch64-linux-gnu-objdump missing: apt-get install binutils-aarch64-linux-gnu")
    return subprocess.run([str(tool), "-d", str(so)], capture_output=True, text=True, check=True).stdout


def count(asm: str, mnemonic: str) -> int:
    """Occurrences of a SIMD instruction (``mnemonic`` or its ``2`` high-half form, on v registers)."""
    return len(re.findall(rf"\t{mnemonic}2?\s+v\d", asm))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """(target, M, K, N, quant_in) -> (dir, .so name, scheduled IRModule), cross-compiled once per module."""
    out = tmp_path_factory.mktemp("arm_int8")
    cache: dict = {}

    def get(target_name: str, M: int, K: int, N: int, quant_in: bool = False):
        key = (target_name, M, K, N, quant_in)
        if key not in cache:
            cxx = cross_compiler()
            target = tvm_target(target_name)
            mod = schedule(dense_with_epilogue(M, K, N, quant_in=quant_in), target)
            assert is_scheduled(mod), f"rule did not schedule {key} (EDGELLM_TVM_DEBUG=1 shows why)"
            name = f"{target_name}_{M}x{K}x{N}{'_q' if quant_in else ''}.so"
            tvm.compile(mod, target).export_library(str(out / name), cc=cxx)
            cache[key] = (out, name, mod)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------
# fast: scheduling, instruction selection, where the rule applies

@pytest.mark.parametrize("name, dot", [("rpi5", True), ("jetson-orin-cpu", True), ("arm64", False), ("rpi4", False),
                                       ("x86_64", False), ("x86_64-avx512", False)])
def test_dotprod_detection_follows_the_target(name, dot):
    assert arm.has_dotprod(tvm_target(name)) is dot
    assert arm.is_aarch64(tvm_target(name)) is targets.resolve(name).arch.startswith("aarch64")


def test_explicit_minus_dotprod_wins():
    t = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                           "mattr": ["+neon", "-dotprod"]})
    assert not arm.has_dotprod(t)


@pytest.mark.parametrize("M, K, N", FAST_SHAPES)
def test_rpi5_kernel_is_tensorized_with_sdot(kernels, M, K, N):
    d, so, mod = kernels("rpi5", M, K, N)
    assert "llvm.aarch64.neon.sdot" in mod["main"].script()
    asm = objdump(d / so, cross_compiler())
    n_sdot = count(asm, "sdot")
    # the unrolled register tile: one sdot per accumulator (mr x nv), at least
    assert n_sdot >= 4, n_sdot
    assert re.search(r"\tsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.(16b|4b\[\d\])", asm)
    assert count(asm, "smull") == 0 and count(asm, "saddlp") == 0  # no fallback arithmetic in the dot product


@pytest.mark.parametrize("target_name", ["arm64", "rpi4"])
@pytest.mark.parametrize("M, K, N", FAST_SHAPES)
def test_baseline_kernel_has_no_sdot_but_neon_widening_multiplies(kernels, target_name, M, K, N):
    d, so, mod = kernels(target_name, M, K, N)
    text = mod["main"].script()
    assert "sdot" not in text and "llvm.aarch64.neon.smull" in text
    asm = objdump(d / so, cross_compiler())
    assert count(asm, "sdot") == 0 and count(asm, "udot") == 0  # a Cortex-A53 / A72 would SIGILL
    assert count(asm, "smull") >= 2 and count(asm, "saddlp") >= 2 and count(asm, "addp") >= 1


def test_register_tile_and_parallel_loop():
    mod = schedule(dense_with_epilogue(49, 64, 96), tvm_target("rpi5"))
    text = mod["main"].script()
    assert "T.parallel(" in text and "T.unroll(7)" in text  # 7 rows of 49 per tile, unrolled
    assert 'scope="local"' in text  # the accumulator tile
    assert "C_init" in text and "T.vectorized(4)" in text
    # the epilogue runs in the write-back of the tile: no full-size int32 intermediate is left
    assert "sblock_alloc_buffer((49, 96), \"int32\")" not in text


@pytest.mark.parametrize("name", ["x86_64", "x86_64-avx512"])
def test_rule_leaves_x86_alone_and_x86_build_still_correct(name):
    func = dense_with_epilogue(49, 64, 32)
    target = tvm_target(name)
    assert arm.PackedDenseArm().apply(func, target, False) is None
    assert all(r.apply(func, target, False) is None for r in arm.arm_rules())
    mod = schedule(func, target)
    assert not is_scheduled(mod)
    if name == "x86_64-avx512" and "avx512f" not in Path("/proc/cpuinfo").read_text():
        return
    # the untouched function still compiles and computes the same thing on this x86 host
    ex = tvm.compile(mod, target)
    inputs, ref = make_inputs(49, 64, 32, seed=1)
    args = [tvm.runtime.tensor(inputs[k]) for k in ("A", "W", "zp", "sc", "b")]
    out = tvm.runtime.tensor(np.zeros((49, 32), np.float32))
    ex["main"](*args, out)
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("what", ["fp32 matmul", "uint8 activations", "unpacked weight", "K not a multiple of 4"])
def test_rule_returns_none_for_what_it_does_not_handle(what):
    if what == "fp32 matmul":
        A = te.placeholder((8, 16), "float32", name="A")
        B = te.placeholder((16, 8), "float32", name="B")
        k = te.reduce_axis((0, 16), name="k")
        func = te.create_prim_func([A, B, te.compute((8, 8), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k))])
    elif what == "uint8 activations":
        func = dense_with_epilogue(8, 16, 8, act="uint8")
    elif what == "unpacked weight":
        func = dense_with_epilogue(8, 16, 8, weight="unpacked")
    else:
        A = te.placeholder((8, 6), "int8", name="A")
        W = te.placeholder((2, 2, 4, 4), "int8", name="W")
        k = te.reduce_axis((0, 6), name="k")
        func = te.create_prim_func([A, W, te.compute((8, 8), lambda m, n: te.sum(
            A[m, k].astype("int32") * W[n // 4, k // 4, n % 4, k % 4].astype("int32"), axis=k))])
    for name in ("rpi5", "arm64"):
        assert arm.PackedDenseArm().apply(func, tvm_target(name), False) is None, (what, name)


def test_int8_rules_pick_up_the_arm_rule():
    from edgellm.backends.tvm_int8 import int8_rules

    assert any(isinstance(r, arm.PackedDenseArm) for r in int8_rules())


# ---------------------------------------------------------------------------------------------
# arm64: run the kernels on the emulated cores, exact comparison with numpy

RUN_KERNELS = """\
import sys
import numpy as np
import tvm

for so in sys.argv[1:]:
    case = so[:-3]
    z = np.load(case + ".npz")
    f = tvm.runtime.load_module(so)["main"]
    out = tvm.runtime.tensor(np.zeros(z["ref_shape"], np.float32))
    f(*[tvm.runtime.tensor(z[k]) for k in ("A", "W", "zp", "sc", "b")], out)
    np.save(case + ".out.npy", out.numpy())
    print("ran", case)
"""

X86_HOST = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")),
                              reason="arm64 emulation needs an x86_64 Linux host (qemu-user)")


@pytest.fixture(scope="module")
def rootfs():
    from edgellm import emulate
    from edgellm.emulate import EmulationError

    try:
        emulate.ensure_host_tools(install=True)
    except EmulationError as err:
        pytest.skip(str(err))
    return emulate.prepare_rootfs()


def _cases(kernels, target_name):
    cases = [(m, k, n, False) for m, k, n in ALL_SHAPES] + [(49, 256, 96, True), (1, 64, 32, True)]
    names, refs = [], {}
    for i, (m, k, n, q) in enumerate(cases):
        d, so, _ = kernels(target_name, m, k, n, q)
        inputs, ref = make_inputs(m, k, n, seed=100 + i, quant_in=q)
        np.savez(d / (so[:-3] + ".npz"), ref_shape=np.array(ref.shape), **inputs)
        names.append(so)
        refs[so] = ref
    return d, names, refs


@pytest.mark.arm64
@X86_HOST
@pytest.mark.parametrize("target_name", ["rpi5", "arm64", "rpi4"])
def test_kernels_match_numpy_exactly_on_the_emulated_core(kernels, rootfs, target_name):
    from edgellm import emulate

    d, names, refs = _cases(kernels, target_name)
    (d / "run_kernels.py").write_text(RUN_KERNELS)
    core = targets.resolve(target_name).qemu_cpu
    proc = emulate.run_python(rootfs, d, "run_kernels.py", names, qemu_cpu=core)
    assert not emulate.illegal_instruction(proc), proc.stderr
    assert proc.returncode == 0, proc.stderr
    for so in names:
        got = np.load(d / (so[:-3] + ".out.npy"))
        ref = refs[so]
        assert got.shape == ref.shape
        bad = np.argwhere(got != ref)
        assert bad.size == 0, f"{so}: {len(bad)} of {ref.size} differ, first at {bad[0]}: {got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"


@pytest.mark.arm64
@X86_HOST
def test_sdot_kernel_dies_on_a_core_without_dotprod(kernels, rootfs):
    """The rpi5 kernel really executes sdot: a Cortex-A53 (the arm64 baseline) gets SIGILL."""
    from edgellm import emulate

    d, so, _ = kernels("rpi5", 49, 64, 96)
    inputs, ref = make_inputs(49, 64, 96, seed=7)
    np.savez(d / (so[:-3] + ".npz"), ref_shape=np.array(ref.shape), **inputs)
    (d / "run_kernels.py").write_text(RUN_KERNELS)
    proc = emulate.run_python(rootfs, d, "run_kernels.py", [so], qemu_cpu="cortex-a53")
    assert emulate.illegal_instruction(proc), (proc.returncode, proc.stderr[-2000:])

