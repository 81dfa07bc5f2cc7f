"""A build's log: what TVM, ONNX Runtime, OpenVINO and NNCF print (much of it from C++, so it is caught at the
file-descriptor level) and the traceback of a compiler's exception go to one file, so the terminal shows
edgellm's progress and, when a stage fails, one ``error:`` line that names the file. ``verbose`` lets it all
through to the terminal instead."""

from __future__ import annotations

import gc
import os
import re
import sys
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from edgellm import crash_guard
from edgellm.errors import EdgeError

KEEP = 20  # logs of failed builds kept in the cache folder


def logs_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm")) / "logs"


# What the third-party message says about where it failed: (pattern, what the match names)
_WHERE = (
    (re.compile(r"Error converting operator (\w+)"), "op {0}"),  # TVM's ONNX importer (printed, then raised)
    (re.compile(r"Offending call:\s*R\.([\w.]+)\("), "Relax op {0}"),  # TVM's VM codegen
    (re.compile(r"running (\w+) node\. Name:'([^']*)'"), "op {0}, node {1}"),  # ONNX Runtime
    (re.compile(r"Node \(([^)]*)\) Op \((\w+)\)"), "op {1}, node {0}"),  # ONNX Runtime, graph resolution
    (re.compile(r"\[ ?\w+ ?\] Op (\w+)"), "op {0}"),
)
_TRY = {"tvm": "try --backend openvino, or --backend auto", "openvino": "try --backend tvm, or --backend auto"}


def _where(text: str) -> str | None:
    for pattern, form in _WHERE:
        found = pattern.search(text)
        if found:
            return form.format(*found.groups())
    return None


def _summary(e: BaseException) -> str:
    """The exception's type and its most telling line (TVM puts the message first, the C++ stack after)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("File ", "Traceback", "Stack trace", "#", "Check failed: (", "^"))] or lines
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:240]}" if first else type(e).__name__


class BuildLog:
    """One build's log file (written only when there is something to keep: deleted after a build that succeeds)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.path: Path | None = None
        self.keep = False  # a traceback was written: the file is named in an error, so it stays
        self._file = None

    def _open(self):
        if self._file is None:
            folder = logs_dir()
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"build-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
            self._file = open(self.path, "a+b", buffering=0)  # noqa: SIM115 (closed in finish)
            crash_guard.note("log", str(self.path))
        return self._file

    @contextmanager
    def captured(self):
        """Send fd 1 and 2 (C++ prints as well as Python's) to the log while the block runs."""
        if self.verbose:
            yield
            return
        fds = (1, 2)  # where C++ code writes, whatever sys.stdout is now
        log = self._open()
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(log.fileno(), fd)
            try:
                yield
            except BaseException as e:  # drop the compiler's frames now, while fd 2 is the log: TVM's
                e.__context__ = None  # "BlockBuilder destroyed with remaining blocks" is printed when they go
                gc.collect()
                raise
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)

    def text(self) -> str:
        if self._file is None:
            return ""
        self._file.seek(0)
        return self._file.read().decode(errors="replace")

    def failure(self, stage: str, backend: str | None, e: BaseException) -> EdgeError:
        """An EdgeError for a third-party exception inside ``stage``: stage, backend, node/op where the messages say, what to try."""
        where = _where(str(e)) or _where(self.text())
        tb = "".join(traceback.format_exception(e))
        if self.verbose:
            sys.stderr.write(tb)
            see = "the traceback is above"
        else:
            log = self._open()
            log.seek(0, os.SEEK_END)
            log.write(f"\n--- {stage}{f' ({backend})' if backend else ''} failed ---\n{tb}".encode())
            see = f"full traceback in {self.path}"
            self.keep = True
        fix = "; ".join(p for p in (_TRY.get(backend or ""), see) if p)
        on = f" on {backend}" if backend and backend not in stage else ""
        return EdgeError(f"{stage}{on} failed" + (f" at {where}" if where else "") + f": {_summary(e)}", fix)

    def finish(self) -> None:
        """Delete the log unless an error names it (and keep only the newest KEEP of those)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self.keep:
            self.path.unlink(missing_ok=True)
            return
        for old in sorted(logs_dir().glob("build-*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            old.unlink(missing_ok=True)
