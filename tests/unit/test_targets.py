import json

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
