"""edgellm.emulate: TVM builds for arm64 run in an emulated arm64 Debian userland (qemu-user).

Proves that (1) a cross-compiled torch model runs there with the runtime-only, pruned TVM and matches
torch; (2) the emulated core matters: a ``+dotprod`` build that really contains ``sdot`` dies of SIGILL
on a Cortex-A72 and runs on a Neoverse-N1; (3) a missing host tool is reported with its apt package.
The first run builds the rootfs (~30-60 s, cached in ``edgellm.emulate.cache_dir()``); later ones reuse it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm import emulate
from edgellm.emulate import EmulationError

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")),
                       reason="arm64 emulation needs an x86_64 Linux host (qemu-user)"),
]

RUN_MODEL = """\
import sys
import numpy as np
import tvm
import tvm.runtime.vm  # not imported by `import tvm` in runtime-only mode

assert tvm.base._RUNTIME_ONLY
lib = tvm.runtime.load_module(sys.argv[1])
vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
out = vm["main"](tvm.runtime.tensor(np.load("x.npy")))
np.save("out.npy", out[0].numpy())   # torch.export outputs are a tuple
print("ok")
"""

# int8 matrix-vector product with weights pre-packed in 4x4 tiles, one `sdot` per tile (ARMv8.2 DotProd),
# the same instruction TVM's ARM_DOT_4x4_i8_SDOT tensor intrinsic emits.
M, K = 16, 64
RUN_SDOT = f"""\
import sys
import numpy as np
import tvm

