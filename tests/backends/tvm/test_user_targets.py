"""A user's own target file, in a folder named by EDGELLM_TARGETS, builds a package that verifies."""

import json

from edgellm import api, targets
from edgellm.verify import verify
from tests.conftest import run_cli


def test_a_users_target_file_builds_and_verifies(tmp_path, monkeypatch):
    mine = tmp_path / "my-targets"
    mine.mkdir()
    host = targets.host()
    box = host.to_dict() | {"name": "my-box", "description": "my own x86 box (a copy of the host target)", "backends": ["tvm"]}
    lines = [f"{k} = {json.dumps(v)}" for k, v in box.items() if k != "tvm"]
    (mine / "my-box.toml").write_text("\n".join(lines) + "\n[tvm]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in box["tvm"].items()))
    monkeypatch.setenv("EDGELLM_TARGETS", str(mine))

    listed = json.loads(run_cli("targets", "--json").stdout)
    assert listed["targets"]["my-box"]["origin"] == f"EDGELLM_TARGETS:{mine}"
    assert listed["targets"]["x86_64"]["origin"] == "bundled"

    result = api.build("zoo:kws-cnn", "my-box", tmp_path / "kws.edgepkg")
    assert result.manifest["target"]["name"] == "my-box" and result.manifest["verification"]["status"] == "passed"
    report = verify(result.path)
    assert report["passed"], report
