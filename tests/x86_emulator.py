"""Run one TVM-compiled x86 PrimFunc on an emulated CPU (Bochs's, through ``bochscpu-python``).

Why: edgellm's x86 kernels take instructions this machine may lack (AVX-512 VNNI's zmm ``vpdpbusd``,
AVX-VNNI's ymm one, AVX-512BW's ``vpmaddubsw``, AVX512-BF16's ``vdpbf16ps``). Bochs emulates whole
Intel cores (``MODELS``): the kernel's own machine code runs there, instruction by instruction, so a
test checks its *results* on any host, not only that the instruction appears in the assembly.

How: the PrimFunc's LLVM object is linked statically (gcc, at 0x400000) with a freestanding stub
(``_STUB``) that plays TVM's runtime for it (one parallel task, a bump allocator for workspaces,
an error flag) and an entry that calls the packed function and halts. The ELF's segments, a stack
and the tensors go into the guest's memory (4-level paging, user mode); the arguments are the
``TVMFFIAny`` / ``DLTensor`` structs that TVM's FFI would pass. No OS: a kernel that makes a system
call, or needs AMX's tile state (this Bochs build has no AMX), fails with the exception it raised.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

#: Bochs's CPU models (the index of its ``cpu.model`` parameter) and what each adds
MODELS = {
    "skylake_x": 26,        # AVX-512F/BW/DQ/VL, no VNNI
    "sapphire_rapids": 30,  # + AVX-512 VNNI, AVX512-BF16, AVX512-FP16 (no AMX in this build; its CPUID lists
                            #   AVX-VNNI, but this Bochs raises #UD on the VEX vpdpbusd there)
    "arrow_lake": 31,       # AVX2 + AVX-VNNI, no AVX-512
}

_PAGE = 4096
_IMAGE, _HEAP, _STACK = 0x400000, 0x10000000, 0x7F000000
_STACK_BYTES = 256 * 1024
_DONE = 0x600DF00D

# The bits of TVM's runtime a compiled PrimFunc calls, for one thread and no OS.
_STUB = r"""
typedef unsigned long u64;
typedef struct { void *sync; int num_task; } ParallelEnv;
typedef int (*Lambda)(int, ParallelEnv *, void *);
typedef struct { int type_index; unsigned pad; u64 value; } Any;
typedef int (*Packed)(void *, const Any *, int, Any *);

volatile Packed emu_fn;
Any emu_args[16];
volatile int emu_nargs, emu_rc, emu_error;
volatile unsigned emu_done;
unsigned char emu_arena[1 << 24] __attribute__((aligned(64)));
static u64 arena_used;

static int parallel_launch(Lambda f, void *cdata, int num_task) { ParallelEnv env = {0, 1}; return f(0, &env, cdata); }
static int parallel_barrier(int task_id, ParallelEnv *env) { return 0; }
static void *alloc_workspace(int dev_type, int dev_id, u64 nbytes, int code, int bits) {
  void *p = emu_arena + arena_used;
  arena_used += (nbytes + 63) & ~63UL;
  if (arena_used > sizeof(emu_arena)) { emu_error = 2; return 0; }
  return p;
}
static int free_workspace(int dev_type, int dev_id, void *p) { return 0; }

/* strong definitions win over the object's weak function-pointer slots, which TVM's loader fills */
void *__TVMBackendParallelLaunch = (void *)parallel_launch;
void *__TVMBackendParallelBarrier = (void *)parallel_barrier;
void *__TVMBackendAllocWorkspace = (void *)alloc_workspace;
void *__TVMBackendFreeWorkspace = (void *)free_workspace;

void TVMFFIErrorSetRaisedFromCStrParts(void) { emu_error = 1; }
void TVMFFIErrorSetRaisedFromCStr(void) { emu_error = 1; }
void *memset(void *d, int c, u64 n) { volatile unsigned char *p = d; while (n--) *p++ = (unsigned char)c; return d; }
void *memcpy(void *d, const void *s, u64 n) { volatile unsigned char *p = d; const unsigned char *q = s; while (n--) *p++ = *q++; return d; }

