"""Why a model failed, in words a Discord user can act on.

`classify_failure` turns whatever a model call raised (openai's exceptions, httpx
errors, timeouts, our own UserErrors) into a `ModelFailure`: a kind, a short message
that names the model and the cause (never a stack trace, never a key: every message goes
through the app's `core.redact.Redactor`), and whether the fallback model should be tried.

Falling back: every kind may fall back except a request refused under the provider's
content policy (asking another model the same thing would sidestep the refusal).
A context-length error falls back because the fallback is trimmed to its own window;
other bad requests fall back because they are usually provider-specific (an unknown
model id, a parameter one server does not accept).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, replace
from typing import Literal

import aiohttp
import httpx
import httpx2
import openai

from core.errors import ConfigError, UserError
from core.redact import Redactor

FailureKind = Literal[
    "rate_limited",
    "bad_key",
    "unreachable",
    "timeout",
    "context_too_long",
    "server_error",
    "bad_request",
    "unknown",
]

_CONTEXT_CODES = frozenset(
    {"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"}
)
_CONTEXT_PHRASES = (
    "maximum context length",
    "context length",
    "context window",
    "exceeds the available context size",
    "exceed_context_size",
    "too many tokens",
    "prompt is too long",
    "reduce the length of the messages",
)
_POLICY_CODES = frozenset(
    {"content_filter", "content_policy_violation", "responsibleaipolicyviolation"}
)
_DETAIL_CHARS = 200  # of a provider's own error message, quoted in ours


class MissingApiKey(ConfigError):
    """A model needs an API key and its variable is not set."""

    def __init__(self, model_name: str, variable: str) -> None:
        super().__init__(f"Model '{model_name}' needs an API key: set {variable}.")
        self.model_name = model_name
        self.variable = variable


class ContextTooLong(UserError):
    """The prompt cannot fit the model's context window even without history."""

    def __init__(self, message: str, model_name: str, tokens: int, limit: int) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True, slots=True)
class ModelFailure:
    """A model call that failed, explained."""

    kind: FailureKind
    message: str
    fallback_ok: bool
    status: int | None = None


def classify_failure(
    exc: BaseException,
    model_name: str,
    api_key_env: str | None = None,
    redact: Redactor | None = None,
) -> ModelFailure:
    """Explain `exc`, raised while `model_name` was answering; `api_key_env` names its key variable.

    The message is scrubbed by `redact` (the app's, which knows every secret it holds; by
    default the pattern pass alone): it is shown, logged and stored as it is.
    """
    if redact is None:
        redact = Redactor()
    for cause in _causes(exc):
        failure = _classify_one(cause, model_name, api_key_env, redact)
        if failure is not None:
            return replace(failure, message=redact(failure.message))
    return ModelFailure(
        "unknown",
        redact(f"{model_name} failed unexpectedly ({type(exc).__name__})."),
        fallback_ok=True,
    )


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _classify_one(
    exc: BaseException, name: str, key_env: str | None, redact: Redactor
) -> ModelFailure | None:
    """One exception → a failure, or None when this type says nothing useful."""
    if isinstance(exc, MissingApiKey):
        return ModelFailure("bad_key", exc.message, fallback_ok=True)
    if isinstance(exc, ContextTooLong):
        return ModelFailure("context_too_long", exc.message, fallback_ok=True)
    if isinstance(exc, UserError):
        return ModelFailure("unknown", exc.message, fallback_ok=True)
    if isinstance(exc, openai.APIStatusError):
        return _from_status(exc, name, key_env, redact)
    if isinstance(
        exc,
        openai.APITimeoutError | httpx.TimeoutException | httpx2.TimeoutException | TimeoutError,
    ):
        # openai's aiohttp transport reports every aiohttp connection error as a connect
        # timeout; the aiohttp error underneath says whether it really was one.
        real = next((c for c in _causes(exc)[1:] if isinstance(c, aiohttp.ClientError)), None)
        return _from_aiohttp(real, name, _url_of(exc)) if real is not None else _timed_out(name)
    if isinstance(exc, openai.APIConnectionError):
        # The SDK wraps the transport error; its cause says whether we never connected or lost it.
        for cause in _causes(exc)[1:]:
            inner = _classify_one(cause, name, key_env, redact)
            if inner is not None:
                return inner
        return _unreachable(name, "connection failed", _url_of(exc))
    if isinstance(exc, aiohttp.ClientError):
        return _from_aiohttp(exc, name, _url_of(exc))
    if isinstance(exc, httpx.ConnectError | httpx2.ConnectError):
        return _unreachable(name, _connect_reason(exc), _url_of(exc))
    if isinstance(
        exc,
        httpx.RemoteProtocolError | httpx2.RemoteProtocolError | httpx.ReadError | httpx2.ReadError,
    ):
        return _broke_off(name)
    if isinstance(exc, httpx.TransportError | httpx2.TransportError):
        return _unreachable(name, "the connection failed", _url_of(exc))
    if isinstance(exc, ConnectionRefusedError):
        return _unreachable(name, "connection refused", None)
    if isinstance(exc, ConnectionError | OSError):
        return _unreachable(name, "the connection failed", None)
    if isinstance(exc, openai.APIResponseValidationError):
        return ModelFailure(
            "server_error", f"{name} sent a reply that could not be read.", fallback_ok=True
        )
    return None


