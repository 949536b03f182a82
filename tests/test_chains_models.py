"""The chat model factory and failure classification, through the real ChatOpenAI against the fake server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import httpx
import httpx2
import openai
import pytest
import tiktoken.load
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_openai import AzureChatOpenAI, ChatOpenAI

import chains.models
from bot.app import client_config
from chains.chat import build_messages, create_chat_chain
from chains.check import check_model
from chains.failures import ContextTooLong, MissingApiKey, ModelFailure, classify_failure
from chains.models import ChatModelFactory, PlainCompletions
from chains.registry import ModelSpec
from core.errors import ConfigError, UserError
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI

KEY = "sk-test-0123456789abcdef"

MakeFactory = Callable[..., ChatModelFactory]


@pytest.fixture
async def factory() -> AsyncIterator[MakeFactory]:
    """Builds factories over test settings (keys in a private environ) and closes them afterwards."""
    made: list[ChatModelFactory] = []

    def make(local: object = None, **overrides: object) -> ChatModelFactory:
        options: dict[str, object] = {"max_retries": 0, "request_timeout": 10.0, **overrides}
        settings = Settings(environ={"OPENAI_API_KEY": KEY, "AZURE_OPENAI_API_KEY": KEY}, **options)
        made.append(ChatModelFactory(client_config(settings), local))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for one in made:
        await one.aclose()


def openai_spec(fake: FakeOpenAI, **extra: object) -> ModelSpec:
    return ModelSpec(
        name="gpt-4o-mini", provider="openai", model="gpt-4o-mini", base_url=fake.base_url, **extra
    )


async def stream(model: BaseChatModel, text: str = "hello") -> tuple[str, AIMessageChunk]:
    """Stream a reply the way the service does; return the text and the summed chunk."""
    total: AIMessageChunk | None = None
    async for chunk in create_chat_chain(model).astream([HumanMessage(text)]):
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total is not None
    return str(total.content), total


async def failure_of(model: BaseChatModel, spec: ModelSpec) -> ModelFailure:
    with pytest.raises(Exception) as caught:
        await stream(model)
    return classify_failure(caught.value, spec.name, spec.api_key_env)


# -- building and streaming -----------------------------------------------------------------


async def test_openai_model_streams_with_usage(factory: MakeFactory) -> None:
    async with FakeOpenAI(api_keys={KEY}) as fake:
        spec = openai_spec(fake, temperature=0.3, max_tokens=200)
        model = await factory().get(spec)
        assert isinstance(model, ChatOpenAI)
        text, total = await stream(model, "stream please")
    assert text == "Echo: stream please"
    assert total.usage_metadata is not None
    assert total.usage_metadata["input_tokens"] > 0 and total.usage_metadata["output_tokens"] > 0
    [request] = fake.chat_requests
    assert request.stream and request.body["stream_options"] == {"include_usage": True}
    assert request.model == "gpt-4o-mini"
    assert request.body["temperature"] == 0.3 and request.body["max_completion_tokens"] == 200


async def test_idle_connections_are_kept_for_the_next_message(
    factory: MakeFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within KEEPALIVE_S the next answer reuses the connection; after it, a new one is opened."""
    assert chains.models.KEEPALIVE_S >= 30  # longer than most pauses between messages
    monkeypatch.setattr(chains.models, "KEEPALIVE_S", 0.5)
    model = await factory().get(openai_spec(fake_openai))
    await stream(model, "first")
    await asyncio.sleep(0.1)
    await stream(model, "soon after")
    await asyncio.sleep(1.2)
    await stream(model, "much later")
    first, soon, later = (r.client_port for r in fake_openai.chat_requests)
    assert first is not None and soon == first and later != first


