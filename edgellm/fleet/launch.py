"""Start an agent from the laptop side: here, or inside the emulated arm64 userland (``--emulate rpi4``).

The emulated agent is a real remote process: the Debian arm64 Python that ``edgellm verify`` uses, under
qemu-user with the target's core, running only edgellm's runtime sources (copied into its folder) and TVM's
runtime library. It shares the host's network, so it registers with a tracker on loopback like a board on the LAN.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgellm.errors import EdgeError

LAUNCHER = "import runpy, sys\nsys.argv[0] = 'edgellm.fleet.agent'\nrunpy.run_module('edgellm.fleet.agent', run_name='__main__')\n"


class Agent:
    """A running agent process; ``info`` is the line it printed once registered (port, CPU, ...)."""

    def __init__(self, proc: subprocess.Popen, workdir: str | None):
        self.proc, self._workdir = proc, workdir
        line = proc.stdout.readline()  # the agent prints one JSON line once it listens
        try:
            self.info = json.loads(line)
        except ValueError:
            self.stop()
            err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            raise EdgeError(f"the agent did not start: {(err[-1] if err else line.strip() or 'no output')[:300]}") from None

    def wait(self) -> int:
        try:
            return self.proc.wait()
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def start_agent(tracker: str, key: str, emulate: str | None = None, host: str = "0.0.0.0", port: int = 9090,
                progress=None) -> Agent:
    """An agent registered under ``key`` with ``tracker`` (HOST:PORT): this machine's Python, or the emulated
    arm64 device ``emulate`` (a target name: rpi4, rpi5, arm64, ...)."""
    args = ["--tracker", tracker, "--key", key, "--host", host, "--port", str(port)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not emulate:
        return Agent(subprocess.Popen([sys.executable, "-m", "edgellm.fleet.agent", *args], text=True, **pipes), None)

    from edgellm import emulate as emu, targets
    from edgellm.bundle import copy_runtime_sources

    target = targets.resolve(emulate)
    if target.arch != "aarch64":
        raise EdgeError(f"--emulate takes an arm64 target, {emulate} is {target.arch}", "e.g. --emulate rpi4")
    emu.ensure_host_tools()
    say = progress or (lambda message: None)
    say("preparing the emulated arm64 userland (cached after the first time)")
    rootfs = emu.prepare_rootfs(progress=say)
    work = tempfile.mkdtemp(prefix="edgellm-agent-")
    copy_runtime_sources(Path(work) / "rt")
    (Path(work) / "agent.py").write_text(LAUNCHER)
    say(f"starting the agent under qemu-user as {target.qemu_cpu or 'max'}")
    proc = emu.start_python(rootfs, work, "agent.py", args, qemu_cpu=target.qemu_cpu or None,
                            env={"PYTHONPATH": "rt", "EDGELLM_AGENT_EMULATED": f"{target.name} ({target.qemu_cpu or 'max'})"}, **pipes)
    return Agent(proc, work)
