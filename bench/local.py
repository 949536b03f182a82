"""local: the bundled SmolLM2 through Switchboard's service vs. straight to its llama.cpp server.

One llama.cpp server (the bundled SmolLM2-135M-Instruct, started by `LocalServers` as
the bot would) answers both sides:

- direct: a raw streaming POST to its `/v1/chat/completions` with httpx (one fresh
  loopback connection per request), the messages the service would send;
- service: `ChatService.stream(ChatRequest)` from `bot.app.open_app`, i.e. settings
  lookup, conversation bookkeeping, token trimming, the LangChain chain, ChatOpenAI,
  and logging to SQLite.

Each request is the same fixed question in a new conversation (so both sides send the
same [system, user] messages), temperature 0 and the same `max_tokens`, so both get the
same tokens. The sides alternate request by request, so drift in the machine's load
hits both alike.

Measures per request: TTFT (request start to the first non-empty text piece) and
tokens/s = completion tokens / (request start to the last piece), i.e. end-to-end
throughput, which already includes TTFT. The decode rate (tokens after the first, over
the time after the first) is shown too.

Last line: `local: ratio X (goal >= 0.95)`, X = service p50 tokens/s / direct p50 tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench._support import percentile
from bot.app import open_app
from chains.chat import DEFAULT_SYSTEM_PROMPT, build_messages, messages_to_dicts
from core.messages import Author, ChatRequest, Place, ReplyDelta, ReplyFinished
from core.settings import Settings

ROUNDS = 8
WARMUP = 2
MAX_TOKENS = 128
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
GOAL = 0.95


@dataclass(frozen=True, slots=True)
class Sample:
    """One request's timings."""

    ttft_s: float
    total_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s

    @property
    def decode_per_s(self) -> float:
        return (self.tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)


class _RetryCounter(logging.Handler):
    """Counts the openai client's retries: each one is a failed connection plus a back-off."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Retrying request" in record.getMessage():
            self.count += 1


def _settings(folder: Path) -> Settings:
    """A throwaway data folder whose only model is the bundled SmolLM2, deterministic and capped."""
    config = folder / "switchboard.toml"
    config.write_text(
        'default_model = "smol"\n'
        "[models.smol]\n"
        'provider = "llama.cpp"\n'
        'bundled = "smollm2-135m-instruct"\n'
        "context_size = 2048\n"
        "temperature = 0\n"
        f"max_tokens = {MAX_TOKENS}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return Settings(config=config, data_dir=folder / "data", environ=env, max_local_models=1)


async def direct(
    client: httpx.AsyncClient, base_url: str, messages: list[dict[str, object]]
) -> Sample:
    """The request sent straight to the llama.cpp server, streamed with a raw HTTP client."""
    body = {
        "model": "smol",
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    if not first or not tokens:
        raise RuntimeError("the llama.cpp server sent no text or no usage")
    return Sample(first - start, last - start, tokens)


async def service_side(service: object, round_no: int) -> Sample:
    """The same question through ChatService.stream, in a new conversation."""
    request = ChatRequest(
        Place(guild_id=1, channel_id=1000 + round_no), Author(7, "bench"), QUESTION
    )
    start = time.perf_counter()
    first = last = 0.0
    result = None
    async for event in service.stream(request):  # type: ignore[attr-defined]
        if isinstance(event, ReplyDelta) and event.text:
            last = time.perf_counter()
            first = first or last
        elif isinstance(event, ReplyFinished):
            result = event.result
    if result is None or result.error or not first or result.usage is None:
        raise RuntimeError(f"the service did not answer: {getattr(result, 'error', None)}")
    return Sample(first - start, last - start, result.usage.completion_tokens)


async def run() -> float:
    console = Console()
    retries = _RetryCounter()
    openai_log = logging.getLogger("openai")
    openai_log.addHandler(retries)
    openai_log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-local-") as tmp:
        settings = _settings(Path(tmp))
        async with open_app(settings, knowledge=False) as sb:
            spec = sb.registry.get("smol")
            with console.status("starting the bundled model…"):
                base_url = await sb.local.ensure(spec)
            system, past, question = build_messages(DEFAULT_SYSTEM_PROMPT, [], QUESTION, [])
            messages = messages_to_dicts([*system, *past, *question])
            direct_samples: list[Sample] = []
            service_samples: list[Sample] = []
            # A fresh loopback connection per request (see chains.local.local_http_client).
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
                for i in range(WARMUP + ROUNDS):
                    # Alternate which side goes first, too.
                    order = ("direct", "service") if i % 2 == 0 else ("service", "direct")
                    for side in order:
                        if side == "direct":
                            sample = await direct(client, base_url, messages)
                            target = direct_samples
                        else:
                            sample = await service_side(sb.service, i)
                            target = service_samples
                        if i >= WARMUP:
                            target.append(sample)
            await sb.writer.drain()

    table = Table(
        title=f"local: bundled SmolLM2-135M, {ROUNDS} requests per side, max_tokens {MAX_TOKENS}, temperature 0"
    )
    for col in (
        "path",
        "p50 TTFT ms",
        "p90 TTFT ms",
        "p50 tokens/s (end to end)",
        "p50 decode tokens/s",
        "tokens",
    ):
        table.add_column(col)
    for name, samples in (
        ("direct to llama.cpp (httpx)", direct_samples),
        ("Switchboard ChatService.stream", service_samples),
    ):
        table.add_row(
            name,
            f"{percentile([s.ttft_s * 1000 for s in samples], 50):.1f}",
            f"{percentile([s.ttft_s * 1000 for s in samples], 90):.1f}",
            f"{percentile([s.tokens_per_s for s in samples], 50):.1f}",
            f"{percentile([s.decode_per_s for s in samples], 50):.1f}",
            f"{percentile([float(s.tokens) for s in samples], 50):.0f}",
        )
    console.print(table)
    console.print(f"openai client retries on the service side: {retries.count}")
    openai_log.removeHandler(retries)
    return percentile([s.tokens_per_s for s in service_samples], 50) / percentile(
        [s.tokens_per_s for s in direct_samples], 50
    )


def main() -> int:
    ratio = asyncio.run(run())
    print(f"local: ratio {ratio:.2f} (goal >= {GOAL})")
    return 0
