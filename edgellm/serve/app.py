"""The server: loaded packages, the API key, the body cap and error replies, as one Starlette app run by uvicorn.

Model calls are blocking numpy / TVM code: they run in worker threads, never on the event loop, so one slow
request does not stall the others (health checks, streaming replies).
"""

from __future__ import annotations

import errno
import secrets
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from edgellm.errors import EdgeError
from edgellm.serve import kserve, openai_api
from edgellm.serve.common import MAX_BODY, HTTPError, Served, error_response


def load_models(specs: list[str], threads: int | None = None, trusted_keys=None) -> dict[str, Served]:
    """``PKG`` (served as its file stem) or ``NAME=PKG`` -> loaded, verified packages by name (signed by one of
    ``trusted_keys`` / $EDGELLM_TRUSTED_KEYS where given)."""
    from edgellm import runtime
    from edgellm.runtime.lm import LanguageModel

    models: dict[str, Served] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec).stem, spec
        if not name or "/" in name:
            raise EdgeError(f"{name!r} is not a usable model name", "give NAME=PKG with a name without '/'")
        if name in models:
            raise EdgeError(f"two packages would be served as {name!r}: {models[name].path} and {path}", "name one of them: NAME=PKG")
        model = runtime.load(path, threads=threads, trusted_keys=trusted_keys or None)
        models[name] = Served(name, Path(path), model, isinstance(model, LanguageModel))
    if not models:
        raise EdgeError("no package to serve", "give one or more .edgepkg files")
    return models


class ApiKey:
    """Requests must carry ``Authorization: Bearer KEY`` (health probes excepted: orchestrators call them bare)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith("/v2/health"):
            auth = Headers(scope=scope).get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.key):
                message = "wrong API key" if auth else "this server needs an API key: send 'Authorization: Bearer KEY'"
                await error_response(scope["path"], 401, message, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(models: dict[str, Served], api_key: str | None = None, max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app serving ``models`` (from :func:`load_models`)."""

    async def on_http_error(request, e: HTTPError):
        return error_response(request.url.path, e.status, e.message, e.code)

    async def on_edge_error(request, e: EdgeError):  # the runtime refused the inputs / the generation settings
        return error_response(request.url.path, 400, str(e))

    async def on_starlette(request, e: StarletteHTTPException):  # no such route, method not allowed
        return error_response(request.url.path, e.status_code, f"{e.detail}: {request.method} {request.url.path}")

    async def on_crash(request, e: Exception):
        return error_response(request.url.path, 500, f"internal error: {type(e).__name__}: {e}")

    routes: list[Route] = kserve.routes(models, max_body) + openai_api.routes(models, max_body)
    app = Starlette(routes=routes, middleware=[Middleware(ApiKey, key=api_key)] if api_key else [],
                    exception_handlers={HTTPError: on_http_error, EdgeError: on_edge_error, StarletteHTTPException: on_starlette,
                                        Exception: on_crash})
    app.state.models = models
    return app


# ------------------------------------------------------------ running it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or one line saying why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise EdgeError(f"cannot listen on {host!r}: {e.strerror}", "give an address of this machine with --host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EdgeError(f"port {port} on {host} is in use", "stop what listens there, or pick another --port") from None
        raise EdgeError(f"cannot listen on {host}:{port}: {e.strerror}", "pick another --host / --port") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, threads: int | None = None,
          trusted_keys=None, max_body: int = MAX_BODY, announce=print) -> None:
    """Load the packages, listen, call ``announce(info)`` (where it listens, what it serves), serve until Ctrl-C / SIGTERM."""
    try:
        import uvicorn
    except ModuleNotFoundError as e:
        raise EdgeError(f"serving needs {e.name}, which is not installed", "pip install 'edgellm[serve]' (starlette, uvicorn)") from None

    sock = bind(host, port)  # first: a port in use fails before minutes of loading
    try:
        models = load_models(specs, threads, trusted_keys)
    except BaseException:
        sock.close()
        raise
    app = create_app(models, api_key, max_body)
    url = url_of(sock)
    announce({"url": url, "host": host, "port": sock.getsockname()[1], "api_key": bool(api_key),
              "all_interfaces": host in ("0.0.0.0", "::", ""),
              "models": {name: {"path": str(s.path), "kind": "llm" if s.is_lm else "tensor",
                                "routes": [f"{url}/v1/chat/completions", f"{url}/v1/completions"] if s.is_lm else [f"{url}/v2/models/{name}/infer"]}
                         for name, s in models.items()}})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
