"""The runtime stands alone: in a process where torch, onnx, click, rich and TVM's compiler cannot be
imported, it loads a package, runs it, profiles it, and the compiler library is never mapped."""

import json
import subprocess
import sys

from tests.conftest import ROOT, import_blocker

SCRIPT = import_blocker("torch", "onnx", "onnxruntime", "click", "rich", "tvm.relax", "tvm.s_tir", "tvm.script.parser", "edgellm.api",
                        "edgellm.backends", "edgellm.cli") + r"""
import json
import edgellm.runtime as rt
m = rt.load(sys.argv[1], threads=1)
check = m.check_reference()
report = m.profile(runs=3, warmup=1, per_op=True)
maps = open("/proc/self/maps").read()
print(json.dumps({"error": check["rel_max_abs"], "p50": report["latency_ms"]["p50"],
                  "compiler_mapped": "libtvm_compiler" in maps, "runtime_mapped": "libtvm_runtime" in maps,
                  "heavy": sorted({k.split(".")[0] for k in sys.modules} & {"torch", "onnx", "click", "rich"})}))
"""


def test_runtime_runs_without_the_compiler_side(kws_pkg):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(kws_pkg)], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] <= 1e-4
    assert result["runtime_mapped"] and not result["compiler_mapped"]
    assert result["heavy"] == []


def test_device_command_line(kws_pkg):
    """`python -m edgellm.runtime` works with the runtime alone (argparse, not click)."""
    proc = subprocess.run([sys.executable, "-m", "edgellm.runtime", "check", str(kws_pkg), "--json"], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True