def _from_status(
    exc: openai.APIStatusError, name: str, key_env: str | None, redact: Redactor
) -> ModelFailure:
    status = exc.status_code
    code = str(exc.code or "").lower() if hasattr(exc, "code") else ""
    detail = _provider_detail(exc, redact)
    check = f"check {key_env}" if key_env else "check its API key"
    if status == 401:
        return ModelFailure(
            "bad_key", f"{name} rejected its API key (HTTP 401): {check}.", True, status
        )
    if status == 403:
        return ModelFailure(
            "bad_key",
            f"{name} refused access (HTTP 403): {check} and that the key may use this model.",
            True,
            status,
        )
    if status == 429:
        if code == "insufficient_quota" or "quota" in detail.lower():
            message = f"{name} has run out of quota with its provider (HTTP 429). The people running the bot need to top it up."
        else:
            message = f"{name} is rate limited by its provider (HTTP 429). Try again in a minute."
        return ModelFailure("rate_limited", message, True, status)
    if status in (400, 413, 422) and (
        code in _CONTEXT_CODES or any(p in detail.lower() for p in _CONTEXT_PHRASES)
    ):
        return ModelFailure(
            "context_too_long",
            f"The conversation is too long for {name}'s context window.",
            True,
            status,
        )
    if code in _POLICY_CODES or "content management policy" in detail.lower():
        return ModelFailure(
            "bad_request",
            f"{name} refused this request under its provider's content policy.",
            False,
            status,
        )
    if status == 408:
        return ModelFailure("timeout", f"{name} took too long to answer (HTTP 408).", True, status)
    if status >= 500:
        return ModelFailure(
            "server_error",
            f"{name}'s provider had a server error (HTTP {status}). Try again shortly.",
            True,
            status,
        )
    if status == 404:
        why = f": {detail}" if detail else ""
        return ModelFailure(
            "bad_request", f"{name} was not found at its provider (HTTP 404{why}).", True, status
        )
    why = f": {detail}" if detail else ""
    return ModelFailure(
        "bad_request", f"{name} refused the request (HTTP {status}{why}).", True, status
    )


def _from_aiohttp(exc: aiohttp.ClientError, name: str, url: str | None) -> ModelFailure:
    """An error from the aiohttp transport (remote models' HTTP client)."""
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return _timed_out(name)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _unreachable(name, _connect_reason(exc), url)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return _broke_off(name)
    return _unreachable(name, "the connection failed", url)


def _timed_out(name: str) -> ModelFailure:
    return ModelFailure(
        "timeout", f"{name} took too long to answer and was given up on.", fallback_ok=True
    )


def _broke_off(name: str) -> ModelFailure:
    return ModelFailure(
        "server_error",
        f"{name}'s connection broke off in the middle of the answer. Try again.",
        fallback_ok=True,
    )


def _unreachable(name: str, reason: str, url: str | None) -> ModelFailure:
    where = f" at {url}" if url else ""
    return ModelFailure(
        "unreachable", f"{name} is unreachable ({reason}{where}).", fallback_ok=True
    )


def _connect_reason(exc: BaseException) -> str:
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "its host name could not be resolved"
        if isinstance(cause, ssl.SSLError):
            return "the TLS handshake failed"
    text = " ".join(str(cause) for cause in _causes(exc)).lower()
    if "refused" in text:
        return "connection refused"
    if (
        "name or service" in text
        or "nodename" in text
        or "getaddrinfo" in text
        or "name resolution" in text
    ):
        return "its host name could not be resolved"
    if "ssl" in text or "certificate" in text:
        return "the TLS handshake failed"
    return "could not connect"


def _url_of(exc: BaseException) -> str | None:
    """The request's URL without query string or credentials, if the exception carries one."""
    try:
        request = exc.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return None
    url = getattr(request, "url", None)
    if url is None:
        return None
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def _provider_detail(exc: openai.APIStatusError, redact: Redactor) -> str:
    """The provider's own error message, scrubbed of secrets, then shortened.

    Scrubbed first: a key cut in two by the shortening would no longer be recognised.
    """
    body = exc.body
    message = ""
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = str(inner.get("message", "")) if isinstance(inner, dict) else str(inner)
    elif isinstance(body, str):
        message = body
    message = redact(" ".join(message.split()))
    return message[:_DETAIL_CHARS] + ("…" if len(message) > _DETAIL_CHARS else "")
