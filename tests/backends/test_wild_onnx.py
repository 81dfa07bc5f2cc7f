"""What real exported ONNX files need (issue 13): one-line failures, `auto` falling back, quiet third parties."""

import json
import os

from edgellm.build_log import BuildLog
from tests.conftest import run_cli
from tests.wild import tiny


def assert_one_line_error(proc, text):
    """Exit 2, no traceback, and one `error:` line (after the progress lines of the stages that passed)."""
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not proc.stdout.strip()


def test_an_op_tvm_lacks_fails_in_one_line_and_auto_falls_back(tmp_path):
    model = tiny.tvm_lacks(tmp_path / "celu.onnx")
    out = tmp_path / "celu.edgepkg"
    proc = run_cli("build", str(model), "--backend", "tvm", "-o", str(out))
    assert_one_line_error(proc, "Celu")
    assert "Error converting operator" not in proc.stdout + proc.stderr  # TVM's own print went to the log
    assert not out.exists()

    proc = run_cli("build", str(model), "--backend", "auto", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["backend"]["name"] == "openvino" and manifest["verification"]["status"] == "passed"
    failed = {t["backend"]: t for t in manifest["backend_choice"]["trials"]}["tvm"]
    assert failed["status"] == "failed" and "Celu" in failed["error"]


def test_third_party_output_goes_to_the_log_not_the_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    log = BuildLog()
    with log.captured():
        os.system("echo from-a-child-process; echo on-stderr >&2")  # what C++ code writes: straight to fd 1 / 2
        err = log.failure("compile", "tvm", RuntimeError("CodeGenVM failed\nOffending call:\n  R.nn.conv2d_transpose(x, w)"))
    out = capfd.readouterr()
    assert "from-a-child-process" not in out.out and "on-stderr" not in out.err
    assert "from-a-child-process" in log.text() and "RuntimeError" in log.text()
    assert "Relax op nn.conv2d_transpose" in err.problem and "--backend openvino" in err.fix and str(log.path) in err.fix
    log.finish()
    assert log.path.exists()  # named in the error: kept


def test_progress_lines_are_not_wrapped_when_not_a_terminal(tmp_path):
    deep = tmp_path / ("a-long-folder-name-" * 5)
    deep.mkdir()
    out = deep / "celu-with-a-long-name.edgepkg"
    proc = run_cli("build", str(tiny.tvm_lacks(tmp_path / "celu.onnx")), "--backend", "openvino", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert any(str(out) in line for line in proc.stderr.splitlines()), proc.stderr


def test_shape_arithmetic_folds_once_the_input_shape_is_fixed(tmp_path):
    model = tiny.shape_arithmetic(tmp_path / "flatten.onnx")
    proc = run_cli("build", str(model), "--backend", "tvm", "-o", str(tmp_path / "x.edgepkg"))
    assert_one_line_error(proc, "--input-shape x=Nx3xHxW")  # the dynamic dims named, with the option that fixes them

    out = tmp_path / "flatten.edgepkg"
    proc = run_cli("build", str(model), "--backend", "tvm", "--input-shape", "x=2x3x8x8", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["outputs"][0]["shape"] == [2, 256] and manifest["verification"]["status"] == "passed"
