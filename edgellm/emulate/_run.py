"""Running Python inside the arm64 rootfs under qemu-user (no binfmt_misc needed)."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import signal
import subprocess

from ._errors import EmulationError
from ._rootfs import STAMP, _install_qemu
from ._tools import qemu_binary, which

GUEST_WORKDIR = "/work"  # where workdir appears inside the rootfs in chroot mode

# Run in a private mount namespace (unshare -m): the bind mounts vanish with the process, so nothing
# leaks and nothing needs cleaning up on failure.  /sys is needed by e.g. OpenVINO's CPU plugin.
_CHROOT_SH = """set -e; R=$1; W=$2; shift 2
mount --bind "$W" "$R/work"
mount -t proc proc "$R/proc"
mount --bind /dev "$R/dev"
mount --bind /sys "$R/sys"
exec unshare -R "$R" -w /work /usr/bin/qemu-aarch64-static "$@"
"""


@functools.lru_cache(maxsize=None)
def qemu_cpus() -> tuple[str, ...]:
    """CPU models the installed qemu-aarch64-static accepts for QEMU_CPU (e.g. cortex-a72, neoverse-n1, max)."""
    out = subprocess.run([qemu_binary(), "-cpu", "help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    names: list[str] = []
    for line in out.splitlines()[1:] if out.startswith("Available CPUs") else out.splitlines():
        names += [tok for tok in line.split() if re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", tok)]
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=None)
def _chroot_possible() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "--", "true"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


def _mode() -> str:
    mode = os.environ.get("EDGELLM_ARM64_MODE", "auto")
    if mode == "auto":
        return "chroot" if _chroot_possible() else "prefix"
    if mode not in ("chroot", "prefix"):
        raise EmulationError(f"EDGELLM_ARM64_MODE must be auto, chroot or prefix, not {mode!r}")
    return mode


def _command(rootfs, workdir, script: str, args, qemu_cpu: str | None, env: dict | None) -> tuple[list[str], str | None, dict]:
    """(argv, cwd, environment) that run ``python3 script *args`` with the arm64 Python of ``rootfs`` under qemu-user."""
    rootfs = pathlib.Path(rootfs).resolve()
    workdir = pathlib.Path(workdir).resolve()
    py = rootfs / "usr/bin/python3"
    if not py.exists() or not (rootfs / STAMP).exists():
        raise EmulationError(f"no arm64 rootfs at {rootfs}: build it with edgellm.emulate.prepare_rootfs()")
    if not workdir.is_dir():
        raise EmulationError(f"workdir {workdir} is not a directory")
    if qemu_cpu is not None and qemu_cpu not in qemu_cpus():
        raise EmulationError(f"qemu-aarch64-static does not know CPU {qemu_cpu!r}: use one of {', '.join(qemu_cpus())}")
    guest_env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    guest_env.update({str(k): str(v) for k, v in (env or {}).items()})
    guest_env["TVM_USE_RUNTIME_LIB"] = "1"
    if qemu_cpu is not None:
        guest_env["QEMU_CPU"] = qemu_cpu
    else:
        guest_env.pop("QEMU_CPU", None)
    argv = [str(a) for a in args]
    if _mode() == "chroot":
        _install_qemu(rootfs)
        cmd = [which("unshare") or "unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c", _CHROOT_SH, "sh",
               str(rootfs), str(workdir), "/usr/bin/python3", script, *argv]
        return cmd, None, guest_env
    guest_env["QEMU_LD_PREFIX"] = str(rootfs)
    return [qemu_binary(), str(py), script, *argv], str(workdir), guest_env


def run_python(rootfs, workdir, script: str, args=(), qemu_cpu: str | None = None,
               env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python3 script *args`` with the arm64 Python of ``rootfs`` under qemu-user; capture text output.

    Modes (``$EDGELLM_ARM64_MODE``: auto / chroot / prefix):

    * chroot (auto when root and mount namespaces work): private mount namespace, ``workdir`` bind-mounted
      at ``/work`` (the cwd), fresh /proc, /dev and /sys bind-mounted, chroot into the rootfs.  Nothing of
      the host leaks in; give paths relative to ``workdir``.
    * prefix (otherwise, no root needed): ``QEMU_LD_PREFIX=rootfs``, cwd = ``workdir``; host paths are
      visible (files missing from the rootfs fall back to the host's).

    ``TVM_USE_RUNTIME_LIB=1`` is always set; ``qemu_cpu`` sets QEMU_CPU (see :func:`qemu_cpus`; qemu's
    default, ``max``, has every extension and so hides illegal instructions); ``env`` adds/overrides guest
    environment variables (e.g. PYTHONPATH).  A timeout raises ``subprocess.TimeoutExpired``.
    """
    cmd, cwd, guest_env = _command(rootfs, workdir, script, args, qemu_cpu, env)
    return subprocess.run(cmd, cwd=cwd, env=guest_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", timeout=timeout)


def start_python(rootfs, workdir, script: str, args=(), qemu_cpu: str | None = None, env: dict | None = None,
                 **popen) -> subprocess.Popen:
    """:func:`run_python` for a long-running guest process (a fleet agent): started, not waited for.
    The guest shares the host's network, so it reaches a tracker on the host's loopback."""
    cmd, cwd, guest_env = _command(rootfs, workdir, script, args, qemu_cpu, env)
    return subprocess.Popen(cmd, cwd=cwd, env=guest_env, text=True, errors="replace", **popen)


_SIGILL_TEXT = re.compile(r"uncaught target signal 4 \(Illegal instruction\)|Illegal instruction")


def illegal_instruction(proc: subprocess.CompletedProcess) -> bool:
    """True when the emulated process died of SIGILL.

    qemu-user re-raises the guest's fatal signal on itself after printing
    ``qemu: uncaught target signal 4 (Illegal instruction) - core dumped``, so the host sees return code
    -4 (132 when a shell sits in between).
    """
    if proc.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        return True
    stderr = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode("utf-8", "replace")
    return proc.returncode != 0 and bool(_SIGILL_TEXT.search(stderr or ""))
