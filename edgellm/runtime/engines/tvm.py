"""Run a TVM Relax VM executable with TVM's runtime library alone (3.4 MB, no compiler)."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime import cuda
from edgellm.runtime.engines import Pool

MODULE = "model.so"


class _Refuse:
    """A meta-path finder that makes ``import NAME`` fail, for the duration of a with-block."""

    def __init__(self, *names: str):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported by the edgellm runtime")
        return None

    def __enter__(self):
        sys.meta_path.insert(0, self)

    def __exit__(self, *exc):
        sys.meta_path.remove(self)


def import_tvm():
    """TVM's runtime only, unless this process already loaded the full TVM.

    ``TVM_USE_RUNTIME_LIB=1`` makes ``import tvm`` load libtvm_runtime.so instead of the
    260 MB compiler. A user who sets the variable themselves keeps their choice.
    tvm_ffi tries ``import torch`` (1.7 s) and torch's DLPack extension only to speed up
    torch interop; the runtime takes numpy, so both are kept out.
    """
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    try:
        if "torch" in sys.modules:
            import tvm
        else:
            with _Refuse("torch"):
                import tvm
        from tvm.runtime import vm  # noqa: F401
    except ImportError as e:
        raise EdgeError(
            f"TVM's runtime is not installed ({e})",
            "pip install 'edgellm[runtime]' or copy the bundle from `edgellm bundle-runtime`",
        ) from None
    return tvm


def set_threads(tvm, threads: int) -> None:
    """Size TVM's thread pool.

    TVM caps the pool at TVM_NUM_THREADS, read when the pool is first made; unset, it assumes SMT
    and takes half the CPUs, and a request beyond the cap pins this thread to one core (which then
    slows every other library in the process). So the cap is set to all cores first.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    tvm.get_global_func("runtime.config_threadpool")(1, int(threads))


_POOL = threading.local()  # .threads: what this calling thread's TVM pool was last sized to


class PoolSizer:
    """TVM's thread pool belongs to the thread that calls into TVM, and a new caller's pool starts at
    TVM_NUM_THREADS: size the calling thread's pool before a call when it was last sized for another count (a
    first call, or two models with different ``threads`` called from one thread, as the thread-count measurement
    does)."""

    def __init__(self, tvm, threads: int):
        self.tvm, self.threads = tvm, int(threads)
        self()

    def __call__(self) -> None:
        if getattr(_POOL, "threads", None) != self.threads:
            set_threads(self.tvm, self.threads)
            _POOL.threads = self.threads


def _to_numpy(tensor) -> np.ndarray:
    try:
        return np.from_dlpack(tensor).copy()
    except (TypeError, RuntimeError, BufferError):  # a dtype numpy's DLPack import does not take
        return tensor.numpy()


class _Session:
    """One caller's VM and input tensors. A Relax VM keeps registers and storage per call, so two threads
    must never share one; every session shares the loaded module (its code and constants)."""

    def __init__(self, engine: "Engine"):
        self.vm = engine.tvm.runtime.vm.VirtualMachine(engine.lib, engine.device)
        self.main = self.vm["main"]
        self.inputs: list = []
        self.views: list[np.ndarray] = []


class Engine:
    """Thread-safe: each concurrent caller takes a session (VM + buffers) from a pool, made on first need and
    kept for reuse, so N threads calling at once cost N sessions, and one thread costs one."""

    def __init__(self, manifest: dict, members: dict[str, bytes], threads: int):
        self.tvm = tvm = import_tvm()
        self._size_pool = PoolSizer(tvm, threads)
        self.threads = threads
        self.cuda = cuda.is_cuda(manifest)  # NVIDIA GPU package: edgellm/runtime/cuda.py
        self.device = cuda.device(tvm, manifest) if self.cuda else tvm.cpu(0)
        self._tensor = tvm.runtime.tensor
        # dlopen needs a file; once loaded, the file can go (the mapping stays)
        with tempfile.TemporaryDirectory(prefix="edgellm-") as tmp:
            path = Path(tmp) / MODULE
            path.write_bytes(members[MODULE])
            self.lib = tvm.runtime.load_module(str(path))
        self._empty = tvm.runtime.empty
        self._pool = Pool(lambda: _Session(self))

    @property
    def sessions(self) -> int:
        """Sessions made so far: the most calls that ran at once."""
        return self._pool.made

    def _session(self):
        self._size_pool()
        return self._pool.take()

    def _feed(self, session: _Session, arrays: list[np.ndarray]) -> list:
        """Device tensors holding ``arrays``: allocated once per session, then refilled. On the CPU through a numpy
        view of each tensor (np.copyto: 0.4 us for kws-cnn's input, vs 5 us for Tensor.copyfrom and 4 us more for
        checking the tensors' shapes through TVM; numpy's own buffers are not 64-byte aligned, so zero-copy
        DLPack into TVM is refused)."""
        views = session.views
        if len(views) != len(arrays) or any(v.shape != a.shape or v.dtype != a.dtype for v, a in zip(views, arrays)):
            session.inputs = [self._empty(a.shape, str(a.dtype), self.device) for a in arrays]
            session.views = views = [self._view(t) for t in session.inputs]
        for t, v, a in zip(session.inputs, views, arrays):
            if v.flags.writeable:
                np.copyto(v, a)
            else:  # a GPU tensor (the view is a placeholder), or numpy < 2 (read-only DLPack views)
                t.copyfrom(np.ascontiguousarray(a))
        return session.inputs

    def _view(self, tensor) -> np.ndarray:
        if not self.cuda:
            try:
                return np.from_dlpack(tensor)
            except (TypeError, RuntimeError, BufferError):
                pass
        view = np.empty(tuple(tensor.shape), str(tensor.dtype))
        view.flags.writeable = False
        return view

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._session() as session:
            out = session.main(*self._feed(session, arrays))
            if self.cuda:  # kernels run asynchronously: the inference ends when the GPU is done
                self.device.sync()
                return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
            # a copy out of a DLPack view: 0.5 us vs 5.5 us for Tensor.numpy(); a copy, because an output can
            # be a view of an input tensor that the next call refills, or of a constant
            if hasattr(out, "numpy"):
                return [_to_numpy(out)]
            return [_to_numpy(out[i]) for i in range(len(out))]

    def op_times(self, arrays: list[np.ndarray], runs: int) -> list[tuple[str, float]]:
        """Seconds spent in each VM call (fused kernels and VM builtins), over ``runs`` runs.

        The VM calls the instrument before and after every Call instruction; CPU kernels
        are synchronous, so the gap is the kernel's time; GPU kernels are not, so the GPU is
        synchronized before and after each call.
        """
        events: list[tuple[str, float]] = []
        started: list[float] = []

        sync = self.device.sync if self.cuda else (lambda: None)

        def instrument(func, name, before_run, ret_value, *args):
            sync()
            now = time.perf_counter()
            if before_run:
                started.append(now)
            else:
                events.append((str(name), now - started.pop()))
            return 0

        inputs = [self._tensor(a, self.device) for a in arrays]
        with self._session() as session:
            session.vm.set_instrument(instrument)
            try:
                for _ in range(runs):
                    session.main(*inputs)
            finally:
                session.vm.set_instrument(None)
        return events
