"""Host tools for arm64 emulation: finding them, and apt-installing missing ones when allowed."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from ._errors import EmulationError

# executable -> Debian package that ships it
HOST_TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "dpkg-deb": "dpkg",
    "tar": "tar",
}
CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_PACKAGE = "g++-aarch64-linux-gnu"


def which(name: str, path: str | None = None) -> str | None:
    """``shutil.which`` over $PATH, also looking in the ``sbin`` sibling of every ``.../bin`` entry.

    debootstrap lives in /usr/sbin, which a non-root user's PATH often lacks.
    """
    dirs = [d for d in (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep) if d]
    search: list[str] = []
    for d in dirs:
        search.append(d)
        p = pathlib.Path(d)
        if p.name == "bin":
            search.append(str(p.with_name("sbin")))
    return shutil.which(name, path=os.pathsep.join(dict.fromkeys(search)))


def _apt_install(packages: list[str]) -> None:
    apt = which("apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            raise EmulationError(
                f"'{' '.join(cmd[1:3])}' failed (exit {proc.returncode}): {tail}; "
                f"install by hand: apt-get install {' '.join(packages)}"
            )


def _can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and which("apt-get") is not None


def _ensure(tools: dict[str, str], install: bool) -> dict[str, str]:
    """Return {tool: absolute path}; apt-get install the packages of missing tools when allowed."""
    found = {t: which(t) for t in tools}
    missing = [t for t, p in found.items() if p is None]
    if missing and install and _can_apt_install():
        _apt_install(sorted({tools[t] for t in missing}))
        found = {t: which(t) for t in tools}
        missing = [t for t, p in found.items() if p is None]
    if missing:
        pkgs = sorted({tools[t] for t in missing})
        what = ", ".join(f"{tools[t]} ({t})" for t in missing)
        verb = "is" if len(missing) == 1 else "are"
        hint = " (as root)" if install and hasattr(os, "geteuid") and os.geteuid() != 0 else ""
        raise EmulationError(f"{what} {verb} missing: apt-get install {' '.join(pkgs)}{hint}")
    return found  # type: ignore[return-value]


def ensure_host_tools(install: bool = True) -> None:
    """Make sure debootstrap, qemu-aarch64-static, dpkg-deb and tar are on PATH.

    Missing ones are apt-get installed (``apt-get update`` first) when running as root and
    ``install`` is true; otherwise an :class:`EmulationError` names the apt package to install.
    """
    _ensure(HOST_TOOLS, install)


def ensure_cross_compiler(install: bool = True) -> str:
    """Return the path of ``aarch64-linux-gnu-g++`` (Debian: g++-aarch64-linux-gnu), installing it if allowed.

    Use it as ``export_library(path, cc=ensure_cross_compiler())``.
    """
    return _ensure({CROSS_CXX: CROSS_PACKAGE}, install)[CROSS_CXX]


def qemu_binary() -> str:
    path = which("qemu-aarch64-static")
    if path is None:
        raise EmulationError("qemu-user-static is missing: apt-get install qemu-user-static")
    return path
