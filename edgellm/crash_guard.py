"""A build in a child process, so that a crash inside native code still ends in one ``error:`` line.

An exception from TVM, OpenVINO or ONNX Runtime becomes an EdgeError (build_log.py); a segfault or an abort inside
them kills the process before Python can say anything. ``edgellm build`` therefore forks before it imports any of
them: the child builds, announcing each stage, its log file and its scratch files through a pipe; the parent waits.
When the child dies by a signal, the parent prints which stage crashed, where the log is, and what to try, removes
what the child left half-written, and exits non-zero. The child's Python stack at the crash goes to the log
(faulthandler). Without fork (Windows) or with EDGELLM_NO_FORK=1 the build runs in the one process."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

_pipe: int | None = None  # the child's end: where note() writes


def note(kind: str, value: str) -> None:
    """Tell the parent (if any) what is going on: ``stage``, ``backend``, ``log``, ``scratch`` (a folder), ``output``."""
    if _pipe is not None:
        try:
            os.write(_pipe, f"{kind}\t{value}\n".encode())
        except OSError:
            pass


def _real_fds() -> bool:
    """Forking only pays when the child's output reaches the same terminal / file (not an in-memory test runner)."""
    try:
        sys.stdout.fileno()
        sys.stderr.fileno()
        return True
    except (AttributeError, ValueError, OSError):
        return False


def run(fn) -> None:
    """Run ``fn()`` in a child process (see the module docstring); returns or exits as the child did."""
    global _pipe
    if not hasattr(os, "fork") or os.environ.get("EDGELLM_NO_FORK") == "1" or not _real_fds():
        fn()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, then leave without running the parent's atexit handlers twice
        os.close(read_end)
        _pipe = write_end
        import faulthandler

        faulthandler.enable()  # fd 2: the build log while a stage runs (build_log.BuildLog.captured)
        code = 0
        try:
            fn()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 (printed as Python would, then the exit status says it failed)
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child, which cleans up and exits 130
    try:
        notes = _read_all(read_end)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(read_end)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        _clean(notes)
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h")  # the child's spinner had hidden the cursor
        if sig == signal.SIGINT:
            print("interrupted: nothing was written", file=sys.stderr)
            sys.exit(130)
        print(f"error: {crash_message(notes, sig)}", file=sys.stderr)
        sys.exit(3)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(code)


def _read_all(fd: int) -> dict[str, str]:
    """The child's notes, the latest of each kind (the pipe closes when the child ends)."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    notes: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        kind, _, value = line.partition("\t")
        notes[kind] = value
    return notes


def crash_message(notes: dict[str, str], sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    stage = notes.get("stage", "the build")
    backend = notes.get("backend")
    where = f"stage {stage}" + (f" on {backend}" if backend else "")
    tries = {"tvm": "try --backend openvino, or ", "openvino": "try --backend tvm, or "}.get(backend or "", "")
    log = f"; the Python stack at the crash is in {notes['log']}" if "log" in notes else ""
    return (f"{where} crashed ({name}) in native code; nothing was written — {tries}rerun with --verbose to see what it "
            f"printed{log}")


def _clean(notes: dict[str, str]) -> None:
    """Remove the child's scratch folder and a package file it had begun to write."""
    if "scratch" in notes:
        shutil.rmtree(notes["scratch"], ignore_errors=True)
    if "output" in notes:
        out = Path(notes["output"])
        for tmp in out.parent.glob(f".{out.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