M, K = {M}, {K}
rng = np.random.default_rng(0)
a = rng.integers(-128, 128, K, dtype=np.int8)
b = rng.integers(-128, 128, (M, K), dtype=np.int8)
packed = b.reshape(M // 4, 4, K // 4, 4).transpose(0, 2, 1, 3).copy()
c = tvm.runtime.tensor(np.zeros(M, np.int32))
tvm.runtime.load_module(sys.argv[1])["matvec"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), c)
assert (c.numpy() == b.astype(np.int32) @ a.astype(np.int32)).all()
print("sdot ok")
"""


@pytest.fixture(scope="module")
def rootfs() -> Path:
    try:
        emulate.ensure_host_tools(install=True)
    except EmulationError as err:  # e.g. not root and the Debian packages are absent
        pytest.skip(str(err))
    t0 = time.monotonic()
    path = emulate.prepare_rootfs(progress=lambda msg: print(f"[arm64 rootfs] {msg}", flush=True))
    print(f"prepare_rootfs: {time.monotonic() - t0:.1f} s")
    return path


@pytest.fixture(scope="module")
def cxx() -> str:
    try:
        return emulate.ensure_cross_compiler(install=True)
    except EmulationError as err:
        pytest.skip(str(err))


def _objdump(cxx: str) -> str:
    objdump = Path(cxx).with_name("aarch64-linux-gnu-objdump")
    if not objdump.exists():
        pytest.skip("aarch64-linux-gnu-objdump missing: apt-get install binutils-aarch64-linux-gnu")
    return str(objdump)


def test_prepare_rootfs_is_cached_and_runtime_only(rootfs):
    t0 = time.monotonic()
    assert emulate.prepare_rootfs() == rootfs
    assert time.monotonic() - t0 < 2.0
    sp = emulate.site_packages(rootfs)
    assert (sp / "tvm/lib/libtvm_runtime.so").is_file()
    for gone in ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so", "tvm/lib/libtvm_runtime_extra.so",
                 "tvm/3rdparty", "tvm/relax", "tvm/topi", "tvm_ffi/include"):
        assert not (sp / gone).exists(), gone
    assert (rootfs / "usr/bin/qemu-aarch64-static").is_file()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cxx) -> Path:
    torch = pytest.importorskip("torch")
    tvm = pytest.importorskip("tvm")
    from tvm.relax.frontend.torch import from_exported_program

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    mod = from_exported_program(torch.export.export(m, (x,)))
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a72"})
    d = tmp_path_factory.mktemp("arm64_model")
    tvm.compile(mod, target).export_library(str(d / "model.so"), cc=cxx)
    np.save(d / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(d / "ref.npy", m(x).numpy())
    (d / "run_model.py").write_text(RUN_MODEL)
    elf = (d / "model.so").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    return d


@pytest.mark.parametrize("mode", ["auto", "prefix"])
def test_cross_compiled_model_matches_torch(rootfs, model_dir, mode, monkeypatch):
    if mode == "prefix":
        monkeypatch.setenv("EDGELLM_ARM64_MODE", "prefix")  # the no-root path (auto = chroot when root)
    (model_dir / "out.npy").unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = emulate.run_python(rootfs, model_dir, "run_model.py", ["model.so"], qemu_cpu="cortex-a72")
    print(f"run under qemu ({mode}): {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert not emulate.illegal_instruction(proc)
    out, ref = np.load(model_dir / "out.npy"), np.load(model_dir / "ref.npy")
    assert out.shape == ref.shape == (1, 10)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def sdot_dir(tmp_path_factory, cxx) -> Path:
    tvm = pytest.importorskip("tvm")
    from tvm.script import tirx as T

    @T.prim_func
    def matvec(a: T.Buffer((K,), "int8"), b: T.Buffer((M // 4, K // 4, 4, 4), "int8"), c: T.Buffer((M,), "int32")):
        T.func_attr({"global_symbol": "matvec", "tir.noalias": True})
        for mo in range(M // 4):
            c[T.ramp(mo * 4, 1, 4)] = T.broadcast(T.int32(0), 4)
            for ko in range(K // 4):
                # a[4ko:4ko+4] repeated in each 32-bit lane; b's 4x4 tile: lane i = row 4mo+i
                va = T.reinterpret(T.broadcast(T.reinterpret(a.vload([ko * 4], "int8x4"), dtype="int32"), 4), dtype="int8x16")
                vb = b.vload([mo, ko, 0, 0], "int8x16")
                c[T.ramp(mo * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                    c.vload([mo * 4], "int32x4"), va, vb, dtype="int32x4")

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"],
                                "mcpu": "cortex-a72"})
    d = tmp_path_factory.mktemp("arm64_sdot")
    tvm.compile(tvm.IRModule({"matvec": matvec}), target=target).export_library(str(d / "sdot.so"), cc=cxx)
    (d / "run_sdot.py").write_text(RUN_SDOT)
    return d


def test_dotprod_build_contains_sdot(sdot_dir, cxx):
    asm = subprocess.run([_objdump(cxx), "-d", str(sdot_dir / "sdot.so")], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\tsdot\s+v\d+\.4s", asm), "no sdot instruction in the +dotprod build"


def test_dotprod_build_sigills_on_cortex_a72(rootfs, sdot_dir):
    proc = emulate.run_python(rootfs, sdot_dir, "run_sdot.py", ["sdot.so"], qemu_cpu="cortex-a72")
    assert emulate.illegal_instruction(proc), (proc.returncode, proc.stderr)
    assert "sdot ok" not in proc.stdout


@pytest.mark.parametrize("cpu", ["neoverse-n1", "cortex-a76", "max"])
def test_dotprod_build_runs_on_a_core_with_dotprod(rootfs, sdot_dir, cpu):
    proc = emulate.run_python(rootfs, sdot_dir, "run_sdot.py", ["sdot.so"], qemu_cpu=cpu)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sdot ok"
    assert not emulate.illegal_instruction(proc)


RUN_SAXPY = """\
import sys
import numpy as np
import tvm

x = np.arange(1000, dtype=np.float32)
y = tvm.runtime.tensor(np.ones(1000, np.float32))
tvm.runtime.load_module(sys.argv[1])["saxpy"](1000, tvm.runtime.tensor(x), y)
assert np.allclose(y.numpy(), 1 + 2 * x)
print("sve ok")
"""


@pytest.fixture(scope="module")
def sve_dir(tmp_path_factory, cxx) -> Path:
    """A plain scalar loop built with +sve: LLVM's loop vectorizer turns it into scalable SVE code."""
    tvm = pytest.importorskip("tvm")
    from tvm.script import tirx as T

    @T.prim_func
    def saxpy(n: T.int32, x: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "saxpy", "tir.noalias": True})
        X = T.match_buffer(x, (n,), "float32")
        Y = T.match_buffer(y, (n,), "float32")
        for i in range(n):
            Y[i] = Y[i] + T.float32(2.0) * X[i]

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+sve"]})
    d = tmp_path_factory.mktemp("arm64_sve")
    tvm.compile(tvm.IRModule({"saxpy": saxpy}), target=target).export_library(str(d / "sve.so"), cc=cxx)
    (d / "run_sve.py").write_text(RUN_SAXPY)
    return d


