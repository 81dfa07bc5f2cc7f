"""``edgellm serve``: packages over HTTP, in the protocols existing clients already speak.

    kserve.py      the Open Inference Protocol (KServe v2: Triton, OpenVINO Model Server, KServe), JSON and
                   Triton's binary tensor data extension
    openai_api.py  language-model packages as OpenAI's /v1/chat/completions and /v1/completions (SSE streaming)
    common.py      what both share: the served models, refusing a request, reading a capped body
    app.py         the Starlette app: loaded models, API key, error replies; serve() runs it with uvicorn

The device side: imports the runtime, Starlette and uvicorn only (never torch, onnx, click or TVM's compiler),
so ``python -m edgellm.serve`` (__main__.py, argparse) works on a board with ``pip install edgellm[runtime]``. uvicorn is imported
only to run the server (it brings click, for its own command line).
"""

from edgellm.errors import EdgeError

try:
    import starlette  # noqa: F401
except ModuleNotFoundError as e:
    raise EdgeError(f"serving needs {e.name}, which is not installed", "pip install 'edgellm[serve]' (starlette, uvicorn)") from None

from edgellm.serve.app import MAX_BODY, create_app, load_models, serve

__all__ = ["MAX_BODY", "create_app", "load_models", "serve"]