void emu_entry(void) {
  Any result = {0, 0, 0};
  emu_rc = emu_fn(0, emu_args, emu_nargs, &result);
  emu_done = 0x600DF00D;
  __asm__ volatile("hlt");  /* user mode: #GP, which ends the run */
}
"""

_DL_CODE = {"i": 0, "u": 1, "f": 2}


class EmulationError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _bochscpu():
    """bochscpu, importable: its 0.4.0 wheel says manylinux_2_28 but calls two glibc 2.38 symbols
    (C23's strtoull / sscanf); a shim library defines them for older glibcs (Debian 12's 2.36)."""
    shim_dir = Path(tempfile.gettempdir()) / "edgellm-bochscpu-shim"
    shim = shim_dir / "libisoc23.so"
    if not shim.exists():
        shim_dir.mkdir(parents=True, exist_ok=True)
        src = shim_dir / "isoc23.c"
        src.write_text(
            "#include <stdlib.h>\n#include <stdio.h>\n#include <stdarg.h>\n"
            "unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }\n"
            "int __isoc23_sscanf(const char *s, const char *f, ...) "
            "{ va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r; }\n")
        tmp = shim.with_suffix(".tmp")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src)], check=True)
        tmp.replace(shim)
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    import bochscpu
    import bochscpu.cpu
    import bochscpu.memory

    return bochscpu


def _set_model(model: str) -> None:
    """Bochs reads ``cpu.model`` when a CPU is created; bochscpu fixes it to Tiger Lake, so set the
    parameter through Bochs's own C++ accessors."""
    lib = ctypes.CDLL(_bochscpu()._bochscpu.__file__)
    get = lib._ZN13bx_real_sim_c14get_param_enumEPKcP10bx_param_c
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    set_value = lib._ZN14bx_param_num_c3setEl
    set_value.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    set_value(get(None, b"cpu.model", None), MODELS[model])


def link(obj: Path, workdir: Path) -> Path:
    """The PrimFunc's object + the stub -> a static ELF at 0x400000."""
    (workdir / "stub.c").write_text(_STUB)
    elf = workdir / "kernel.elf"
    subprocess.run(["gcc", "-O1", "-ffreestanding", "-fno-builtin", "-fno-pic", "-no-pie", "-nostdlib", "-static",
                    "-fno-stack-protector", "-mno-red-zone", f"-Wl,-Ttext-segment={_IMAGE:#x}", "-Wl,-e,emu_entry",
                    "-o", str(elf), str(workdir / "stub.c"), str(obj)],
                   check=True, capture_output=True, text=True)
    return elf


def _load(elf: Path) -> tuple[list[tuple[int, bytes, int]], dict[str, int]]:
    """(loadable segments (vaddr, bytes, memsz), symbol addresses) of a static ELF."""
    data = elf.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            segments.append((p_vaddr, data[p_offset:p_offset + p_filesz], p_memsz))
    nm = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    symbols = {parts[2]: int(parts[0], 16) for parts in (line.split() for line in nm.splitlines()) if len(parts) == 3}
    return segments, symbols


def run_primfunc(lib, arrays: list[np.ndarray], model: str, allow_defects: bool = False) -> list[np.ndarray]:
    """Call a ``tvm.compile``-d PrimFunc (entry ``main``) with ``arrays`` on Bochs's ``model`` CPU;
    returns the arrays as the kernel left them (outputs included). Refuses code that Bochs runs wrong
    (``bochs_defects``) unless ``allow_defects``."""
    mod = lib.mod if hasattr(lib, "mod") else lib
    with tempfile.TemporaryDirectory(prefix="edgellm-x86emu-") as tmp:
        mod.write_to_file(str(Path(tmp) / "module.o"))
        elf = link(Path(tmp) / "module.o", Path(tmp))
        if not allow_defects and bochs_defects(elf):
            raise EmulationError(f"Bochs would run {sorted(bochs_defects(elf))} wrong (vdpbf16ps with an 8-bit displacement)")
        return run_elf(elf, "__tvm_ffi_main", arrays, model)


