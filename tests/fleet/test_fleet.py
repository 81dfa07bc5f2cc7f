"""A fleet on loopback: TVM's tracker, an x86 agent (runtime only: the compiler side cannot be imported in it) and
an emulated rpi4 agent (the Debian arm64 userland under qemu-user), reached the way a laptop reaches boards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from edgellm.errors import EdgeError
from edgellm.fleet import launch, remote
from tests.conftest import ROOT, import_blocker, run_cli

PURE_AGENT = import_blocker("torch", "onnx", "onnxruntime", "click", "rich", "tvm.relax", "tvm.s_tir", "tvm.script.parser",
                            "edgellm.api", "edgellm.backends", "edgellm.cli") + (
    "import runpy\nsys.argv[0] = 'edgellm.fleet.agent'\nrunpy.run_module('edgellm.fleet.agent', run_name='__main__')\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_free(port: int, key: str, count: int = 1, timeout: float = 60) -> dict:
    """The tracker's view once ``count`` devices of ``key`` are free (an agent registers a moment after it listens)."""
    deadline = time.time() + timeout
    while True:
        keys = remote.devices("127.0.0.1", port)["keys"]
        if keys.get(key, {}).get("free", 0) >= count or time.time() > deadline:
            return keys
        time.sleep(0.5)


def _pure_agent(port: int, key: str) -> launch.Agent:
    proc = subprocess.Popen([sys.executable, "-c", PURE_AGENT, "--tracker", f"127.0.0.1:{port}", "--key", key, "--host", "127.0.0.1",
                             "--port", str(_free_port())], cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return launch.Agent(proc, None)


@pytest.fixture(scope="module")
def tracker():
    t = remote.start_tracker("127.0.0.1", _free_port())
    yield t.port
    t.terminate()


@pytest.fixture(scope="module")
def x86_agent(tracker):
    agent = _pure_agent(tracker, "x86")
    _wait_free(tracker, "x86")
    yield agent
    agent.stop()


def test_profile_remote_returns_the_local_schema_from_a_runtime_only_agent(tracker, x86_agent, kws_pkg):
    out = run_cli("profile", str(kws_pkg), "--remote", f"127.0.0.1:{tracker}/x86", "--runs", "20", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["schema"] == "edgellm.profile/1" and report["runs"] == 20
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["device"]["pid"] == x86_agent.proc.pid  # it ran in the agent, not here
    maps = open(f"/proc/{x86_agent.proc.pid}/maps").read()
    assert "libtvm_runtime" in maps and "libtvm_compiler" not in maps and "libtorch" not in maps


def test_devices_lists_keys(tracker, x86_agent):
    out = run_cli("devices", "--tracker", f"127.0.0.1:{tracker}", "--json")
    assert out.returncode == 0, out.stderr
    keys = json.loads(out.stdout)["keys"]
    assert keys["x86"]["total"] == 1 and keys["x86"]["free"] == 1 and keys["x86"]["busy"] == 0


def test_profile_all_reports_every_device_of_a_key(tracker, kws_pkg):
    pair = [_pure_agent(tracker, "pair") for _ in range(2)]
    try:
        _wait_free(tracker, "pair", count=2)
        out = run_cli("profile", str(kws_pkg), "--remote", f"127.0.0.1:{tracker}/pair", "--all", "--runs", "10", "--json")
        assert out.returncode == 0, out.stderr
        reports = json.loads(out.stdout)
        assert sorted(r["device"]["pid"] for r in reports) == sorted(a.proc.pid for a in pair)
        assert all(r["schema"] == "edgellm.profile/1" and r["latency_ms"]["p50"] > 0 for r in reports)
    finally:
        for a in pair:
            a.stop()


def test_fleet_mistakes_are_one_line(tracker, x86_agent, kws_pkg):
    unknown = run_cli("profile", str(kws_pkg), "--remote", f"127.0.0.1:{tracker}/jetson")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "no device is registered under key 'jetson'" in unknown.stderr and "x86" in unknown.stderr
    no_tracker = run_cli("devices", "--tracker", f"127.0.0.1:{_free_port()}")
    assert no_tracker.returncode == 2 and no_tracker.stderr.startswith("error: no RPC tracker answers")
    bad = run_cli("profile", str(kws_pkg), "--remote", "127.0.0.1:9190")
    assert bad.returncode == 2 and "HOST:PORT/KEY" in bad.stderr


def test_a_busy_key_times_out_in_one_line(tracker, x86_agent, kws_pkg):
    from tvm import rpc

    held = rpc.connect_tracker("127.0.0.1", tracker).request("x86")  # someone else holds the only x86 device
    try:
        with pytest.raises(EdgeError, match="no device of key 'x86' was free within 2 s"):
            remote.run_remote(kws_pkg, remote.Remote("127.0.0.1", tracker, "x86"), wait=2)
    finally:
        del held
    _wait_free(tracker, "x86")


def test_killing_an_agent_mid_run_is_one_line(tracker, kws_pkg):
    import psutil

    agent = _pure_agent(tracker, "doomed")
    _wait_free(tracker, "doomed")
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=remote.run_remote(kws_pkg, remote.Remote("127.0.0.1", tracker, "doomed"),
                                                                               options={"runs": 10 ** 7, "warmup": 0})))
    worker.start()
    parent = psutil.Process(agent.proc.pid)
    deadline = time.time() + 60
    while not parent.children() and time.time() < deadline:  # the session is a forked child of the agent
        time.sleep(0.2)
    time.sleep(1.0)
    for p in parent.children(recursive=True) + [parent]:  # pull the plug: the device and its session vanish
        p.kill()
    worker.join(60)
    agent.stop()
    [result] = box["out"]
    assert result["error"].startswith("the device disconnected during profile")
    assert "\n" not in result["error"]


