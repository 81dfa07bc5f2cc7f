"""The laptop side of the fleet: the tracker, the devices it pools, and packages profiled on them.

Everything goes through TVM's own RPC client (``tvm.rpc.connect_tracker``): a session is requested for a key,
the package is uploaded into the session's folder on the device, and the agent's functions
(edgellm/fleet/agent.py) run it there with edgellm's runtime.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.fleet.agent import CHECK, INFO, PROFILE, parse_address

REMOTE_NAME = "package.edgepkg"


class DeviceError(EdgeError):
    """A device of the fleet failed: it disconnected, timed out, is busy, or cannot run the package."""


@dataclass(frozen=True)
class Remote:
    """``HOST:PORT/KEY``: a tracker and the device type to use from its pool."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> "Remote":
        addr, sep, key = text.partition("/")
        if not sep or not key:
            raise EdgeError(f"{text!r} is not HOST:PORT/KEY", "e.g. --remote 127.0.0.1:9190/rpi4")
        host, port = parse_address(addr)
        return cls(host, port, key)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.key}"


def _tracker(host: str, port: int):
    import socket

    from tvm import rpc

    try:  # TVM's client retries for a minute, logging each try: ask once, quietly, first
        socket.create_connection((host, port), timeout=5).close()
        return rpc.connect_tracker(host, port)
    except Exception as e:  # OSError, or TVM's RuntimeError / TVMError
        raise EdgeError(f"no RPC tracker answers at {host}:{port} ({str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__})",
                        "start one with `edgellm tracker` or check --tracker") from None


def start_tracker(host: str = "127.0.0.1", port: int = 9190, port_end: int = 9199):
    """TVM's tracker, in a worker process of its own; ``.port`` is where it listens, ``.terminate()`` stops it."""
    try:
        import tornado  # noqa: F401  (TVM's tracker runs on tornado's event loop)
    except ImportError:
        raise EdgeError("TVM's RPC tracker needs tornado", "pip install tornado") from None
    from tvm.rpc.tracker import Tracker

    try:
        return Tracker(host, port=port, port_end=max(port + 1, port_end), silent=True)
    except Exception as e:
        raise EdgeError(f"cannot start a tracker on {host}:{port} ({str(e).splitlines()[-1][:200]})",
                        "pick another --port, or stop the tracker already there") from None


def devices(host: str, port: int) -> dict:
    """Keys, how many devices each, free or busy, and where each device is, from the tracker's own summary."""
    summary = _tracker(host, port).summary()
    keys: dict[str, dict] = {}
    for key, queue in summary.get("queue_info", {}).items():
        keys[key] = {"free": int(queue.get("free", 0)), "pending": int(queue.get("pending", 0)), "devices": []}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).removeprefix("server:")
        addr = server.get("addr") or ["?", 0]
        keys.setdefault(key, {"free": 0, "pending": 0, "devices": []})["devices"].append(f"{addr[0]}:{addr[1]}")
    for entry in keys.values():
        entry["total"] = len(entry["devices"])
        entry["busy"] = max(0, entry["total"] - entry["free"])
    return {"tracker": f"{host}:{port}", "keys": keys}


def key_pool(remote: Remote) -> dict:
    """The tracker's entry for ``remote.key`` (total / free / busy devices), or a DeviceError naming the keys there are."""
    keys = devices(remote.host, remote.port)["keys"]
    pool = keys.get(remote.key)
    if not pool or not pool["total"]:
        raise DeviceError(f"no device is registered under key {remote.key!r} at {remote.host}:{remote.port} (keys: {', '.join(sorted(keys)) or 'none'})",
                          "start one with `edgellm agent --tracker HOST:PORT --key NAME`")
    return pool


def _request(tracker, remote: Remote, timeout: float, session_timeout: float):
    """A session on one free device of the key, or a DeviceError when none frees up within ``timeout``."""
    box: dict = {}

    def ask():
        try:
            box["session"] = tracker.request(remote.key, priority=1, session_timeout=session_timeout)
        except Exception as e:  # noqa: BLE001  (reported below)
            box["error"] = e

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    if "session" in box:
        return box["session"]
    if "error" in box:
        raise DeviceError(f"the tracker could not give a device of key {remote.key!r} ({str(box['error']).splitlines()[-1][:200]})")
    raise DeviceError(f"no device of key {remote.key!r} was free within {timeout:g} s (all busy)", "try again when one is free")


def _call(session, fn: str, *args) -> dict:
    result = json.loads(session.get_function(fn)(*args))
    if isinstance(result, dict) and "error" in result:
        raise DeviceError(result["error"])
    return result


def _on_device(session, package: Path, manifest: dict, command: str, options: dict) -> dict:
    from edgellm.runtime.package import check_device

    device = _call(session, INFO)
    where = f"{device['hostname']} (pid {device['pid']}, {device['machine']})"
    try:
        check_device(manifest, set(device["cpu_flags"]), machine=device["machine"])  # as locally, before anything runs there
    except EdgeError as e:
        raise DeviceError(f"{where}: {e.problem}", e.fix) from None
    session.upload(str(package), REMOTE_NAME)
    try:
        report = _call(session, PROFILE if command == "profile" else CHECK, REMOTE_NAME, json.dumps(options))
    except DeviceError as e:
        raise DeviceError(f"{where}: {e.problem}", e.fix) from None
    return {**report, "device": device}


def run_remote(package: str | Path, remote: Remote, command: str = "profile", options: dict | None = None, every: bool = False,
               wait: float = 60.0, session_timeout: float = 600.0) -> list[dict]:
    """Run ``command`` (profile / check) on one device of the key, or on each (``every``): one result per device,
    ``{"device": ..., ...}`` or ``{"device": ..., "error": line}`` for a device that failed."""
    from edgellm.runtime.package import read_manifest

    package = Path(package)
    manifest = read_manifest(package)
    pool = key_pool(remote)  # an unknown key fails here, at once, instead of waiting for a device
    count = pool["total"] if every else 1
    tracker = _tracker(remote.host, remote.port)
    # hold every session before running anything, so the tracker hands out each device once
    sessions = []
    for _ in range(count):
        try:
            sessions.append(_request(tracker, remote, wait, session_timeout))
        except DeviceError:
            if not sessions:
                raise
            break
    options = options or {}

    def one(session) -> dict:
        try:
            return _on_device(session, package, manifest, command, options)
        except DeviceError as e:
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001  the connection died under us: the device was unplugged or killed
            return {"error": f"the device disconnected during {command} ({str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__})"}

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(sessions)) as ex:
        results = list(ex.map(one, sessions))
    for result in results:
        result["remote"] = str(remote)
    return results