def run_elf(elf: Path, entry: str, arrays: list[np.ndarray], model: str) -> list[np.ndarray]:
    """Call the packed function ``entry`` of a ``link``-ed ELF with ``arrays`` on Bochs's ``model`` CPU.
    The emulator runs in a child process: Bochs fixes its CPU model when a process first creates a CPU."""
    with tempfile.TemporaryDirectory(prefix="edgellm-x86emu-run-") as tmp:
        work = Path(tmp)
        dtypes = [a.dtype.name for a in arrays]
        np.savez(work / "in.npz", *[a.view(np.uint16) if a.dtype.name == "bfloat16" else a for a in arrays])
        (work / "dtypes.txt").write_text("\n".join(dtypes))
        proc = subprocess.run([sys.executable, __file__, str(work), model, str(elf), entry], capture_output=True, text=True)
        if proc.returncode != 0:
            error = (work / "error.txt").read_text() if (work / "error.txt").exists() else proc.stderr[-2000:]
            raise EmulationError(error)
        with np.load(work / "out.npz") as out:
            results = [out[f"arr_{i}"] for i in range(len(arrays))]
    return [r.view(a.dtype) for r, a in zip(results, arrays)]


def bochs_defects(elf: Path) -> set[str]:
    """Functions of ``elf`` that this Bochs would run wrong: a ``vdpbf16ps`` whose memory operand has an 8-bit
    displacement. EVEX scales it by the operand size (64 bytes for a zmm); Bochs 2.8 scales it by 4, so
    ``vdpbf16ps 0x40(%r15)`` reads 4 bytes on (the register form and 32-bit displacements are right; a test
    in tests/backends/precision/test_tvm_bf16.py pins this down)."""
    out = subprocess.run(["objdump", "-d", str(elf)], check=True, capture_output=True, text=True).stdout
    bad, current = set(), None
    for line in out.splitlines():
        if line.endswith(">:"):
            current = line.split("<", 1)[1][:-2]
            continue
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].startswith("vdpbf16ps") and "(%" in parts[2]:
            raw = parts[1].split()
            modrm = int(raw[5], 16)  # 4 EVEX bytes, the opcode, then ModRM
            if modrm >> 6 == 1:  # mod 01: an 8-bit displacement follows
                bad.add(current)
    return bad


def build_module(mod, target, asserts: bool):
    """``mod`` compiled with edgellm's pipeline for ``target``, for ``check_module``; ``asserts`` keeps the kernels'
    argument checks (the emulated build: a kernel handed this CPU's own weight layout refuses it)."""
    import tvm

    from edgellm.backends import tvm_pipelines

    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": not asserts}):
        return tvm.compile(mod, target, relax_pipeline=tvm_pipelines.get("edgellm", target))


