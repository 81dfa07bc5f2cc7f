import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgellm import targets
from edgellm.errors import EdgeError


def test_every_bundled_target_is_valid():
    known = targets.all_targets()
    assert {"x86_64", "x86_64-avx512"} <= set(known)
    for name, t in known.items():
        assert t.name == name
        assert t.arch in targets.ARCHES
        assert t.backends, name
        assert not set(t.has) & set(t.lacks), name
        assert t.tvm["kind"] in ("llvm", "cuda"), name


def test_bundled_tvm_targets_are_accepted_by_tvm():
    tvm = pytest.importorskip("tvm")
    for t in targets.all_targets().values():
        parsed = tvm.target.Target(t.tvm)
        assert parsed.kind.name == t.tvm["kind"]


def test_host_is_a_target_this_cpu_runs():
    from edgellm.runtime.device import cpu_flags

    host = targets.resolve("host")
    assert set(host.has) <= cpu_flags()


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(EdgeError) as e:
        targets.resolve("raspberry-pi-9")
    assert "unknown target 'raspberry-pi-9'" in str(e.value)
    assert "x86_64-avx512" in str(e.value)


def test_target_from_file_and_inline_json(tmp_path):
    data = targets.resolve("x86_64").to_dict() | {"name": "mybox"}
    inline = targets.resolve(json.dumps(data))
    assert inline.name == "mybox"
    path = tmp_path / "mybox.toml"
    path.write_text('name = "mybox"\ndescription = "d"\narch = "x86_64"\nbackends = ["tvm"]\n[tvm]\nkind = "llvm"\n')
    assert targets.resolve(str(path)).tvm == {"kind": "llvm"}


@pytest.mark.parametrize("text, message", [
    ('name = "x"\narch = "x86_64"\n', "missing keys"),
    ('name = "x"\ndescription = "d"\narch = "riscv"\nbackends = ["tvm"]\ntvm = {kind = "llvm"}\n', "arch must be one of"),
    ('name = "x"\ndescription = "d"\narch = "x86_64"\nbackends = ["tvm"]\ntvm = {kind = "llvm"}\ncolour = 1\n', "unknown keys"),
    ('name = "x"\ndescription = "d"\narch = "x86_64"\nbackends = ["tvm"]\ntvm = {kind = "llvm"}\nhas = ["a"]\nlacks = ["a"]\n', "both has and lacks"),
    ("name = = broken", "cannot read target file"),
])
def test_bad_target_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(EdgeError, match=message):
        targets.resolve(str(path))


MYBOX = 'name = "{name}"\ndescription = "my own box"\narch = "x86_64"\nbackends = ["tvm"]\n[tvm]\nkind = "llvm"\n'


def test_edgellm_targets_folders_add_and_replace_targets_and_say_where_from(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "mybox.toml").write_text(MYBOX.format(name="mybox"))
    (second / "mybox.toml").write_text(MYBOX.format(name="mybox").replace("my own box", "shadowed"))
    (second / "x86_64.toml").write_text(MYBOX.format(name="x86_64"))
    monkeypatch.setenv("EDGELLM_TARGETS", os.pathsep.join([str(first), str(second)]))
    found = targets.found()
    assert found["mybox"][1] == f"EDGELLM_TARGETS:{first}" and found["mybox"][0].description == "my own box"  # first folder wins
    assert found["x86_64"][1] == f"EDGELLM_TARGETS:{second}"  # a user's file replaces the bundled one of that name
    assert found["arm64"][1] == "bundled"
    assert targets.resolve("mybox").description == "my own box"
    assert targets.host().name in ("x86_64", "x86_64-avx512", "x86_64-avx512-bf16", "x86_64-amx", "arm64", "rpi4", "rpi5", "jetson-orin-cpu")
    assert targets.host().to_dict() == targets._scan(targets.bundled_dir())[targets.host().name].to_dict()  # never a user file


def test_bad_edgellm_targets_folder_and_misnamed_file_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_TARGETS", str(tmp_path / "missing"))
    with pytest.raises(EdgeError, match="EDGELLM_TARGETS names .*missing, which is not a folder"):
        targets.all_targets()
    (tmp_path / "box.toml").write_text(MYBOX.format(name="other"))
    monkeypatch.setenv("EDGELLM_TARGETS", str(tmp_path))
    with pytest.raises(EdgeError, match="names itself 'other'"):
        targets.resolve("box")


def test_bundled_targets_are_the_top_level_folder_and_none_are_inside_the_package():
    root = Path(__file__).resolve().parents[2]
    assert targets.bundled_dir() == root / "targets"
    assert sorted(p.stem for p in (root / "targets").glob("*.toml")) == sorted(targets._scan(root / "targets"))
    assert not list((root / "edgellm").rglob("*.toml"))


@pytest.mark.slow
def test_the_wheel_ships_the_targets_and_the_installed_package_finds_them(tmp_path):
    """pyproject + setup.py put targets/*.toml into the wheel as edgellm/_targets (an unpacked wheel is an install)."""
    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    for name in ("edgellm", "targets"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(root / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("edgellm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    shipped = sorted(Path(n).stem for n in names if n.startswith("edgellm/_targets/") and n.endswith(".toml"))
    assert shipped == sorted(p.stem for p in (root / "targets").glob("*.toml"))
    out = subprocess.run([sys.executable, "-c", "import json, edgellm.targets as t; print(json.dumps([str(t.bundled_dir()), sorted(t.all_targets())]))"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, check=True)
    where, names = json.loads(out.stdout)
    assert where == str(tmp_path / "site" / "edgellm" / "_targets") and names == shipped


@pytest.mark.parametrize("extra, expected", [
    ((), "x86_64"),
    (("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"), "x86_64-avx512"),
    (("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"), "x86_64-avx512-bf16"),  # Zen 4
    (("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
      "amx_int8"), "x86_64-amx"),
])
def test_host_reads_the_bf16_and_amx_flags(monkeypatch, extra, expected):
    """host picks x86_64-amx only on a CPU whose /proc/cpuinfo flags list AMX and AVX512-BF16, x86_64-avx512-bf16 on
    one with AVX512-BF16 and no AMX (Zen 4)."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(targets, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma", "f16c", *extra})
    assert targets.host().name == expected
