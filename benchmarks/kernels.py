"""Kernel benchmarks for edgellm's TVM CPU pipeline (figures, not asserts).

* matmul 1024^3 (+ bias): GFLOP/s of ``edgellm.backends.tvm_cpu.pipeline`` vs numpy BLAS
  (and the stock TVM cpu_generic pipeline with ``--stock``);
* conv2d 3x3, 56x56x64 -> 64 (+ ReLU): ms of the pipeline vs torch and onnxruntime;
* int8 dense 1024^3 (u8 x s8 -> s32, ``edgellm.backends.tvm_int8``: packed weights; AMX ``tdpbusd`` tiles on an
  AMX ``--mcpu`` (sapphirerapids), else ``vpdpbusd``
  with VNNI, ``vpmaddubsw`` + ``vpmaddwd`` and 7-bit weights on AVX2): GOP/s vs the fp32 matmul
  rule, onnxruntime ``MatMulInteger`` and torch ``_int_mm`` (s8 x s8), with ``--int8``
  (``--mattr +avx512vnni`` for the VNNI form on an AVX-512 ``--mcpu``).

All in one process, each timed as the best median of several repeats.  Usage::

    python benchmarks/kernels.py --threads 2 [--mcpu x86-64-v4] [--stock]

``--threads`` sets TVM_NUM_THREADS (before TVM's thread pool starts), torch's and
onnxruntime's intra-op threads and OpenBLAS/OMP/MKL threads for numpy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mcpu", default="x86-64-v4", help="llvm mcpu (x86-64-v4: AVX-512, x86-64-v3: AVX2)")
    p.add_argument("--size", type=int, default=1024, help="matmul M = N = K")
    p.add_argument("--stock", action="store_true", help="also time the stock cpu_generic pipeline")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mattr", default="", help="llvm mattr, comma-separated (e.g. +avx512vnni for the int8 kernel's VNNI form)")
    p.add_argument("--int8", action="store_true", help="also time the int8 dense kernel")
    p.add_argument("--only-int8", action="store_true", help="time only the int8 dense kernel and its fp32 twin")
    return p.parse_args()


ARGS = _parse()
for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from edgellm.backends.tvm_cpu import pipeline  # noqa: E402


#: seconds of quiet before each timed block: ONNX Runtime's and OpenMP's workers spin on after a call, and a
#: block that starts right after another engine's shares the cores with them (edgellm's int8 1024^3 dense
#: measured 174 GOP/s right after an ONNX Runtime block, 258 after a 0.1 s pause; ORT 268 either way)
SETTLE_S = 0.2


def best_median(fn, number: int, repeat: int) -> float:
    """Seconds per call: the best (over ``repeat``) median-free mean of ``number`` calls."""
    time.sleep(SETTLE_S)
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def compile_torch(model, x, target, use_pipeline=True):
    ep = torch.export.export(model.eval(), (x,))
    mod = from_exported_program(ep)
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target, relax_pipeline=pipeline(target) if use_pipeline else "default")
    ctime = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm, ctime


def time_vm(vm, x, number, repeat):
    arg = tvm.runtime.tensor(x.numpy())
    time.sleep(SETTLE_S)
    vm["main"](arg)
    res = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(arg)
    return min(res.results)


class Linear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


class ConvReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def main():
    torch.set_num_threads(ARGS.threads)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": ARGS.mcpu,
                                **({"mattr": ARGS.mattr.split(",")} if ARGS.mattr else {})})
    rows = []

    # ---- matmul (+ bias) ----
    n = ARGS.size
    flops = 2.0 * n * n * n
    torch.manual_seed(0)
    lin = Linear(n, n).eval()
    x = torch.randn(n, n)
    vm, ctime = compile_torch(lin, x, target)
    t_tvm = time_vm(vm, x, number=10, repeat=ARGS.repeat)
    a = x.numpy()
    w = lin.fc.weight.detach().numpy().T.copy()
    b = lin.fc.bias.detach().numpy()
    t_np = best_median(lambda: a @ w + b, number=10, repeat=ARGS.repeat)
    t_torch = best_median(lambda: lin(x), number=10, repeat=ARGS.repeat)
    rows.append((f"matmul {n}^3 +bias", "edgellm TVM", t_tvm, flops, ctime))
    rows.append((f"matmul {n}^3 +bias", "numpy BLAS", t_np, flops, None))
    rows.append((f"matmul {n}^3 +bias", "torch", t_torch, flops, None))
    if ARGS.stock:
        vm_s, ctime_s = compile_torch(lin, x, target, use_pipeline=False)
        rows.append((f"matmul {n}^3 +bias", "stock TVM", time_vm(vm_s, x, 1, 2), flops, ctime_s))
    ref = rows[1][2]
    _table("matmul", rows, ref)
    if ARGS.int8 or ARGS.only_int8:
        int8_dense(n, t_tvm)
    if ARGS.only_int8:
        return

    # ---- conv2d 3x3 56x56x64 ----
    rows = []
    conv = ConvReLU().eval()
    xc = torch.randn(1, 64, 56, 56)
    cflops = 2.0 * 56 * 56 * 64 * 64 * 9
    vm, ctime = compile_torch(conv, xc, target)
    rows.append(("conv3x3 56x56x64", "edgellm TVM", time_vm(vm, xc, 50, ARGS.repeat), cflops, ctime))
    with torch.no_grad():
        rows.append(("conv3x3 56x56x64", "torch", best_median(lambda: conv(xc), 50, ARGS.repeat),
                     cflops, None))
    try:
        import onnxruntime as ort

        path = "/tmp/edgellm_bench_conv.onnx"
        torch.onnx.export(conv, (xc,), path, dynamo=False, opset_version=17)
        so = ort.SessionOptions()
        so.intra_op_num_threads = ARGS.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: xc.numpy()}
        rows.append(("conv3x3 56x56x64", "onnxruntime",
                     best_median(lambda: sess.run(None, feed), 50, ARGS.repeat), cflops, None))
        ref = rows[-1][2]
    except Exception as err:  # pylint: disable=broad-except
        print("onnxruntime unavailable:", err)
        ref = rows[1][2]
    if ARGS.stock:
        vm_s, ctime_s = compile_torch(conv, xc, target, use_pipeline=False)
        rows.append(("conv3x3 56x56x64", "stock TVM", time_vm(vm_s, xc, 1, 2), cflops, ctime_s))
    _table("conv2d", rows, ref)


def int8_dense(n: int, t_fp32: float):
    """u8 x s8 -> s32 packed dense (edgellm int8 rule) vs the fp32 rule, ORT MatMulInteger, torch _int_mm.

    edgellm's kernel and ORT's are timed in alternating blocks (best of ``--repeat``): ORT's spinning
    workers slow whatever runs right after them, so a block of one after a block of the other is fair
    to both."""
    import numpy as np

    from edgellm.backends.tvm_int8.compute import dense_int8_primfunc, pack_weight, packing
    from edgellm.backends.tvm_int8 import amx_dense_rule
    from edgellm.backends.tvm_int8.x86 import PackedDenseX86

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": ARGS.mcpu,
                                **({"mattr": ARGS.mattr.split(",")} if ARGS.mattr else {})})
    pk = packing(target)
    if pk is None:
        print(f"\nint8 dense: skipped, edgellm has no int8 kernel for mcpu {ARGS.mcpu} (needs AVX2)")
        return
    ops = 2.0 * n * n * n
    t0 = time.perf_counter()
    # edgellm's own rule order: AMX tiles where the target has them (mcpu sapphirerapids on), else the vector kernel
    func = dense_int8_primfunc(n, n, n, pk.lanes, "uint8")
    sch = next(s for s in (r.apply(func, target, False) for r in [amx_dense_rule(), PackedDenseX86()]) if s is not None)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target)
    ctime = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (n, n)).astype(np.uint8)
    w = rng.integers(-pk.weight_max, pk.weight_max + 1, (n, n)).astype(np.int8)  # [N, K]
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev), tvm.runtime.tensor(pack_weight(w, pk.lanes), dev),
            tvm.runtime.tensor(np.zeros((n, n), np.int32), dev)]
    mod = lib.mod if hasattr(lib, "mod") else lib
    mod["main"](*args)
    exact = np.array_equal(args[2].numpy(), a.astype(np.int64) @ w.T.astype(np.int64))
    run_tvm = lambda: mod["main"](*args)  # noqa: E731
    run_ort = None
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B"], ["C"])], "mmi",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
            [helper.make_tensor_value_info("C", TensorProto.INT32, [n, n])],
            [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what the installed onnxruntime reads
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = ARGS.threads, 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        exact = exact and np.array_equal(sess.run(None, {"A": a})[0], args[2].numpy())
        run_ort = lambda: sess.run(None, {"A": a})  # noqa: E731
    except Exception as err:  # pylint: disable=broad-except
        print("onnxruntime MatMulInteger unavailable:", err)
    t8 = t_ort = float("inf")
    for _ in range(ARGS.repeat):
        t8 = min(t8, best_median(run_tvm, 10, 1))
        if run_ort is not None:
            t_ort = min(t_ort, best_median(run_ort, 10, 1))
    rows = [(f"dense {n}^3 int8", "edgellm TVM", t8, ops, ctime),
            (f"matmul {n}^3 fp32", "edgellm TVM", t_fp32, ops, None)]
    if run_ort is not None:
        rows.append((f"dense {n}^3 int8", "onnxruntime", t_ort, ops, None))
    try:
        ta = torch.from_numpy((a.astype(np.int16) - 128).astype(np.int8))
        tw = torch.from_numpy(np.ascontiguousarray(w.T))
        torch._int_mm(ta, tw)  # pylint: disable=protected-access
        rows.append((f"dense {n}^3 int8", "torch _int_mm", best_median(lambda: torch._int_mm(ta, tw), 10, ARGS.repeat), ops, None))
    except Exception as err:  # pylint: disable=broad-except
        print("torch _int_mm unavailable:", err)
    _table("int8 dense (GFLOP/s column = GOP/s)", rows, rows[1][2])
    asm = mod.inspect_source("asm")
    isa = "AMX tdpbusd tiles" if "tdpbusd" in asm else f"{pk.isa}, {pk.lanes} int32 lanes"
    print(f"edgellm's kernel: {isa}; tdpbusd x{asm.count('tdpbusd') - asm.count('vpdpbusd')}, vpdpbusd x{asm.count('vpdpbusd')}, "
          f"vpmaddubsw x{asm.count('vpmaddubsw')}; exact (numpy int64, onnxruntime): {exact}")
    if run_ort is not None:
        print(f"edgellm / onnxruntime MatMulInteger: {t8 / t_ort:.2f}x the time ({t_ort / t8:.2f}x the speed)")


def _table(title, rows, ref):
    print(f"\n== {title} (threads={ARGS.threads}, mcpu={ARGS.mcpu}); ratio = time / reference ==")
    print(f"{'kernel':22s} {'impl':12s} {'ms':>9s} {'GFLOP/s':>9s} {'ratio':>7s} {'compile s':>9s}")
    for name, impl, t, fl, ct in rows:
        cts = f"{ct:9.1f}" if ct is not None else f"{'':9s}"
        print(f"{name:22s} {impl:12s} {t * 1e3:9.3f} {fl / t / 1e9:9.1f} {t / ref:7.2f} {cts}")


if __name__ == "__main__":
    main()