def check_module(host_lib, emulated_lib, model: str, call, rtol: float = 1e-4) -> dict:
    """Differential check of a whole compiled Relax module: ``call(vm)`` runs it here on ``host_lib``'s
    kernels (the same graph compiled for this CPU), recording each kernel's arguments; then every kernel
    the two share is run from ``emulated_lib`` (compiled for the foreign target) on Bochs's ``model`` with
    the recorded inputs, and its outputs compared. Returns {kernel: max error relative to the output's
    scale, or the reason it was skipped}."""
    import tvm
    from tvm import relax

    calls: dict[str, list] = {}
    vm = relax.VirtualMachine(host_lib, tvm.cpu())

    def instrument(func, name, before_run, ret_value, *args):
        if name.startswith("vm.builtin.") or (before_run and name in calls):
            return 0
        copies = [a.numpy().copy() if hasattr(a, "numpy") else a for a in args]
        if before_run:
            calls[name] = [copies, None]
        elif calls[name][1] is None:
            calls[name][1] = copies
        return 0

    vm.set_instrument(instrument)
    call(vm)
    report = {}
    with tempfile.TemporaryDirectory(prefix="edgellm-x86emu-mod-") as tmp:
        lib = emulated_lib.mod.imports[0] if hasattr(emulated_lib, "mod") else emulated_lib
        lib.write_to_file(str(Path(tmp) / "module.o"))
        elf = link(Path(tmp) / "module.o", Path(tmp))
        _, symbols = _load(elf)
        defects = bochs_defects(elf)
        for name, (before, after) in calls.items():
            if f"__tvm_ffi_{name}" not in symbols:
                report[name] = "skipped: not in the emulated module (a kernel of this CPU's schedule only)"
                continue
            if {name, f"{name}_compute_", f"__tvm_ffi_{name}"} & defects:
                report[name] = "skipped: Bochs would run it wrong (vdpbf16ps with an 8-bit displacement)"
                continue
            if not all(isinstance(a, np.ndarray) for a in before):
                report[name] = "skipped: non-tensor arguments"
                continue
            if sum(a.nbytes for a in before) > 64 << 20:
                report[name] = "skipped: arguments over 64 MB"
                continue
            try:
                got = run_elf(elf, f"__tvm_ffi_{name}", before, model)
            except EmulationError as e:
                report[name] = f"skipped: {e}"
                continue
            errs = []
            for b, a, g in zip(before, after, got):
                if not np.array_equal(a, b) and a.dtype.kind == "f":  # an output: the kernel wrote it
                    scale = max(float(np.abs(a).max()), 1e-30)
                    errs.append(float(np.abs(g.astype(np.float64) - a).max()) / scale)
                elif not np.array_equal(a, b):
                    errs.append(0.0 if np.array_equal(a, g) else 1.0)
            report[name] = max(errs, default=0.0)
    return report


