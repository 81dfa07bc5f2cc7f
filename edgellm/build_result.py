"""What a build returns, and how its stages are timed and reported: shared by api.py and the language-model
build (edgellm/llm/build.py), which api.py hands language models to."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# progress(stage, seconds, detail): seconds is None when the stage starts
Progress = Callable[[str, "float | None", str], None]


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _stage(name: str, progress: Progress | None, seconds: dict, detail: list, log=None, backend: str | None = None):
    """Time a stage and report its start and end; ``detail`` collects its one-line summary. With a BuildLog, any
    exception but an EdgeError (TVM's, ONNX Runtime's, OpenVINO's) becomes one EdgeError naming the stage."""
    from edgellm import crash_guard
    from edgellm.errors import EdgeError

    crash_guard.note("stage", name)
    crash_guard.note("backend", backend or "")
    if progress:
        progress(name, None, "")
    t0 = time.perf_counter()
    try:
        yield
    except EdgeError:
        raise
    except Exception as e:
        if log is None:
            raise
        raise log.failure(name, backend, e) from None
    seconds[name] = time.perf_counter() - t0
    if progress:
        progress(name, seconds[name], detail[0] if detail else "")


