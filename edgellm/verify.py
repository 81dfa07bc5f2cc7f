"""Prove a package on (an emulated copy of) its device before anyone flashes it.

The package and edgellm's runtime alone are copied into a scratch folder; the device's Python
runs ``python -m edgellm.runtime check`` there: the stored sample input, compared with the fp32
reference outputs stored beside it. For an arm64 package on an x86_64 host the device is a
Debian arm64 userland under qemu-user, with QEMU_CPU set to the target's core, so an instruction
the core lacks dies with SIGILL here instead of on the device. Emulated timings are not device
speed; this checks correctness and the instruction set only.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgellm.bundle import copy_runtime_sources
from edgellm.errors import EdgeError
from edgellm.runtime.package import read_manifest

CONTRACT_KEYS = ("tolerance", "min_cosine", "small_scale_min_cosine", "min_top1", "top1_outputs")
LAUNCHER = "import runpy, sys\nsys.argv[0] = 'edgellm.runtime'\nrunpy.run_module('edgellm.runtime', run_name='__main__')\n"


def _emulated(arch: str) -> bool:
    host = platform.machine()
    if arch == host:
        return False
    if arch == "aarch64" and host == "x86_64":
        return True
    raise EdgeError(f"cannot verify a {arch} package on this {host} machine", "run `python3 -m edgellm.runtime check` on the device")


def verify(path: str | Path, tolerance: float | None = None, qemu_cpu: str | None = None, progress=None) -> dict:
    """Run the package's reference sample where its device is (or is emulated); pass/fail with the error."""
    path = Path(path)
    manifest = read_manifest(path)
    target = manifest["target"]
    emulated = _emulated(target["arch"])
    cpu = qemu_cpu or target.get("qemu_cpu") or None
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="edgellm-verify-") as tmp:
        work = Path(tmp)
        shutil.copy2(path, work / "package.edgepkg")
        copy_runtime_sources(work / "rt")
        (work / "check.py").write_text(LAUNCHER)
        args = ["check", "package.edgepkg", "--json", *(["--tolerance", str(tolerance)] if tolerance is not None else [])]
        t0 = time.perf_counter()
        if emulated:
            from edgellm import emulate

            try:
                emulate.ensure_host_tools()  # EmulationError is an EdgeError: one line with the apt fix
                say("preparing the emulated arm64 userland (cached after the first time)")
                rootfs = emulate.prepare_rootfs(progress=say)
                say(f"running the reference sample under qemu-user as {cpu or 'max'}")
                t0 = time.perf_counter()
                proc = emulate.run_python(rootfs, work, "check.py", args, qemu_cpu=cpu, env={"PYTHONPATH": "rt"})
            except subprocess.TimeoutExpired:
                raise EdgeError(f"the emulated run did not finish in time ({cpu})", "a big model under qemu is slow; try again or check the package on the device") from None
            illegal = emulate.illegal_instruction(proc)
        else:
            say("running the reference sample with this machine's Python")
            proc = subprocess.run([sys.executable, "check.py", *args], cwd=work, capture_output=True, text=True,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "rt"})
            illegal = proc.returncode in (-4, 132)
        seconds = time.perf_counter() - t0
    result = {"package": str(path), "target": target["name"], "arch": target["arch"], "emulated": emulated,
              "qemu_cpu": cpu if emulated else None, "seconds": seconds, "illegal_instruction": illegal, "tolerance": tolerance}
    if illegal:
        return {**result, "passed": False,
                "problem": f"the package executes an instruction the {cpu or target.get('cpu') or 'CPU'} lacks (SIGILL): "
                           f"it was built with {target['tvm'].get('mattr')} for {target['name']}; build for the device's own target"}
    try:
        check = json.loads(proc.stdout)
    except ValueError:
        lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        return {**result, "passed": False, "problem": f"the runtime failed on the device (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"}
    result["tolerance"] = check["tolerance"]
    problem = None
    if not check["passed"]:  # the runtime names it (edgellm.runtime.accuracy.meets); an older runtime does not
        problem = check.get("problem") or (f"error {check['rel_max_abs']:.3g} of the output scale > tolerance {check['tolerance']:g}"
                                           if check["rel_max_abs"] > check["tolerance"] else f"cosine {check['cosine_min']:.5f} < {check.get('min_cosine')}")
    if "tokens_equal" in check and not check["tokens_equal"]:  # a language model: its greedy tokens on the reference prompt
        problem = f"greedy tokens differ from the reference from token {check['tokens_agree_first']} on"
    return {**result, "passed": bool(check["passed"]), "max_abs": check["max_abs"], "rel_max_abs": check["rel_max_abs"],
            "cosine_min": check["cosine_min"], "problem": problem, "contract": {k: check[k] for k in CONTRACT_KEYS if k in check}, **({"tokens": check["tokens"]} if "tokens" in check else {})}
