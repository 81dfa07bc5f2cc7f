"""Language-model packages as OpenAI's API: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions``,
with ``stream: true`` as server-sent events, so the ``openai`` client (and what is built on it) works unchanged.

Sampling follows OpenAI's defaults (temperature 1, top_p 1); ``temperature: 0`` is greedy, what ``LanguageModel.chat``
does by default. ``top_k`` is accepted as llama.cpp's and vLLM's servers accept it.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import closing

from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgellm.serve.common import HTTPError, Served, json_object, read_body


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string: not sent until the next token says."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Generation:
    """One generation, run start to end by one thread, its text pieces handed to the event loop.

    ``LanguageModel.stream`` holds the model's RLock while it generates, and only the thread that took an RLock may
    release it: so the whole generator lives in one thread (never next() from different pool workers). Each language
    model has one such thread (``worker``, a one-thread executor), which runs its requests in turn, first come first
    served; one long-lived thread also keeps one TVM thread pool, where a thread per request would make a pool each.
    It runs at most ``AHEAD`` pieces ahead of the reader, and ``cancel()`` (the client went away) stops it there.
    """

    AHEAD = 8

    def __init__(self, worker: Executor, lm, prompt: Callable[[], list[int]], max_tokens: int, stops: list[str], sampling: dict):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.room = threading.Semaphore(self.AHEAD)
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason = "length"
        worker.submit(self._work, lm, prompt, max_tokens, stops, sampling)

    def cancel(self) -> None:
        self.cancelled.set()

    def _send(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            self.cancelled.set()

    def _work(self, lm, prompt, max_tokens, stops, sampling) -> None:
        if self.cancelled.is_set():  # the client left while this waited its turn
            return
        try:
            ids = prompt()
            self.prompt_tokens = len(ids)
            with closing(self._pieces(lm, ids, max_tokens, stops, sampling)) as pieces:
                for piece in pieces:
                    while not self.room.acquire(timeout=0.2):  # the reader is AHEAD pieces behind: wait for it
                        if self.cancelled.is_set():
                            return
                    if self.cancelled.is_set():
                        return
                    self._send("text", piece)
            self._send("done")
        except Exception as e:  # noqa: BLE001 - a GenerationError is the reply to this request; anything else its 500
            self._send("error", e)

    def _pieces(self, lm, ids: list[int], max_tokens: int, stops: list[str], sampling: dict) -> Iterator[str]:
        """Text as it is made, cut before the first stop string; EOS ends it and is not shown."""
        made, shown, good = [], "", ""
        with closing(lm.stream(ids, max_tokens, **sampling)) as tokens:  # closed here, in the thread that holds the lock
            for token in tokens:
                self.completion_tokens += 1
                if token in lm.eos_ids:
                    self.finish_reason = "stop"
                    break
                made.append(token)
                text = lm.decode(made)
                if text.endswith("\ufffd"):  # a multi-byte character still being spelled out
                    continue
                good = text
                hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                if hits:
                    good, self.finish_reason = text[: max(min(hits), len(shown))], "stop"
                    break
                safe = len(text) - _held(text, stops)
                if safe > len(shown):
                    yield text[len(shown):safe]
                    shown = text[:safe]
        if len(good) > len(shown):
            yield good[len(shown):]

    async def next(self) -> str | None:
        """The next text piece; None when done. Raises what the generation raised."""
        kind, value = await self.queue.get()
        if kind == "error":
            raise value
        if kind == "text":
            self.room.release()
            return value
        return None


def _number(body: dict, key: str, default, kind=float, low=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (kind is int and int(value) != value):
        raise HTTPError(400, f"{key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}", "invalid_value")
    if low is not None and value < low:
        raise HTTPError(400, f"{key!r} must be at least {low}, got {value}", "invalid_value")
    return kind(value)


def _options(body: dict, lm) -> tuple[int, list[str], dict]:
    """(max_tokens, stop strings, sampling keywords for LanguageModel.stream) from an OpenAI request."""
    if _number(body, "n", 1, int) != 1 or _number(body, "best_of", 1, int) != 1:
        raise HTTPError(400, "this server makes one choice per request (n = 1)", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", lm.max_seq_len, int, 1)  # default: until EOS or a full cache
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise HTTPError(400, "'stop' must be a string or a list of strings", "invalid_value")
    seed = _number(body, "seed", None, int)
    sampling = {"temperature": _number(body, "temperature", 1.0, low=0), "top_p": _number(body, "top_p", 1.0),
                "top_k": _number(body, "top_k", 0, int, 0), "seed": seed}
    return max_tokens, stops, sampling


def _message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise HTTPError(400, "only text message parts are supported", "invalid_value")
        return "".join(str(p.get("text", "")) for p in content)
    raise HTTPError(400, "a message's 'content' must be a string or a list of text parts", "invalid_value")


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.prompt_tokens + g.completion_tokens}


def _sse(data) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def routes(models: dict[str, Served], max_body: int) -> list[Route]:
    started = int(time.time())
    lms = {name: s for name, s in models.items() if s.is_lm}
    workers = {name: ThreadPoolExecutor(1, thread_name_prefix=f"edgellm-generate-{name}") for name in lms}

    async def request_json(request) -> dict:
        return json_object(await read_body(request, max_body), "a JSON object")

    def language_model(name) -> Served:
        if name is None and len(lms) == 1:
            return next(iter(lms.values()))
        if name not in models:
            raise HTTPError(404, f"unknown model {name!r}: this server's language models are {', '.join(lms) or 'none'}", "model_not_found")
        if not models[name].is_lm:
            raise HTTPError(400, f"{name!r} is not a language model: run it at /v2/models/{name}/infer", "model_not_found")
        return models[name]

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "edgellm"}

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [model_card(n) for n in lms]})

    async def get_model(request):
        return JSONResponse(model_card(language_model(request.path_params["name"]).name))

    async def complete(request, chat: bool):
        body = await request_json(request)
        served = language_model(body.get("model"))
        lm = served.model
        max_tokens, stops, sampling = _options(body, lm)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise HTTPError(400, "'messages' must be a non-empty list of {\"role\", \"content\"}", "invalid_value")
            messages = [{**m, "content": _message_text(m.get("content"))} for m in messages]

            def prompt():
                return lm.encode(lm.apply_chat_template(messages))
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1 and isinstance(text[0], (str, list)):
                text = text[0]  # a batch of one
            if isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
                def prompt():
                    return list(text)
            elif isinstance(text, str) and text:
                def prompt():
                    return lm.encode(text)
            else:
                raise HTTPError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "invalid_value")

        generation = Generation(workers[served.name], lm, prompt, max_tokens, stops, sampling)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()), "model": served.name}
        try:
            first = await generation.next()  # before any byte is sent: a bad prompt or setting is still a 400
        except BaseException:
            generation.cancel()
            raise

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
                return _sse({**head, "choices": [choice]})

            async def events():
                try:
                    if chat:
                        yield chunk(None, role=True)
                    piece = first
                    while piece is not None:
                        yield chunk(piece)
                        piece = await generation.next()
                    yield chunk(None, generation.finish_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(generation)})
                    yield "data: [DONE]\n\n"
                finally:  # also when the client went away mid-stream: stop generating
                    generation.cancel()

            body = events()
            weakref.finalize(body, generation.cancel)  # and when the reply is dropped without starting (client gone first)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces, piece = [], first
        try:
            while piece is not None:
                pieces.append(piece)
                piece = await generation.next()
        finally:
            generation.cancel()
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": generation.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": _usage(generation)})

    async def chat_completions(request):
        return await complete(request, chat=True)

    async def completions(request):
        return await complete(request, chat=False)

    return [Route("/v1/models", list_models), Route("/v1/models/{name}", get_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"])]
