"""pytest setup for the TVM CPU pipeline tests: make ``edgellm`` and the helpers importable."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.abspath(os.path.join(_HERE, "..", "..", ".."))):
    if _p not in sys.path:
        sys.path.insert(0, _p)