def test_sve_build_contains_sve_code(sve_dir, cxx):
    asm = subprocess.run([_objdump(cxx), "-d", str(sve_dir / "sve.so")], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\tptrue\s+p\d", asm) and re.search(r"\s(ld1w|fmad|fmla)\s+\{?z\d+", asm), "no SVE code in the +sve build"


@pytest.mark.parametrize("cpu, has_sve", [("cortex-a72", False), ("neoverse-n1", False), ("a64fx", True), ("max", True)])
def test_sve_build_needs_an_sve_core(rootfs, sve_dir, cpu, has_sve):
    proc = emulate.run_python(rootfs, sve_dir, "run_sve.py", ["sve.so"], qemu_cpu=cpu)
    if has_sve:
        assert proc.returncode == 0 and proc.stdout.strip() == "sve ok", proc.stderr
        assert not emulate.illegal_instruction(proc)
    else:
        assert emulate.illegal_instruction(proc), (proc.returncode, proc.stderr)


def test_qemu_knows_the_usual_device_cores():
    assert {"cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "max"} <= set(emulate.qemu_cpus())


def test_unknown_qemu_cpu_is_a_clear_error(rootfs, tmp_path):
    with pytest.raises(EmulationError, match="cortex-a72"):
        emulate.run_python(rootfs, tmp_path, "x.py", qemu_cpu="cortex-a999")


def test_env_reaches_the_guest(rootfs, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper_mod.py").write_text("VALUE = 42\n")
    (tmp_path / "s.py").write_text("import os, platform, helper_mod\n"
                                   "print(platform.machine(), helper_mod.VALUE, os.environ['TVM_USE_RUNTIME_LIB'], os.environ['FOO'])\n")
    proc = emulate.run_python(rootfs, tmp_path, "s.py", env={"PYTHONPATH": "lib", "FOO": "bar"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["aarch64", "42", "1", "bar"]


@pytest.mark.parametrize("hidden, package", [("debootstrap", "debootstrap"), ("qemu-aarch64-static", "qemu-user-static"),
                                             ("dpkg-deb", "dpkg")])
def test_missing_host_tool_names_the_apt_package(tmp_path, monkeypatch, hidden, package):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in emulate._tools.HOST_TOOLS:
        real = emulate._tools.which(tool)
        if tool != hidden and real:
            os.symlink(real, bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(EmulationError, match=rf"is missing: apt-get install {package}\b"):
        emulate.ensure_host_tools(install=False)


def test_missing_cross_compiler_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmulationError, match=r"apt-get install g\+\+-aarch64-linux-gnu"):
        emulate.ensure_cross_compiler(install=False)


def test_illegal_instruction_detection():
    def cp(rc, err=""):
        return subprocess.CompletedProcess([], rc, "", err)

    assert emulate.illegal_instruction(cp(-4, "qemu: uncaught target signal 4 (Illegal instruction) - core dumped\n"))
    assert emulate.illegal_instruction(cp(132))
    assert not emulate.illegal_instruction(cp(0))
    assert not emulate.illegal_instruction(cp(-11, "qemu: uncaught target signal 11 (Segmentation fault)"))
    assert not emulate.illegal_instruction(cp(1, "Traceback ...\nValueError"))


def test_runtime_wheels_are_pinned():
    wheels = emulate.runtime_wheels()
    assert wheels[:4] == ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "ml_dtypes==0.6.0"]
    assert "typing_extensions" in wheels
    assert not any("compiler" in w for w in wheels)
    with pytest.raises(ValueError):
        emulate.runtime_wheels("2.7")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "c"))
    assert emulate.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDGELLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert emulate.cache_dir() == tmp_path / "x" / "edgellm"
