"""What the two protocols share: the models being served, refusing a request, reading a capped body."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

MAX_BODY = 64 << 20  # bytes; a request body above it gets 413 before it is read


class HTTPError(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Served:
    """One package being served under ``name``."""

    name: str
    path: Path
    model: object  # edgellm.runtime.Model, or LanguageModel when is_lm
    is_lm: bool

    def run(self, arrays: dict):
        """Model.run in the calling worker thread: it is thread-safe, and holds callers beyond what the cores take."""
        return self.model.run(**arrays)


def json_object(body: bytes, what: str) -> dict:
    """The request body as a JSON object, or a 400 that says what it had to be."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise HTTPError(400, f"the request is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request must be {what}")
    return data


def error_response(path: str, status: int, message: str, code: str | None = None) -> JSONResponse:
    """KServe v2: ``{"error": "..."}``; OpenAI (/v1): its error object."""
    if path.startswith("/v1"):
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)
    return JSONResponse({"error": message}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: by its Content-Length before reading, or as it
    arrives when there is none (chunked). gzip / deflate bodies (tritonclient's request compression) are inflated,
    with the same cap."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPError(400, f"bad Content-Length {length!r}")
        if int(length) > limit:
            raise HTTPError(413, f"the request body is {int(length)} bytes, more than this server takes ({limit})")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"the request body is more than this server takes ({limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, "the client went away while sending the body") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = inflate.decompress(body, limit + 1)
        except zlib.error as e:
            raise HTTPError(400, f"the {encoding} body does not inflate ({e})") from None
        if len(body) > limit or inflate.unconsumed_tail:
            raise HTTPError(413, f"the inflated request body is more than this server takes ({limit} bytes)")
    elif encoding != "identity":
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    return body
