"""Real llama.cpp servers with the bundled SmolLM2: answers, restarts, eviction, clean exits."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI

from chains.gguf import GGUFCorrupt, resolve_gguf
from chains.local import (
    LocalServerDied,
    LocalServerError,
    LocalServers,
    PortInUse,
    _Launch,
    _start_server,
    default_threads,
    local_http_client,
    validate_gguf,
)
from chains.registry import ModelSpec
from core.threads import usable_cores
from tests.fixtures.local import BUNDLED, local_server_children, process_running

pytestmark = pytest.mark.slow


def _chat(base_url: str, max_tokens: int = 48) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=base_url,
        api_key="not-needed",
        model="smollm2",
        temperature=0,
        max_tokens=max_tokens,
        stream_usage=True,
        max_retries=0,
        use_responses_api=False,
        http_async_client=local_http_client(),
    )


async def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    """Poll until `pid` is no longer running; False if it still runs after `seconds`."""
    deadline = time.monotonic() + seconds
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_bundled_model_streams_an_answer_with_usage_and_stops_cleanly(
    local_spec: Callable[..., ModelSpec],
) -> None:
    spec = local_spec()
    servers = LocalServers(max_loaded=1, startup_timeout=120.0)
    try:
        base_url = await servers.ensure(spec)
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        pid = servers.pid(spec)
        assert pid is not None and process_running(pid)

        chunks: list[AIMessageChunk] = []
        async for chunk in _chat(base_url).astream(
            [("system", "You are a helpful assistant."), ("user", "What is the capital of France?")]
        ):
            chunks.append(chunk)
        answer = "".join(str(c.content) for c in chunks)
        assert len([c for c in chunks if c.content]) > 1, (
            "the answer should arrive in several chunks"
        )
        assert "Paris" in answer
        usage = next(c.usage_metadata for c in chunks if c.usage_metadata)
        assert usage["input_tokens"] > 10 and usage["output_tokens"] > 0

        # Reused, not restarted; and a live server is not reported dead.
        assert await servers.ensure(spec) == base_url and servers.pid(spec) == pid
        await servers.raise_if_dead(spec)
    finally:
        await servers.aclose()
    assert not process_running(pid)
    assert local_server_children() == []


def _environment_of(pid: int) -> dict[str, str]:
    """The environment a process started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _argument_of(pid: int, option: str) -> str:
    """The value given to `option` on a process's command line."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return command[command.index(option) + 1]


@pytest.fixture
def busy_cores() -> Iterator[None]:
    """A CPU-bound neighbour process on every core, as another busy program would be."""
    neighbours = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())
    ]
    try:
        yield
    finally:
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()


async def test_answers_arrive_while_every_core_is_busy(
    local_servers: LocalServers,
    local_spec: Callable[..., ModelSpec],
    monkeypatch: pytest.MonkeyPatch,
    busy_cores: None,
) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    spec = local_spec()
    base_url = await local_servers.ensure(spec)
    pid = local_servers.pid(spec)
    assert pid is not None
    env = _environment_of(pid)
    threads = str(default_threads())
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"], env["OMP_NUM_THREADS"]) == (
        "PASSIVE",
        "0",
        threads,
    )
    assert _argument_of(pid, "--threads") == threads
    for question in ("Say hello.", "What is 2 + 2?", "Name a colour."):
        # Not a speed test: with spinning OpenMP threads single answers took 26-150 s here.
        reply = await asyncio.wait_for(
            _chat(base_url, max_tokens=16).ainvoke([("user", question)]), 60
        )
        assert str(reply.content).strip()


async def test_a_server_killed_mid_reply_is_reported_and_restarted(
    local_servers: LocalServers,
    local_spec: Callable[..., ModelSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = local_spec()
    # Concurrent first requests start one server, not three.
    urls = await asyncio.gather(*(local_servers.ensure(spec) for _ in range(3)))
    assert len(set(urls)) == 1 and len(local_server_children()) == 1
    pid = local_servers.pid(spec)
    assert pid is not None

    received: list[str] = []
    with pytest.raises(Exception) as failure:  # noqa: B017 - whatever the transport raises
        async for chunk in _chat(urls[0], max_tokens=400).astream(
            "Tell me a long story about a dragon."
        ):
            received.append(str(chunk.content))
            if len(received) == 3:
                os.kill(pid, signal.SIGKILL)
    assert not isinstance(failure.value, AssertionError)
    assert received, "the reply had started before the server died"
    # Right after the connection drops, as the service would ask.
    with pytest.raises(LocalServerDied, match="stopped while answering"):
        await local_servers.raise_if_dead(spec)
    assert not local_servers.is_alive(spec)
    assert await _wait_gone(pid)

    # Concurrent requests after the crash restart it once.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chains.local"):
        restarted = await asyncio.gather(*(local_servers.ensure(spec) for _ in range(3)))
    starts = [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"llama.cpp server for {spec.name} on")
    ]
    assert len(starts) == 1, (
        "three concurrent requests after a crash should restart the server once"
    )
    assert len(set(restarted)) == 1 and len(local_server_children()) == 1
    base_url = restarted[0]
    new_pid = local_servers.pid(spec)
    assert new_pid is not None and new_pid != pid and local_servers.is_alive(spec)
    assert base_url == urls[0], "a restarted server keeps its port when it can"
    reply = await _chat(base_url, max_tokens=8).ainvoke("Hello")
    assert reply.content


async def test_truncated_gguf_reports_llama_cpp_reason_and_leaves_no_process(
    local_servers: LocalServers, local_spec: Callable[..., ModelSpec], truncated_gguf: Path
) -> None:
    with pytest.raises(GGUFCorrupt, match="could not load the GGUF file") as failure:
        await local_servers.ensure(local_spec("broken", path=str(truncated_gguf)))
    assert "corrupted or incomplete" in str(failure.value) or "damaged" in str(failure.value)
    assert local_servers.loaded() == []
    assert local_server_children() == []
    with pytest.raises(GGUFCorrupt):
        await validate_gguf(truncated_gguf)
    assert local_server_children() == []


async def test_an_adapter_llama_cpp_refuses_is_named_and_leaves_no_process(
    local_servers: LocalServers, local_spec: Callable[..., ModelSpec], tmp_path: Path
) -> None:
    import gguf
    import numpy as np

    # A llama LoRA header whose first tensor does not fit SmolLM2's query projection (576 x 576).
    path = tmp_path / "wrong-shape.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 100), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((576, 2), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFCorrupt, match="could not load the LoRA adapter") as failure:
        await local_servers.ensure(local_spec("cand", lora=str(path)))
    assert "incorrect shape" in str(failure.value) and "\n" not in str(failure.value)
    assert local_servers.loaded() == [] and local_server_children() == []


async def test_validate_gguf_loads_the_bundled_model_and_stops_it(
    local_spec: Callable[..., ModelSpec],
) -> None:
    from chains.gguf import bundled_models

    info = await validate_gguf(bundled_models()[BUNDLED])
    assert info.architecture == "llama"
    assert local_server_children() == []


async def test_least_recently_used_model_is_stopped_beyond_max_loaded(
    local_spec: Callable[..., ModelSpec],
) -> None:
    first, second = local_spec("first"), local_spec("second")
    async with LocalServers(max_loaded=1, startup_timeout=120.0) as servers:
        await servers.ensure(first)
        first_pid = servers.pid(first)
        await servers.ensure(second)
        assert first_pid is not None and await _wait_gone(first_pid)
        assert servers.loaded() == ["second"]
        second_pid = servers.pid(second)
        await servers.ensure(first)
        assert second_pid is not None and await _wait_gone(second_pid)
        assert servers.loaded() == ["first"]
        assert len(local_server_children()) == 1
    assert local_server_children() == []


async def test_a_taken_port_is_reported(local_servers: LocalServers) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A restarted server asks for the port it had; here another program holds it.
        path = resolve_gguf(SimpleNamespace(path=None, bundled=BUNDLED))
        launch = _Launch(path=path, ctx=512, parallel=1, threads=1, port=port)
        with pytest.raises(PortInUse, match=f"Port {port} on 127.0.0.1 is already in use"):
            await _start_server("fixed", launch, local_servers.startup_timeout)
    assert local_server_children() == []


@pytest.mark.parametrize(
    "how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "ctrl-c", "term"]
)
def test_server_exits_when_its_parent_is_killed(how: signal.Signals, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, faulthandler, signal
        faulthandler.register(signal.SIGUSR1)  # where it is stuck, if it ever is
        # Ctrl-C as a program started from a terminal has it. A child inherits ignored
        # signals and Python keeps SIGINT ignored then: a test worker process whose
        # SIGINT some earlier test left ignored hung this test twice under pytest-xdist.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
        from chains.local import LocalServers
        from chains.registry import ModelSpec

        async def main():
            # As Switchboard's commands do (a SIGTERM handler on the loop): the loop's
            # wakeup fd. Without one, a SIGINT that the kernel hands to a worker thread
            # (to_thread's) leaves the main thread asleep in select() until its timeout
            # (CPython 3.11; shown with pthread_kill: 8 s instead of 0.5 s).
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, lambda: None)
            servers = LocalServers(startup_timeout=120)
            spec = ModelSpec(name="s", provider="llama.cpp", bundled="{BUNDLED}", context_size=512)
            url = await servers.ensure(spec)
            print(servers.pid(spec), url, flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    errors = tmp_path / "parent.stderr"
    with errors.open("wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=Path(__file__).parents[1],
        )
    try:
        assert parent.stdout is not None
        pid_text, url = parent.stdout.readline().decode().split()
        child = int(pid_text)
        assert process_running(child)
        assert httpx.get(url.removesuffix("/v1") + "/health", trust_env=False).status_code == 200
        parent.send_signal(how)
        try:
            parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            status = Path(f"/proc/{parent.pid}/status").read_text()
            masks = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn"))]
            parent.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail(
                f"the parent did not exit on {how.name} ({', '.join(masks)}):\n"
                f"{errors.read_text()[-4000:]}"
            )
        deadline = time.monotonic() + 20
        while process_running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_running(child), f"the llama.cpp server outlived its parent ({how.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout:
            parent.stdout.close()


async def test_aclose_during_a_start_leaves_no_server(local_spec: Callable[..., ModelSpec]) -> None:
    servers = LocalServers(startup_timeout=120.0)
    starting = asyncio.create_task(servers.ensure(local_spec()))
    for _ in range(10_000):  # until the child exists: the model is loading
        if local_server_children():
            break
        await asyncio.sleep(0.01)
    await servers.aclose()
    with pytest.raises(LocalServerError, match="shutting down"):
        await starting
    assert local_server_children() == []
