"""The device side of the fleet: TVM's RPC server, registered with a tracker, that runs edgellm's runtime.

Runs with the runtime's dependencies only (numpy + TVM's runtime library; no compiler, no click):
``python -m edgellm.fleet.agent --tracker HOST:PORT --key rpi4``. TVM's server forks a process per session,
receives files into the session's folder (``tvm.rpc.server.upload``) and calls the functions registered here;
each returns JSON, so a failure on the device comes back as a message, not as a lost connection.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback

from edgellm import __version__
from edgellm.errors import EdgeError

INFO, PROFILE, CHECK = "edgellm.agent.info", "edgellm.agent.profile", "edgellm.agent.check"
_AGENT_PID = os.getpid()  # sessions are forked children: the agent's own pid names the device's process


def info() -> dict:
    """Who this device is: enough for the client to check a package against it before sending anything."""
    from edgellm.runtime import device

    return {"hostname": socket.gethostname(), "pid": _AGENT_PID, "session_pid": os.getpid(), **device.describe(), "cpu_flags": sorted(device.cpu_flags()),
            "edgellm": __version__, "emulated": os.environ.get("EDGELLM_AGENT_EMULATED") or None}


def _workpath(name: str) -> str:
    import tvm

    return tvm.get_global_func("tvm.rpc.server.workpath")(name)


def _answer(work) -> str:
    """``work()``'s result as JSON, or {"error": line} for a mistake the user can fix, or the traceback's last line."""
    try:
        return json.dumps(work(), default=str)
    except EdgeError as e:
        return json.dumps({"error": str(e)})
    except Exception as e:  # a failure inside TVM or OpenVINO on the device: one line back to the client
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return json.dumps({"error": f"the runtime failed on the device: {last[:500]}"})


def profile(name: str, options: dict) -> dict:
    from edgellm.runtime import load
    from edgellm.runtime.lm import LanguageModel

    model = load(_workpath(name), threads=options.get("threads"))
    if isinstance(model, LanguageModel):
        return model.profile(prompt_len=options.get("prompt_len", 128), gen_len=options.get("gen_len", 64), runs=min(options.get("runs", 3), 3))
    return model.profile(runs=options.get("runs", 100), warmup=options.get("warmup", 10), per_op=options.get("per_op", False))


def check(name: str, options: dict) -> dict:
    from edgellm.runtime import load

    return load(_workpath(name), threads=options.get("threads")).check_reference(options.get("tolerance"))


def _random_fill(tensor) -> None:
    """MetaSchedule's RPC runner fills each candidate's arguments with this on the device; TVM's runtime library
    alone lacks it (it lives in tvm.contrib, the compiler side)."""
    import numpy as np

    rng = np.random.default_rng()
    shape, dtype = tuple(tensor.shape), str(tensor.dtype)
    if dtype.startswith(("int", "uint")):
        data = rng.integers(0, 8, size=shape).astype(dtype)
    elif dtype == "bool":
        data = rng.integers(0, 2, size=shape).astype(bool)
    else:
        data = rng.uniform(-1.0, 1.0, size=shape).astype(dtype if dtype in ("float32", "float64", "float16") else "float32")
    tensor.copyfrom(data)


def register() -> None:
    """The remote functions; TVM's forked session processes inherit them."""
    from edgellm.runtime.engines.tvm import import_tvm

    tvm = import_tvm()
    for name in ("tvm.contrib.random.random_fill_for_measure", "tvm.contrib.random.random_fill"):
        if tvm.get_global_func(name, allow_missing=True) is None:
            tvm.register_global_func(name, _random_fill)
    tvm.register_global_func(INFO, lambda: json.dumps(info()), override=True)
    tvm.register_global_func(PROFILE, lambda name, options: _answer(lambda: profile(name, json.loads(options))), override=True)
    tvm.register_global_func(CHECK, lambda name, options: _answer(lambda: check(name, json.loads(options))), override=True)


def parse_address(text: str, default_port: int = 9190) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise EdgeError(f"{text!r} is not HOST:PORT", "e.g. --tracker 192.168.1.10:9190") from None


def serve(tracker: str, key: str, host: str = "0.0.0.0", port: int = 9090, port_end: int = 9199, custom_addr: str | None = None):
    """Register with the tracker and serve sessions until killed."""
    register()
    from tvm.rpc.server import PopenRPCServerState

    tracker_addr = parse_address(tracker)
    # TVM's RPC server in this process (its Server class would start a second Python through cloudpickle,
    # which a device does not have); sessions are forked from here, so they inherit the functions above.
    state = PopenRPCServerState(host, port, port_end, tracker_addr=tracker_addr, key=key, custom_addr=custom_addr, silent=True)
    print(json.dumps({"agent": key, "port": state.port, "tracker": f"{tracker_addr[0]}:{tracker_addr[1]}", **info()}), flush=True)
    state.thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.fleet.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", required=True, help="the tracker, HOST:PORT")
    parser.add_argument("--key", required=True, help="the device type this device is pooled under, e.g. rpi4")
    parser.add_argument("--host", default="0.0.0.0", help="address the RPC server listens on")
    parser.add_argument("--port", type=int, default=9090, help="first port to try (up to 9199)")
    parser.add_argument("--custom-addr", default=None, help="the address the tracker gives clients for this device")
    args = parser.parse_args(argv)
    try:
        serve(args.tracker, args.key, args.host, args.port, max(args.port + 1, 9199), args.custom_addr)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