def _emulate(work: Path, model: str, elf: Path, entry: str) -> list[np.ndarray]:
    """The child's side of ``run_elf``."""
    dtypes = (work / "dtypes.txt").read_text().split("\n")
    with np.load(work / "in.npz") as given:
        arrays = [given[f"arr_{i}"] for i in range(len(dtypes))]
    bochscpu = _bochscpu()
    mem = bochscpu.memory
    segments, symbols = _load(elf)
    if entry not in symbols:
        raise EmulationError(f"no function {entry} in the object")

    # guest memory: image, tensors (+ their DLTensor structs and shapes), stack; identity-mapped
    heap = bytearray()

    def place(blob: bytes, align: int = 64) -> int:
        heap.extend(b"\0" * (-len(heap) % align))
        addr = _HEAP + len(heap)
        heap.extend(blob)
        return addr

    data_at = [place(np.ascontiguousarray(a).tobytes()) for a in arrays]
    any_args = b""
    for a, addr, name in zip(arrays, data_at, dtypes):
        shape = place(struct.pack(f"<{a.ndim}q", *a.shape), 8)
        code = 4 if name == "bfloat16" else _DL_CODE[a.dtype.kind]  # kDLBfloat (ml_dtypes' bfloat16, passed as uint16)
        dtype = struct.pack("<BBH", code, a.dtype.itemsize * 8, 1)
        tensor = place(struct.pack("<QiiI", addr, 1, 0, a.ndim) + dtype + struct.pack("<QQQ", shape, 0, 0), 8)
        any_args += struct.pack("<iIQ", 7, 0, tensor)  # kTVMFFIDLTensorPtr
    pages: dict[int, bytearray] = {}

    def write(addr: int, blob: bytes) -> None:
        pos = 0
        while pos < len(blob):
            page, inner = divmod(addr + pos, _PAGE)
            n = min(_PAGE - inner, len(blob) - pos)
            buf = pages.setdefault(page, bytearray(_PAGE))
            buf[inner:inner + n] = blob[pos:pos + n]
            pos += n

    for vaddr, blob, memsz in segments:
        write(vaddr, blob + b"\0" * (memsz - len(blob)))
    write(_HEAP, bytes(heap))
    write(_STACK, bytes(_STACK_BYTES))
    write(symbols["emu_args"], any_args)
    write(symbols["emu_nargs"], struct.pack("<i", len(arrays)))
    write(symbols["emu_fn"], struct.pack("<Q", symbols[entry]))

    _set_model(model)
    session = bochscpu.Session()
    session.missing_page_handler = lambda gpa: (_ for _ in ()).throw(EmulationError(f"kernel touched unmapped memory {gpa:#x}"))
    table = mem.PageMapLevel4Table()
    hosts = []
    for page, buf in sorted(pages.items()):
        hva = mem.allocate_host_page()
        hosts.append(hva)
        mem.page_insert(page * _PAGE, hva)
        table.insert(page * _PAGE, page * _PAGE, 1)
    pml4 = 0x100000
    for hva, gpa in table.commit(pml4):
        mem.page_insert(gpa, hva)
    for page, buf in pages.items():
        if any(buf):
            mem.phy_write(page * _PAGE, list(buf))

    state = bochscpu.State()
    bochscpu.cpu.set_long_mode(state)
    state.cr3 = pml4
    state.cr4 = state.cr4 | (1 << 9) | (1 << 10) | (1 << 18)  # OSFXSR, OSXMMEXCPT, OSXSAVE
    state.xcr0 = 0xE7  # x87, SSE, AVX, AVX-512 opmask / ZMM_Hi256 / Hi16_ZMM
    state.mxcsr = 0x1F80
    state.rsp = _STACK + _STACK_BYTES - 8  # as after a call: rsp + 8 is 16-byte aligned
    state.rip = symbols["emu_entry"]
    code = bochscpu.Segment()
    code.present, code.selector, code.base, code.limit, code.attr = True, 0x33, 0, 0xFFFFFFFF, 0x22FB
    data = bochscpu.Segment()
    data.present, data.selector, data.base, data.limit, data.attr = True, 0x2B, 0, 0xFFFFFFFF, 0xCF3
    state.cs, state.ds, state.ss, state.es, state.fs, state.gs = code, data, data, data, data, data
    session.cpu.state = state

    raised = []

    def on_exception(sess, cpu_id, vector, error_code):
        raised.append((int(vector), int(sess.cpu.state.rip)))
        sess.stop()

    hook = bochscpu.Hook()
    hook.exception = on_exception
    session.run([hook])

    def read(addr: int, n: int) -> bytes:
        return bytes(mem.virt_read(pml4, addr, n)) if n else b""

    try:
        done, = struct.unpack("<I", read(symbols["emu_done"], 4))
        rc, = struct.unpack("<i", read(symbols["emu_rc"], 4))
        error, = struct.unpack("<i", read(symbols["emu_error"], 4))
        if done != _DONE:
            vector, rip = raised[0] if raised else (None, None)
            names = {6: "#UD: an instruction this CPU model lacks", 13: "#GP", 14: "#PF", 19: "#XM (SIMD fp)"}
            raise EmulationError(f"the kernel did not return on {model}: exception {vector} "
                                 f"({names.get(vector, '?')}) at {rip:#x}" if rip is not None else "no exception")
        if rc != 0 or error:
            raise EmulationError(f"the kernel returned {rc} (error flag {error}): an argument check failed")
        return [np.frombuffer(read(addr, a.nbytes), a.dtype).reshape(a.shape).copy() for a, addr in zip(arrays, data_at)]
    finally:
        for hva in hosts:
            mem.release_host_page(hva)


if __name__ == "__main__":
    _work = Path(sys.argv[1])
    try:
        np.savez(_work / "out.npz", *_emulate(_work, sys.argv[2], Path(sys.argv[3]), sys.argv[4]))
    except EmulationError as e:
        (_work / "error.txt").write_text(str(e))
        os._exit(1)
    os._exit(0)  # no interpreter teardown: bochscpu's bindings can crash at exit after a stopped run
