"""The one exception type of :mod:`edgellm.emulate`."""

from edgellm.errors import EdgeError


class EmulationError(EdgeError):
    """Arm64 emulation cannot proceed; the message is one line: what is wrong and what to do.

    e.g. ``qemu-user-static (qemu-aarch64-static) is missing: apt-get install qemu-user-static``
    """
