"""A cached arm64 Debian 12 (bookworm) userland with Python 3.11, numpy and TVM's runtime.

How it is built (no binfmt_misc, nothing arm64 is executed except the final smoke test, under qemu):

1. ``debootstrap --download-only --variant=minbase --include=python3,libgomp1`` resolves and downloads
   the .debs (cached in ``downloads/debs``).  --download-only works without root.
2. The merged-/usr symlinks (bin, sbin, lib -> usr/...) are created, and every .deb is unpacked with
   ``dpkg-deb --fsys-tarfile | tar -x --keep-directory-symlink`` (plain ``dpkg-deb -x`` would replace the
   symlinks by directories).  Maintainer scripts never run; /etc/passwd and /etc/group come from
   base-passwd's master files.
3. aarch64 wheels (:func:`runtime_wheels` + ``extra_pip``) are fetched on the host with
   ``pip download --platform manylinux_2_17..2_36_aarch64 --python-version 3.11`` (cached in
   ``downloads/wheels``) and installed with ``pip install --target /usr/local/lib/python3.11/dist-packages``.
4. TVM is made runtime-only (:func:`prune_tvm_runtime`), .pyc files are compiled once, and a smoke test
   imports numpy + tvm under qemu.

The whole tree is built in ``arm64/rootfs.tmp-<pid>``, stamped last and renamed to ``arm64/rootfs``, so an
interrupted setup never leaves a rootfs that looks ready.  The stamp is keyed on everything that went in.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterable, Iterator

from ._errors import EmulationError
from ._tools import ensure_host_tools, qemu_binary, which

SUITE = "bookworm"  # Debian 12: python 3.11, glibc 2.36
GUEST_PYTHON = "3.11"
GLIBC_MINOR = 36
DEB_INCLUDE = ("python3", "libgomp1")
MERGED_USR_DIRS = ("bin", "sbin", "lib")  # arm64 has no lib64 & co.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# bump when the build recipe changes so cached rootfs trees are rebuilt
RECIPE_VERSION = 2
STAMP = ".edgellm-rootfs.json"

_PINS = {
    "apache-tvm": "0.27.0.post1",
    # 0.1.15.x is ABI-incompatible with apache-tvm 0.27.0.post1
    "apache-tvm-ffi": "0.1.14.post1",
    "numpy": "2.4.6",
    "ml_dtypes": "0.6.0",
}


def cache_dir() -> pathlib.Path:
    """$EDGELLM_CACHE, else $XDG_CACHE_HOME/edgellm, else ~/.cache/edgellm."""
    if os.environ.get("EDGELLM_CACHE"):
        return pathlib.Path(os.environ["EDGELLM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "edgellm"
    return pathlib.Path.home() / ".cache" / "edgellm"


def runtime_wheels(python_version: str = "3.11", platform: str = "aarch64") -> list[str]:
    """The pinned pip requirements a device needs to run TVM-compiled modules (runtime only, no compiler).

    The same pins hold for every supported CPython (3.11 .. 3.14) and for aarch64 / x86_64 Linux:
    apache-tvm ships abi3 wheels, numpy 2.4.6 and ml_dtypes 0.6.0 have wheels for each.
    """
    m = re.fullmatch(r"3\.(\d+)", python_version)
    if not m or not 11 <= int(m.group(1)) <= 14:
        raise ValueError(f"python_version must be 3.11 .. 3.14 (numpy {_PINS['numpy']}), got {python_version!r}")
    if platform not in ("aarch64", "x86_64"):
        raise ValueError(f"platform must be 'aarch64' or 'x86_64', got {platform!r}")
    return [f"{name}=={ver}" for name, ver in _PINS.items()] + ["typing_extensions"]


# --------------------------------------------------------------------------------------------------
# runtime-only TVM

# What a runtime-only TVM needs.  With TVM_USE_RUNTIME_LIB=1, `import tvm` loads only tvm_ffi's
# libtvm_ffi.so + core extension and tvm/lib/libtvm_runtime.so, and imports these Python packages:
# tvm.{backend (loader only), driver, ir, rpc, runtime, script, support, sym, target, te, tirx} and
# tvm_ffi.{cpp, dataclasses, utils, ...}; `import tvm.runtime.vm` + load_module + VirtualMachine add nothing
# else (checked by dumping sys.modules and /proc/self/maps under qemu after running a model).
#
# Removed unconditionally (the compiler, the CUDA runtime, bundled third-party headers):
_ALWAYS_REMOVE = (
    "tvm/lib/libtvm_compiler.so",
    "tvm/lib/libtvm_runtime_cuda.so",
    "tvm/3rdparty",
    "tvm_ffi/3rdparty",
)
# Removed because nothing in runtime-only mode imports or loads them (proved by running a compiled model
# afterwards: tests/device/test_emulate.py).  libtvm_runtime_extra.so holds disco (multi-device sessions)
# and curand, and is only dlopen'ed when the compiler is loaded (so disco sessions are unavailable in
# runtime-only mode anyway).
_RUNTIME_ONLY_REMOVE: tuple[str, ...] = (
    "tvm/lib/libtvm_runtime_extra.so",
    "tvm/relax", "tvm/topi", "tvm/s_tir", "tvm/contrib", "tvm/web", "tvm/testing", "tvm/exec",
    "tvm/src", "tvm/include", "tvm/cmake", "tvm/lib64",
    *(f"tvm/backend/{b}" for b in ("adreno", "cuda", "hexagon", "metal", "opencl", "rocm", "trn", "vulkan", "webgpu")),
    # (tvm_ffi/lib/libtvm_ffi_testing.so must stay: tvm_ffi's core extension has it as DT_NEEDED)
    "tvm_ffi/include", "tvm_ffi/src", "tvm_ffi/cython", "tvm_ffi/stub", "tvm_ffi/share", "tvm_ffi/testing",
)
# Measured (aarch64 wheels installed with pip --target --no-compile, tvm/ + tvm_ffi/, bytes of files):
#   as installed                                      277.9 MB  (tvm 268.1, tvm_ffi 9.9)
#   after _ALWAYS_REMOVE (the recipe's runtime-only)   21.9 MB  (tvm 14.5, tvm_ffi 7.4)
#   after _RUNTIME_ONLY_REMOVE too                      8.0 MB  (tvm 4.4 of which libtvm_runtime.so 2.9,
#                                                                tvm_ffi 3.6 of which libtvm_ffi.so 2.2)
# Biggest savings of the second step: relax 7.5, backend/cuda 3.4, s_tir 3.6, topi 2.5, src 2.0, tvm_ffi/include 1.4,
# libtvm_runtime_extra.so 1.2 MB.  numpy (24 MB + 29 MB numpy.libs/OpenBLAS) and ml_dtypes (1.9 MB) stay as they are.


def prune_tvm_runtime(site_packages_dir: str | os.PathLike, keep_cuda: bool = False) -> int:
    """Delete the parts of the tvm / tvm_ffi wheels that a runtime-only (TVM_USE_RUNTIME_LIB=1) Relax VM
    never touches; return the number of bytes freed.  See the module comments for what and why.
    ``keep_cuda`` keeps tvm/lib/libtvm_runtime_cuda.so, which CUDA packages load (edgellm/runtime/cuda.py)."""
    sp = pathlib.Path(site_packages_dir)
    freed = 0
    for rel in _ALWAYS_REMOVE + _RUNTIME_ONLY_REMOVE:
        if keep_cuda and rel == "tvm/lib/libtvm_runtime_cuda.so":
            continue
        for p in sp.glob(rel):
            if p.is_dir() and not p.is_symlink():
                freed += _du(p)
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                freed += p.lstat().st_size
                p.unlink()
    return freed


def _du(path: pathlib.Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


# --------------------------------------------------------------------------------------------------
# the rootfs


def _debian_mirror() -> str:
    if os.environ.get("EDGELLM_DEBIAN_MIRROR"):
        return os.environ["EDGELLM_DEBIAN_MIRROR"].rstrip("/")
    uris: list[str] = []
    for f in sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                if line.startswith("URIs:"):
                    uris += line.split()[1:]
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "deb":
                uris += [p for p in parts[1:] if re.match(r"https?://", p)][:1]
    for uri in uris:
        if re.match(r"https?://", uri) and uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _wheel_platform_args() -> list[str]:
    args = ["--python-version", GUEST_PYTHON, "--implementation", "cp",
            "--abi", "cp" + GUEST_PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none",
            "--platform", "manylinux2014_aarch64"]
    for minor in range(17, GLIBC_MINOR + 1):
        args += ["--platform", f"manylinux_2_{minor}_aarch64"]
    return args


def _key(extra_pip: Iterable[str]) -> dict:
    return {
        "recipe": RECIPE_VERSION,
        "suite": SUITE,
        "arch": "arm64",
        "debs": list(DEB_INCLUDE),
        "pip": runtime_wheels(GUEST_PYTHON, "aarch64") + list(extra_pip),
        "prune": list(_ALWAYS_REMOVE + _RUNTIME_ONLY_REMOVE),
    }


def _read_stamp(rootfs: pathlib.Path) -> dict | None:
    try:
        return json.loads((rootfs / STAMP).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-4:])
        raise EmulationError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def _install_qemu(rootfs: pathlib.Path) -> None:
    """Copy qemu-aarch64-static into the rootfs so that chroot mode can exec it without binfmt_misc."""
    src = pathlib.Path(qemu_binary())
    dst = rootfs / "usr/bin/qemu-aarch64-static"
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    tmp = dst.with_name(f".qemu-aarch64-static.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)


def site_packages(rootfs: str | os.PathLike) -> pathlib.Path:
    """Where the aarch64 wheels live inside the rootfs."""
    return pathlib.Path(rootfs) / f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"


def prepare_rootfs(extra_pip: Iterable[str] = (), progress: Callable[[str], None] | None = None) -> pathlib.Path:
    """Build (once) and return the cached arm64 userland ``cache_dir()/arm64/rootfs``.

    Idempotent: a rootfs whose stamp matches the requested content is returned at once.  ``extra_pip``
    adds aarch64 wheels (e.g. ``["onnxruntime==1.22.1"]``); one rootfs is cached, so a different
    ``extra_pip`` rebuilds it.  Cold: ~35 s and ~150 MB of downloads (Debian mirror + PyPI), cached under
    ``cache_dir()/arm64/downloads``; warm: < 1 ms.  Raises :class:`EmulationError`.
    """
    extra_pip = [str(p) for p in extra_pip]
    say = progress or (lambda msg: None)
    base = cache_dir() / "arm64"
    rootfs = base / "rootfs"
    key = _key(extra_pip)
    if _read_stamp(rootfs) == key:
        _install_qemu(rootfs)
        return rootfs
    ensure_host_tools(install=True)
    with _locked(base / ".lock"):
        if _read_stamp(rootfs) == key:  # another process built it meanwhile
            _install_qemu(rootfs)
            return rootfs
        t0 = time.monotonic()
        for stale in list(base.glob("rootfs.tmp-*")) + list(base.glob("rootfs.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = base / f"rootfs.tmp-{os.getpid()}"
        try:
            _build(tmp, base / "downloads", extra_pip, say)
            (tmp / STAMP).write_text(json.dumps({"key": key, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
            if rootfs.exists():
                old = base / f"rootfs.old-{os.getpid()}"
                os.rename(rootfs, old)
                os.rename(tmp, rootfs)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, rootfs)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"arm64 rootfs ready in {time.monotonic() - t0:.0f} s: {rootfs}")
        return rootfs


def _build(root: pathlib.Path, downloads: pathlib.Path, extra_pip: list[str], say: Callable[[str], None]) -> None:
    debs = downloads / "debs"
    wheels = downloads / "wheels"
    for d in (root, debs, wheels):
        d.mkdir(parents=True, exist_ok=True)
    tools = {t: which(t) or t for t in ("dpkg-deb", "tar")}

    # 1. resolve + download the Debian packages (no root needed for --download-only)
    mirror = _debian_mirror()
    say(f"debootstrap --download-only arm64 {SUITE} from {mirror} (cached in {debs})")
    _run([which("debootstrap") or "debootstrap", "--download-only", "--arch=arm64", "--variant=minbase",
          "--include=" + ",".join(DEB_INCLUDE), f"--cache-dir={debs}", SUITE, str(root), mirror],
         "debootstrap --download-only")
    debpaths = [line.split(maxsplit=1)[1] for line in (root / "debootstrap/debpaths").read_text().splitlines() if line.strip()]

    # 2. unpack them over merged-/usr symlinks
    say(f"unpacking {len(debpaths)} .debs")
    for d in MERGED_USR_DIRS:
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        (root / d).symlink_to(f"usr/{d}")
    def unpack(deb: str) -> str | None:
        src = subprocess.Popen([tools["dpkg-deb"], "--fsys-tarfile", str(root / deb.lstrip("/"))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        untar = subprocess.run([tools["tar"], "-x", "--keep-directory-symlink", "-C", str(root)],
                               stdin=src.stdout, stderr=subprocess.PIPE, text=True)
        src.stdout.close()
        err = src.stderr.read().decode(errors="replace")
        if src.wait() != 0 or untar.returncode != 0:
            return f"unpacking {deb} failed: {(err + untar.stderr).strip()[-200:]}"
        return None

    # packages do not share files; GNU tar copes with directories created concurrently
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = [e for e in pool.map(unpack, debpaths) if e]
    if errors:
        raise EmulationError(f"{errors[0]}; delete {debs} and retry")
    etc = root / "etc"
    for name in ("passwd", "group"):
        if not (etc / name).is_file() or (etc / name).stat().st_size == 0:
            shutil.copyfile(root / f"usr/share/base-passwd/{name}.master", etc / name)
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)  # apt is never run inside
    # manuals and message catalogues (~45 MB) serve nobody here; the copyright files stay
    for d in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        shutil.rmtree(root / d, ignore_errors=True)
    for f in (root / "usr/share/doc").rglob("*"):
        if f.name != "copyright" and (f.is_file() or f.is_symlink()):
            f.unlink()
    for d in ("work", "proc", "dev", "sys", "tmp", "root"):
        (root / d).mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)

    # 3. aarch64 wheels
    sp = site_packages(root)
    sp.mkdir(parents=True, exist_ok=True)
    reqs = runtime_wheels(GUEST_PYTHON, "aarch64") + extra_pip
    plat = _wheel_platform_args()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    install = pip + ["install", "-q", "--no-index", "--find-links", str(wheels), "--only-binary=:all:", *plat,
                     "--no-compile", "--target", str(sp), *reqs]
    if subprocess.run(install, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        say(f"pip download (aarch64, cp{GUEST_PYTHON.replace('.', '')}) {' '.join(reqs)} -> {wheels}")
        _run(pip + ["download", "-q", "--only-binary=:all:", *plat, "-d", str(wheels), *reqs], "pip download of the aarch64 wheels")
        shutil.rmtree(sp)
        sp.mkdir(parents=True)
        say(f"pip install --target {sp}")
        _run(install, "pip install --target")
    else:
        say(f"installed the aarch64 wheels from {wheels}")
    freed = prune_tvm_runtime(sp)
    say(f"pruned TVM to its runtime (-{freed / 2**20:.0f} MB)")

    # 4. bytecode (Debian's py3compile postinst never ran); .pyc is architecture independent
    _install_qemu(root)
    targets = [str(root / f"usr/lib/python{GUEST_PYTHON}"), str(sp)]
    if "%d.%d" % sys.version_info[:2] == GUEST_PYTHON:
        say("compileall (host python)")
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", *targets],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        say("compileall (under qemu, ~1 min)")
        subprocess.run([qemu_binary(), str(root / f"usr/bin/python{GUEST_PYTHON}"), "-m", "compileall", "-q", "-j", "0",
                        "-s", str(root), "-p", "/", *targets],
                       env={"QEMU_LD_PREFIX": str(root), "PATH": "/usr/bin:/bin"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # 5. smoke test under qemu (prefix mode: needs no root)
    say("smoke test: import numpy, tvm under qemu")
    proc = subprocess.run(
        [qemu_binary(), str(root / "usr/bin/python3"), "-c",
         "import platform, numpy, tvm; assert tvm.base._RUNTIME_ONLY; print(platform.machine(), numpy.__version__, tvm.__version__)"],
        env={"QEMU_LD_PREFIX": str(root), "PATH": "/usr/bin:/bin", "TVM_USE_RUNTIME_LIB": "1", "LANG": "C.UTF-8"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if proc.returncode != 0 or not proc.stdout.startswith("aarch64"):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise EmulationError(f"the new arm64 rootfs fails its smoke test (import numpy, tvm): {tail}")
    say(f"smoke test OK: {proc.stdout.strip()}")
