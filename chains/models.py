"""Chat models built from registry entries.

Every provider speaks the OpenAI wire format, so every model is a `ChatOpenAI` (or
`AzureChatOpenAI`), reading the provider's JSON as plain dicts (`PlainCompletions`) over
one shared aiohttp connection pool. Failed requests are retried by the openai client
itself (exponential backoff with jitter, honouring Retry-After, on 408/409/429/5xx,
connection errors and timeouts) up to `ClientConfig.max_retries` times; after that the
caller's fallback answers.

Nothing here counts tokens through LangChain (`get_num_tokens*` would fetch a tiktoken
vocabulary); `chains.tokens` counts offline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2  # the openai SDK's own HTTP package: its client options are typed with it
import openai
from langchain_core.language_models import BaseChatModel
from langchain_openai import AzureChatOpenAI, ChatOpenAI
from pydantic import SecretStr

from chains.failures import MissingApiKey
from chains.registry import ModelSpec
from core.errors import ConfigError
from core.redact import Redactor

if TYPE_CHECKING:
    from chains.local import LocalServers

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Ollama, vLLM and llama.cpp ignore the key, but the openai client insists on one.
PLACEHOLDER_KEY = "not-needed"
# How long an idle connection to a model server is kept for the next request. The SDK's
# default (5 s) is shorter than the pause between most messages of a conversation, so
# nearly every answer would open a new connection (and a TLS handshake) first.
KEEPALIVE_S = 60.0


class CompatibleChatOpenAI(ChatOpenAI):
    """ChatOpenAI for OpenAI-compatible servers: sends `max_tokens`, which they all understand.

    ChatOpenAI renames it to `max_completion_tokens` (OpenAI's newer name), which Ollama,
    llama.cpp and older vLLM/TGI releases silently ignore.
    """

    def _get_request_payload(
        self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        if "max_completion_tokens" in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        return payload


class PlainCompletions:
    """`chat.completions` for ChatOpenAI that hands back the provider's JSON as plain dicts.

    ChatOpenAI reads dict chunks directly; from the SDK's typed objects it first builds
    pydantic models (per chunk) and then dumps them back to dicts, and before sending it
    walks the request through the SDK's type-directed transform. Those two steps were the
    largest CPU cost per streamed reply (`python -m bench concurrency`). The request still
    goes through the openai client's own `post`: the same retries, headers, auth, error
    types, SSE decoding and in-stream error handling. Anything else is the SDK's resource.
    """

    # Request options ChatOpenAI may pass among the body parameters.
    _OPTIONS = {
        "extra_headers": "headers",
        "extra_query": "params",
        "extra_body": "extra_json",
        "timeout": "timeout",
    }

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self._client = client
        self._completions = client.chat.completions

    async def create(self, **params: Any) -> Any:
        options: dict[str, Any] = {}
        for name, key in self._OPTIONS.items():
            value = params.pop(name, None)
            if value is not None:
                options[key] = value
        return await self._client.post(  # type: ignore[call-overload]  # options is a RequestOptions dict
            "/chat/completions",
            body=params,
            options=options,
            cast_to=object,
            stream=bool(params.get("stream")),
            stream_cls=openai.AsyncStream[object],
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How model clients behave: time limits, retries, and where API keys come from."""

    request_timeout: float = 60.0  # seconds before a request (or a stalled stream) is given up
    max_retries: int = 2  # retries of a failed request before the caller's fallback answers
    # The value of an environment variable, by name (None when unset); keys are never stored.
    secret: Callable[[str], SecretStr | None] = lambda name: None
    # Scrubs failure messages; it also learns each key and base URL a client is built with.
    redact: Redactor = field(default_factory=Redactor)


class ChatModelFactory:
    """Builds (and caches) one chat model per registry entry."""

    def __init__(self, config: ClientConfig, local: LocalServers | None = None) -> None:
        self.config = config
        self.local = local
        self._cache: dict[str, tuple[tuple[ModelSpec, str], BaseChatModel]] = {}
        self._http: openai.DefaultAioHttpClient | None = None

    @property
    def redact(self) -> Redactor:
        """What scrubs secrets from the messages about these models' failures."""
        return self.config.redact

    async def get(self, spec: ModelSpec) -> BaseChatModel:
        """The chat model for `spec` (starting its local server first if it is a llama.cpp model)."""
        base_url = await self._base_url(spec)
        key = (spec, base_url)
        cached = self._cache.get(spec.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        model = self._build(spec, base_url)
        self._cache[spec.name] = (key, model)
        return model

    async def aclose(self) -> None:
        """Close the shared HTTP connection pool."""
        self._cache.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _base_url(self, spec: ModelSpec) -> str:
        if spec.provider == "llama.cpp":
            if self.local is None:
                raise ConfigError(
                    f"Model '{spec.name}' runs locally with llama.cpp, but local models are not enabled here."
                )
            return await self.local.ensure(spec)
        if spec.provider == "openai":
            return spec.base_url or OPENAI_BASE_URL
        assert spec.base_url is not None  # the registry refuses entries without one
        return spec.base_url

    def _api_key(self, spec: ModelSpec) -> SecretStr:
        """The key from the variable the entry names; a placeholder for servers that need none."""
        if spec.api_key_env:
            key = self.config.secret(spec.api_key_env)
            if key is None:
                raise MissingApiKey(spec.name, spec.api_key_env)
            self.config.redact.add(key)  # a model registered at run time may bring a new one
            return key
        if spec.provider in ("openai", "azure-openai"):
            raise MissingApiKey(
                spec.name, "OPENAI_API_KEY" if spec.provider == "openai" else "AZURE_OPENAI_API_KEY"
            )
        return SecretStr(PLACEHOLDER_KEY)

    def _http_client(self) -> openai.DefaultAioHttpClient:
        """One connection pool for every remote model, so aclose() can close it.

        The openai SDK's aiohttp transport rather than its default httpx one: with hundreds
        of streams at once, httpcore's pool rescans every connection for each request, and
        `python -m bench concurrency` finishes 20-30% sooner on aiohttp. (Its errors are
        mapped loosely; `chains.failures` looks underneath them.)
        """
        if self._http is None:
            defaults = openai.DEFAULT_CONNECTION_LIMITS
            limits = httpx2.Limits(
                max_connections=defaults.max_connections, keepalive_expiry=KEEPALIVE_S
            )
            self._http = openai.DefaultAioHttpClient(limits=limits)
        return self._http

    def _build(self, spec: ModelSpec, base_url: str) -> BaseChatModel:
        self.config.redact.add_url(base_url)
        options: dict[str, Any] = {
            "model": spec.model,
            "api_key": self._api_key(spec),
            "timeout": self.config.request_timeout,
            "max_retries": self.config.max_retries,
            "stream_usage": True,
            # A stalled stream is given up on by the transport itself: `timeout` is also the
            # limit for each socket read, streamed or not. LangChain's own per-chunk limit
            # would wrap every chunk in `asyncio.wait_for` (a task per chunk), which was two
            # thirds of langchain-openai's CPU time per streamed reply.
            "stream_chunk_timeout": None,
            # llama.cpp's server drops kept-alive connections after a stream now and then:
            # its models get a client without keep-alive.
            "http_async_client": (
                self.local.http_client() if spec.is_local and self.local else self._http_client()
            ),
        }
        if spec.temperature is not None:
            options["temperature"] = spec.temperature
        if spec.max_tokens is not None:
            options["max_tokens"] = spec.max_tokens
        model: ChatOpenAI | AzureChatOpenAI
        if spec.provider == "azure-openai":
            model = AzureChatOpenAI(
                azure_endpoint=base_url,
                azure_deployment=spec.azure_deployment,
                api_version=spec.api_version,
                **options,
            )
        else:
            # Chat Completions, not the Responses API: it is what every compatible server speaks.
            cls = ChatOpenAI if spec.provider == "openai" else CompatibleChatOpenAI
            model = cls(base_url=base_url, use_responses_api=False, **options)
        # ChatOpenAI calls `async_client.create(...)` for chat completions; its own client
        # (base URL, key, Azure deployment, retries, timeouts) stays underneath.
        model.async_client = PlainCompletions(model.root_async_client)
        return model
