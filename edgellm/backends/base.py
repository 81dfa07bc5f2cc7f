"""What every backend provides: a compile step from a traced model to package members."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgellm.targets import Target
from edgellm.trace import Traced


@dataclass
class Compiled:
    """Files for the package plus what the manifest should say about them."""

    files: dict[str, Path]  # member name -> file on disk
    info: dict = field(default_factory=dict)  # backend name, versions, options: goes into the manifest
    runtime_requires: list[str] = field(default_factory=list)  # pip requirements on the device


class Backend(Protocol):
    name: str

    def check(self, target: Target) -> None:
        """Raise EdgeError when this backend cannot serve the target."""

    def compile(self, traced: Traced, target: Target, options: dict, workdir: Path) -> Compiled:
        """Compile into files under ``workdir``."""
