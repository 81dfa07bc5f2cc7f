"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, --json twins."""

import json

import numpy as np

from tests.conftest import run_cli


def assert_one_line_error(proc, text):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_targets_json_lists_bundled_targets():
    proc = run_cli("targets", "--json")
    data = json.loads(proc.stdout)
    assert {"x86_64", "x86_64-avx512"} <= set(data["targets"]) and data["host"] in data["targets"]


def test_build_inspect_run_profile(tmp_path):
    pkg = tmp_path / "kws.edgepkg"
    proc = run_cli("build", "zoo:kws-cnn", "--target", "x86_64", "-o", str(pkg))
    assert proc.returncode == 0, proc.stderr
    for stage in ("source", "trace", "compile", "verify", "package"):
        assert stage in proc.stderr  # progress with a time per stage

    manifest = json.loads(run_cli("inspect", str(pkg), "--json").stdout)
    assert manifest["target"]["name"] == "x86_64" and manifest["package"]["size"] == pkg.stat().st_size

    x = np.random.default_rng(0).standard_normal((1, 1, 49, 40)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("run", str(pkg), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"))
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "y.npz")["logits"].shape == (1, 12)

    report = json.loads(run_cli("profile", str(pkg), "--runs", "5", "--warmup", "1", "--threads", "1", "--json", "--per-op").stdout)
    assert report["runs"] == 5 and report["device"]["threads"] == 1 and report["per_op"]
    human = run_cli("profile", str(pkg), "--runs", "5").stdout
    assert "p50" in human and "p99" in human

    proc = run_cli("run", str(pkg), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "nodir" / "y.npz"))
    assert_one_line_error(proc, "cannot write")


def test_user_mistakes_are_one_line(tmp_path):
    assert_one_line_error(run_cli("build", "zoo:kws-cnn", "--target", "pi9", "-o", str(tmp_path / "a.edgepkg")), "unknown target 'pi9'")
    assert_one_line_error(run_cli("build", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "a.edgepkg")), "does not exist")
    assert_one_line_error(run_cli("build", "zoo:kws-cnn", "-o", str(tmp_path / "no" / "a.edgepkg")), "folder")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "none.edgepkg")), "does not exist")
    (tmp_path / "junk.edgepkg").write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(run_cli("profile", str(tmp_path / "junk.edgepkg")), "not a readable .edgepkg")
    assert not (tmp_path / "a.edgepkg").exists()
