"""edgellm: trained model in, small fast self-contained package out.

This module stays import-light (stdlib only): the tiny runtime ships it to devices.
The compiler-side API is reached lazily: ``edgellm.build(...)``.
"""

__version__ = "0.1.0"

_API = ("build", "inspect", "Recipe", "BuildRecipe", "BuildResult")


def __getattr__(name):
    if name in _API:
        from edgellm import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