@pytest.mark.arm64
@pytest.mark.slow
def test_emulated_rpi4_agent_beside_x86(tracker, x86_agent, packages, kws_pkg):
    """The same tracker pools an x86 agent and an emulated Cortex-A72; each profiles the package built for it, and a
    package for the other machine is refused before anything runs there."""
    rpi4 = launch.start_agent(f"127.0.0.1:{tracker}", "rpi4", emulate="rpi4", host="127.0.0.1", port=_free_port())
    try:
        keys = _wait_free(tracker, "rpi4")
        assert {"x86", "rpi4"} <= set(keys)
        rpi4_pkg = packages("kws-cnn", "rpi4")
        [arm] = remote.run_remote(rpi4_pkg, remote.Remote("127.0.0.1", tracker, "rpi4"), options={"runs": 5, "warmup": 1})
        [x86] = remote.run_remote(kws_pkg, remote.Remote("127.0.0.1", tracker, "x86"), options={"runs": 5, "warmup": 1})
        assert arm["device"]["machine"] == "aarch64" and arm["device"]["emulated"].startswith("rpi4")
        assert x86["device"]["machine"] == "x86_64"
        assert arm["latency_ms"]["p50"] > 0 and x86["latency_ms"]["p50"] > 0
        [wrong] = remote.run_remote(kws_pkg, remote.Remote("127.0.0.1", tracker, "rpi4"))
        assert "package is for x86_64" in wrong["error"] and "aarch64" in wrong["error"]
    finally:
        rpi4.stop()


@pytest.mark.slow
def test_build_tune_remote_measures_on_the_agent(tracker, x86_agent, tmp_path):
    """MetaSchedule's RPC runner times the candidates on the agent (its session runs them: the agent's process has
    children while tuning), the database stays here, and the tuned package verifies like any other."""
    from edgellm import api

    db = tmp_path / "db"
    result = api.build("zoo:kws-cnn", "x86_64", tmp_path / "tuned.edgepkg", tune=2, tuning_db=str(db),
                       tune_remote=f"127.0.0.1:{tracker}/x86")
    tuning = result.manifest["backend"]["tuning"]
    assert tuning["trials"] == 2 and tuning["tuned"] >= 1
    assert result.manifest["verification"]["status"] == "passed"
    assert result.manifest["recipe"]["tune_remote"] == f"127.0.0.1:{tracker}/x86"
    assert any(db.rglob("*.json"))  # the records are here, not on the device


def test_tune_remote_mistakes(tracker, x86_agent, tmp_path):
    no_tune = run_cli("build", "zoo:kws-cnn", "--remote", f"127.0.0.1:{tracker}/x86", "-o", str(tmp_path / "x.edgepkg"))
    assert no_tune.returncode == 2 and "needs --tune N" in no_tune.stderr
    unknown = run_cli("build", "zoo:kws-cnn", "--tune", "2", "--remote", f"127.0.0.1:{tracker}/nope", "-o", str(tmp_path / "x.edgepkg"))
    assert unknown.returncode == 2 and "no device is registered under key 'nope'" in unknown.stderr
    assert not (tmp_path / "x.edgepkg").exists()