async def test_plain_dict_chunks_match_the_sdk_objects(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    """Our models read the provider's JSON as dicts; LangChain must see exactly what the SDK path gives."""
    spec = openai_spec(fake_openai, max_tokens=50)
    ours = await factory().get(spec)
    assert isinstance(ours, ChatOpenAI) and isinstance(ours.async_client, PlainCompletions)
    async with openai.DefaultAsyncHttpxClient() as http:
        sdk = ChatOpenAI(
            base_url=fake_openai.base_url,
            api_key=KEY,
            model="gpt-4o-mini",
            max_tokens=50,
            stream_usage=True,
            http_async_client=http,
        )
        _, mine = await stream(ours, "same for both")
        _, theirs = await stream(sdk, "same for both")
    assert mine.content == theirs.content == "Echo: same for both"
    assert mine.usage_metadata == theirs.usage_metadata
    assert mine.response_metadata == theirs.response_metadata
    first, second = fake_openai.chat_requests
    assert first.body == second.body  # the same request on the wire
    invoked = await ours.ainvoke([HumanMessage("not streamed")])
    assert invoked.content == "Echo: not streamed" and invoked.usage_metadata is not None


async def test_openai_compatible_without_key_env_sends_a_placeholder(factory: MakeFactory) -> None:
    async with FakeOpenAI(api_keys={"not-needed"}) as fake:
        spec = ModelSpec(
            name="llama3", provider="openai-compatible", model="llama3.1", base_url=fake.base_url
        )
        text, total = await stream(await factory().get(spec), "hi ollama")
    assert text == "Echo: hi ollama"
    assert total.usage_metadata is not None
    [request] = fake.chat_requests
    assert request.model == "llama3.1"
    assert "temperature" not in request.body and "max_tokens" not in request.body


async def test_compatible_servers_get_max_tokens(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    spec = ModelSpec(
        name="vllm", provider="openai-compatible", base_url=fake_openai.base_url, max_tokens=3
    )
    text, _ = await stream(await factory().get(spec), "one two three four five")
    body = fake_openai.chat_requests[0].body
    assert body["max_tokens"] == 3 and "max_completion_tokens" not in body
    assert text == "Echo: one"  # the fake honoured the limit (3 tokens)


async def test_azure_model_streams_through_the_deployment_path(factory: MakeFactory) -> None:
    async with FakeOpenAI(api_keys={KEY}) as fake:
        spec = ModelSpec(
            name="azure-4o",
            provider="azure-openai",
            model="gpt-4o",
            deployment="prod-4o",
            base_url=fake.root_url,
            api_version="2024-10-21",
        )
        model = await factory().get(spec)
        assert isinstance(model, AzureChatOpenAI)
        text, total = await stream(model, "hi azure")
    assert text == "Echo: hi azure"
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] > 0
    [request] = fake.chat_requests
    assert request.path == "/openai/deployments/prod-4o/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}


class PointsAtFake:
    """Stands in for chains.local.LocalServers: `ensure(spec) -> base_url` and its HTTP client."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.ensured: list[str] = []
        self.client = httpx.AsyncClient()

    async def ensure(self, spec: ModelSpec) -> str:
        self.ensured.append(spec.name)
        return self.base_url

    def http_client(self) -> httpx.AsyncClient:
        return self.client


async def test_llama_cpp_model_uses_the_local_server_and_follows_its_port(
    factory: MakeFactory,
) -> None:
    spec = ModelSpec(name="smollm2", provider="llama.cpp", bundled="smollm2-135m-instruct")
    async with FakeOpenAI() as first, FakeOpenAI() as second:
        local = PointsAtFake(first.base_url)
        models = factory(local=local)
        model = await models.get(spec)
        assert await models.get(spec) is model  # cached while the server stays put
        assert (await stream(model, "local"))[0] == "Echo: local"
        local.base_url = second.base_url  # restarted on another port
        moved = await models.get(spec)
        assert moved is not model
        assert (await stream(moved, "moved"))[0] == "Echo: moved"
    assert len(first.chat_requests) == 1 and len(second.chat_requests) == 1
    assert local.ensured == ["smollm2"] * 3
    assert model.http_async_client is local.client, "local models use the local servers' client"
    await local.client.aclose()


async def test_llama_cpp_without_local_servers_is_a_config_error(factory: MakeFactory) -> None:
    spec = ModelSpec(name="smollm2", provider="llama.cpp", bundled="smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="runs locally with llama.cpp"):
        await factory().get(spec)


async def test_models_are_cached_per_spec(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    models = factory()
    spec = openai_spec(fake_openai)
    model = await models.get(spec)
    assert await models.get(spec) is model
    changed = await models.get(spec.model_copy(update={"temperature": 1.0}))
    assert changed is not model


async def test_missing_key_names_the_variable(fake_openai: FakeOpenAI) -> None:
    models = ChatModelFactory(client_config(Settings(environ={})))
    spec = openai_spec(fake_openai)
    with pytest.raises(MissingApiKey) as caught:
        await models.get(spec)
    assert isinstance(caught.value, UserError)
    assert str(caught.value) == "Model 'gpt-4o-mini' needs an API key: set OPENAI_API_KEY."
    failure = classify_failure(caught.value, spec.name)
    assert (failure.kind, failure.message, failure.fallback_ok) == (
        "bad_key",
        str(caught.value),
        True,
    )
    custom = ModelSpec(
        name="vllm",
        provider="openai-compatible",
        base_url=fake_openai.base_url,
        api_key_env="VLLM_KEY",
    )
    with pytest.raises(MissingApiKey, match=r"set VLLM_KEY\.$"):
        await models.get(custom)
    await models.aclose()


async def test_nothing_counts_tokens_through_langchain(
    factory: MakeFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("tried to download a tiktoken vocabulary")

    def no_counting(*args: object, **kwargs: object) -> int:
        raise AssertionError("ChatOpenAI.get_num_tokens* was called")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_download)
    for name in ("get_num_tokens", "get_num_tokens_from_messages", "get_token_ids"):
        monkeypatch.setattr(ChatOpenAI, name, no_counting)
    models = factory()
    spec = openai_spec(fake_openai)
    system, history, question = build_messages(None, [("user", "a"), ("assistant", "b")], "c")
    async for _ in create_chat_chain(await models.get(spec)).astream(system + history + question):
        pass
    assert (await check_model(spec, models)).ok


# -- retries ---------------------------------------------------------------------------------


async def test_the_client_retries_a_500_then_succeeds(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(500, times=1)  # no Retry-After: the client's own backoff
    model = await factory(max_retries=2).get(openai_spec(fake_openai))
    text, _ = await stream(model, "again")
    assert text == "Echo: again"
    assert [r.headers.get("x-stainless-retry-count") for r in fake_openai.chat_requests] == [
        "0",
        "1",
    ]


async def test_more_failures_than_retries_fail_and_are_classified(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(503, times=3, retry_after=0.01)
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory(max_retries=2).get(spec), spec)
    assert len(fake_openai.chat_requests) == 3
    assert failure.kind == "server_error" and failure.fallback_ok
    assert (
        failure.message
        == "gpt-4o-mini's provider had a server error (HTTP 503). Try again shortly."
    )


# -- classification against the real client ---------------------------------------------------


async def test_rate_limited(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(429)
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure == ModelFailure(
        "rate_limited",
        "gpt-4o-mini is rate limited by its provider (HTTP 429). Try again in a minute.",
        True,
        429,
    )


async def test_out_of_quota(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(
        429, message="You exceeded your current quota.", code="insufficient_quota"
    )
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "rate_limited" and "run out of quota" in failure.message


async def test_bad_key_never_shows_the_key(factory: MakeFactory) -> None:
    async with FakeOpenAI(api_keys={"sk-the-right-one-000"}) as fake:
        spec = openai_spec(fake)
        failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "bad_key" and failure.fallback_ok and failure.status == 401
    assert failure.message == "gpt-4o-mini rejected its API key (HTTP 401): check OPENAI_API_KEY."
    assert KEY not in failure.message and KEY[-4:] not in failure.message


async def test_server_error(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(500)
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "server_error" and failure.status == 500
    assert "HTTP 500" in failure.message and failure.message.startswith("gpt-4o-mini")


async def test_connection_refused_names_the_address(factory: MakeFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = ModelSpec(
        name="gone", provider="openai-compatible", base_url=f"http://127.0.0.1:{port}/v1"
    )
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "unreachable" and failure.fallback_ok
    assert failure.message == (
        f"gone is unreachable (connection refused at http://127.0.0.1:{port}/v1/chat/completions)."
    )


async def test_timeout(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.hang(30)
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory(request_timeout=0.3).get(spec), spec)
    assert failure.kind == "timeout" and failure.fallback_ok
    assert failure.message == "gpt-4o-mini took too long to answer and was given up on."


async def test_stalled_stream_times_out(factory: MakeFactory) -> None:
    async with FakeOpenAI(token_delay=30) as fake:
        spec = openai_spec(fake)
        failure = await failure_of(await factory(request_timeout=0.3).get(spec), spec)
    assert failure.kind == "timeout"


async def test_context_length_exceeded(factory: MakeFactory) -> None:
    async with FakeOpenAI(context_window=50) as fake:
        spec = openai_spec(fake)
        model = await factory().get(spec)
        with pytest.raises(Exception) as caught:
            await stream(model, "word " * 200)
    failure = classify_failure(caught.value, spec.name)
    assert failure.kind == "context_too_long" and failure.fallback_ok
    assert failure.message == "The conversation is too long for gpt-4o-mini's context window."


async def test_llama_cpp_style_context_error(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(
        400,
        message="the request exceeds the available context size, try increasing it",
        code="exceed_context_size_error",
    )
    spec = openai_spec(fake_openai)
    assert (await failure_of(await factory().get(spec), spec)).kind == "context_too_long"


async def test_other_bad_requests_quote_the_provider_but_not_keys(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(
        400, message="Unsupported parameter: 'temperature' (key sk-abcdefghijklmnop)."
    )
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "bad_request" and failure.fallback_ok
    assert "Unsupported parameter: 'temperature'" in failure.message
    assert "sk-abcdefghijklmnop" not in failure.message and "[redacted]" in failure.message


async def test_content_policy_refusal_does_not_fall_back(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(400, message="The response was filtered.", code="content_filter")
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "bad_request" and failure.fallback_ok is False
    assert "content policy" in failure.message


async def test_connection_dropped_mid_stream(factory: MakeFactory, fake_openai: FakeOpenAI) -> None:
    fake_openai.drop_mid_stream(after_chunks=2)
    spec = openai_spec(fake_openai)
    failure = await failure_of(await factory().get(spec), spec)
    assert failure.kind == "server_error"
    assert (
        failure.message
        == "gpt-4o-mini's connection broke off in the middle of the answer. Try again."
    )


def test_plain_exceptions_are_classified() -> None:
    assert classify_failure(TimeoutError(), "m").kind == "timeout"
    assert classify_failure(ConnectionRefusedError(), "m").kind == "unreachable"
    too_long = ContextTooLong("too long", "m", 10, 5)
    assert classify_failure(too_long, "m").kind == "context_too_long"
    weird = classify_failure(KeyError("x"), "m")
    assert weird == ModelFailure("unknown", "m failed unexpectedly (KeyError).", True)
    try:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert classify_failure(outer, "m").kind == "unreachable"


def _raised_as_openai_timeout(cause: BaseException) -> BaseException:
    """What openai's aiohttp transport raises for any aiohttp connection error: a timeout on top."""
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    try:
        try:
            try:
                raise cause
            except Exception as exc:
                raise httpx2.ConnectTimeout(str(exc)) from exc
        except httpx2.ConnectTimeout as exc:
            raise openai.APITimeoutError(request=request) from exc
    except openai.APITimeoutError as outer:
        return outer


def test_aiohttp_errors_under_a_timeout_are_told_apart() -> None:
    dropped = classify_failure(_raised_as_openai_timeout(aiohttp.ServerDisconnectedError()), "m")
    assert dropped.kind == "server_error" and "broke off" in dropped.message
    slow = classify_failure(
        _raised_as_openai_timeout(aiohttp.SocketTimeoutError("read timed out")), "m"
    )
    assert slow.kind == "timeout"
    assert classify_failure(_raised_as_openai_timeout(RuntimeError("x")), "m").kind == "timeout"


async def test_check_model_reports_success_and_failure(
    factory: MakeFactory, fake_openai: FakeOpenAI
) -> None:
    models = factory()
    spec = openai_spec(fake_openai)
    good = await check_model(spec, models)
    assert (
        good.ok
        and good.name == "gpt-4o-mini"
        and good.latency_ms is not None
        and good.latency_ms >= 0
    )
    assert "Echo: Reply with the single word: pong" in good.detail or "answered" in good.detail
    assert fake_openai.chat_requests[-1].body["max_completion_tokens"] == 16
    fake_openai.fail_next(401)
    bad = await check_model(spec, models)
    assert not bad.ok and bad.latency_ms is None
    assert bad.detail == "gpt-4o-mini rejected its API key (HTTP 401): check OPENAI_API_KEY."
    fake_openai.hang(30)
    slow = await check_model(spec, models, limit_s=0.3)
    assert not slow.ok and "took too long" in slow.detail
    missing = await check_model(spec, ChatModelFactory(client_config(Settings(environ={}))))
    assert (
        not missing.ok
        and missing.detail == "Model 'gpt-4o-mini' needs an API key: set OPENAI_API_KEY."
    )
