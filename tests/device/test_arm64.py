"""arm64 packages, cross-compiled here and proven on an emulated device (qemu-user + Debian arm64)."""

import json
import platform
import subprocess
import zipfile

import pytest

from edgellm import api, zoo
from edgellm.errors import EdgeError
from edgellm.verify import verify
from tests.conftest import run_cli

pytestmark = [pytest.mark.arm64, pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates arm64 on an x86_64 host")]


@pytest.fixture(scope="module")
def arm_pkgs(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm64")
    cache = {}

    def get(name, target):
        if (name, target) not in cache:
            cache[name, target] = api.build(f"zoo:{name}", target, out / f"{name}-{target}.edgepkg").path
        return cache[name, target]

    return get


@pytest.mark.parametrize("target", ["arm64", "rpi4"])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_runs_on_emulated_arm64_and_matches_fp32(arm_pkgs, name, target):
    pkg = arm_pkgs(name, target)
    manifest = json.loads(zipfile.ZipFile(pkg).read("manifest.json"))
    assert manifest["target"]["arch"] == "aarch64"
    assert manifest["verification"]["status"] == "skipped"  # not runnable here: verify does it
    result = verify(pkg)
    assert result["passed"], result
    assert result["emulated"] and not result["illegal_instruction"]
    assert result["rel_max_abs"] <= 1e-4


def test_module_is_an_aarch64_shared_object(arm_pkgs, tmp_path):
    so = tmp_path / "model.so"
    so.write_bytes(zipfile.ZipFile(arm_pkgs("kws-cnn", "rpi4")).read("model.so"))
    assert "ARM aarch64" in subprocess.run(["file", "-b", str(so)], capture_output=True, text=True).stdout


def test_package_for_a_dotprod_core_is_refused_on_a_cortex_a72(arm_pkgs):
    """rpi5 code may use int8 dot products; the emulated Pi 4 core lacks them: caught before any code runs."""
    result = verify(arm_pkgs("kws-cnn", "rpi5"), qemu_cpu="cortex-a72")
    assert not result["passed"]
    assert "needs CPU features this CPU lacks: asimddp" in result["problem"]
    assert verify(arm_pkgs("kws-cnn", "rpi5"))["passed"]  # on its own core (cortex-a76) it runs


def test_verify_cli_reports_and_exits_nonzero_on_failure(arm_pkgs):
    proc = run_cli("verify", str(arm_pkgs("kws-cnn", "rpi5")), "--qemu-cpu", "cortex-a72")
    assert proc.returncode == 1 and "FAIL rpi5" in proc.stdout and "asimddp" in proc.stdout
    proc = run_cli("verify", str(arm_pkgs("kws-cnn", "rpi4")), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["passed"]


def test_arm64_package_is_refused_on_this_x86_machine(arm_pkgs):
    from edgellm import runtime

    with pytest.raises(EdgeError, match="package is for aarch64 .* this machine is x86_64"):
        runtime.load(arm_pkgs("kws-cnn", "rpi4"))


SVE_BOX = """name = "sve-box"
description = "a board whose target file asks for SVE but does not list it among the core's features"
arch = "aarch64"
qemu_cpu = "cortex-a72"
backends = ["tvm"]
has = ["fp", "asimd"]
[tvm]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mattr = ["+neon", "+sve"]
"""


def test_instruction_the_core_lacks_is_caught_as_sigill(tmp_path):
    """LLVM vectorizes the stock pipeline's loops with SVE; a Cortex-A72 has none: verify names the SIGILL."""
    target = tmp_path / "sve-box.toml"
    target.write_text(SVE_BOX)
    pkg = api.build("zoo:kws-cnn", str(target), tmp_path / "kws-sve.edgepkg", pipeline="stock").path
    result = verify(pkg)
    assert not result["passed"] and result["illegal_instruction"]
    assert "instruction the cortex-a72 lacks (SIGILL)" in result["problem"] and "+sve" in result["problem"]


def test_runtime_bundle_is_small_and_runs_a_package(arm_pkgs, tmp_path):
    """The files a device needs: edgellm's runtime + pruned TVM runtime wheels, under a size budget."""
    from edgellm import emulate
    from edgellm.bundle import bundle_runtime

    result = bundle_runtime("aarch64", tmp_path / "rt")
    assert result["size_bytes"] < 75e6, result  # budget: numpy + its OpenBLAS (~56 MB) + TVM runtime (~10 MB) + edgellm runtime
    tvm_part = sum(p.stat().st_size for d in ("tvm", "tvm_ffi") for p in (tmp_path / "rt" / d).rglob("*") if p.is_file())
    assert tvm_part < 12e6, tvm_part
    assert not list((tmp_path / "rt").rglob("libtvm_compiler.so"))
    # the bundle alone (not the rootfs's own site-packages) runs a package on the emulated Pi
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "rt").rename(work / "rt")
    (work / "pkg.edgepkg").write_bytes(arm_pkgs("kws-cnn", "rpi4").read_bytes())
    (work / "go.py").write_text("import sys; sys.path.insert(0, 'rt'); import runpy; sys.argv[0] = 'x'; runpy.run_module('edgellm.runtime', run_name='__main__')\n")
    proc = emulate.run_python(emulate.prepare_rootfs(), work, "go.py", ["check", "pkg.edgepkg", "--json"], qemu_cpu="cortex-a72")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"]


def test_rpi5_fp16_package_keeps_its_contract_on_the_emulated_cortex_a76(tmp_path):
    """--precision fp16 on a +fullfp16 core: half-precision arithmetic in the code (NEON .4h / .8h ops), fp32 in and out,
    and the package meets its stored contract (cosine >= 0.999, top-1) on the emulated device; tightened past what
    it meets, the same package fails verify."""
    import re

    pkg = api.build("zoo:kws-cnn", "rpi5", tmp_path / "kws-fp16.edgepkg", precision="fp16").path
    manifest = json.loads(zipfile.ZipFile(pkg).read("manifest.json"))
    assert manifest["precision"]["contract"] == {"tolerance": 1e-2, "min_cosine": 0.999, "min_top1": 1.0, "top1_outputs": ["logits"]}
    assert manifest["backend"]["precision"]["compute"] == "fp16"
    so = tmp_path / "model.so"
    so.write_bytes(zipfile.ZipFile(pkg).read("model.so"))
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(so)], capture_output=True, text=True).stdout
    assert re.search(r"\bf(add|mul|max|maxnm|mla)\s+v\d+\.[48]h", asm), "no fp16 vector arithmetic in the code"
    result = verify(pkg)
    assert result["passed"] and not result["illegal_instruction"], result
    assert result["cosine_min"] >= 0.999 and result["rel_max_abs"] <= 1e-2
    assert result["rel_max_abs"] > 0  # it did compute in half precision (fp32 code matches to ~1e-7)
    tight = tmp_path / "tight.edgepkg"
    with zipfile.ZipFile(pkg) as z, zipfile.ZipFile(tight, "w", zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            data = z.read(name)
            if name == "manifest.json":
                m = json.loads(data)
                m["precision"]["contract"]["tolerance"] = result["rel_max_abs"] / 10
                data = json.dumps(m).encode()
            out.writestr(name, data)
    failed = verify(tight)
    assert not failed["passed"] and "of the output scale > tolerance" in failed["problem"]
