"""A build whose process dies inside native code still ends in one error line, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CRASHING_SOURCE = '''
import ctypes
import torch


def model():
    ctypes.string_at(0)  # a real SIGSEGV in native code, as one inside TVM or OpenVINO would be
    return torch.nn.Linear(4, 4), (torch.randn(1, 4),)
'''


def test_segfault_in_a_stage_is_one_error_line(tmp_path):
    (tmp_path / "crash.py").write_text(CRASHING_SOURCE)
    env = {**os.environ, "EDGELLM_CACHE": str(tmp_path / "cache")}
    env.pop("EDGELLM_NO_FORK", None)
    run = subprocess.run([sys.executable, "-m", "edgellm", "build", "crash.py:model", "-o", "out.edgepkg"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert "stage source crashed (SIGSEGV)" in errors[0]
    assert "Traceback" not in run.stderr and "Fatal Python error" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "crash.py"]  # no package, no half-written file
    log = Path(re.search(r"the Python stack at the crash is in (\S+)", errors[0]).group(1))
    assert "Segmentation fault" in log.read_text() and "crash.py" in log.read_text()
