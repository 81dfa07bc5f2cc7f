"""Run arm64 (aarch64) code on an x86_64 Linux host: a cached Debian 12 arm64 userland with Python 3.11,
numpy and TVM's runtime, executed under qemu-user (no binfmt_misc needed).

Typical use::

    from edgellm import emulate
    cxx = emulate.ensure_cross_compiler()              # aarch64-linux-gnu-g++ for export_library(cc=...)
    rootfs = emulate.prepare_rootfs()                  # ~1 min the first time, instant afterwards
    proc = emulate.run_python(rootfs, workdir, "run.py", ["model.so"], qemu_cpu="cortex-a72")
    if emulate.illegal_instruction(proc): ...          # the build uses an extension the core lacks

Use it for correctness and instruction-set checks only: timings under emulation say nothing about the
device.  Pick ``qemu_cpu`` to match the device's core: qemu's default (``max``) has every extension, which
hides the SIGILL a ``+dotprod`` / ``+sve`` build gets on e.g. a Cortex-A72.

Host needs (Debian/Ubuntu): debootstrap, qemu-user-static, dpkg, tar, util-linux (unshare, for chroot
mode), python3 with pip >= 22; g++-aarch64-linux-gnu for cross-compiling.  Network access to a Debian
mirror and PyPI for the first :func:`prepare_rootfs` only.
"""

from ._errors import EmulationError
from ._rootfs import cache_dir, prepare_rootfs, prune_tvm_runtime, runtime_wheels, site_packages
from ._run import illegal_instruction, qemu_cpus, run_python, start_python
from ._tools import ensure_cross_compiler, ensure_host_tools

__all__ = [
    "EmulationError",
    "cache_dir",
    "ensure_host_tools",
    "ensure_cross_compiler",
    "prepare_rootfs",
    "prune_tvm_runtime",
    "run_python",
    "start_python",
    "illegal_instruction",
    "runtime_wheels",
    "qemu_cpus",
    "site_packages",
]
