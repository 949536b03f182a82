"""`switchboard models check`: can each model answer a tiny prompt right now?"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from langchain_core.messages import HumanMessage

from chains.failures import classify_failure
from chains.models import ChatModelFactory
from chains.registry import ModelSpec
from chains.tokens import content_text

CHECK_PROMPT = "Reply with the single word: pong"
CHECK_TIMEOUT = 20.0
CHECK_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class CheckResult:
    """How one model's check went."""

    name: str
    ok: bool
    latency_ms: float | None
    detail: str


async def check_model(
    spec: ModelSpec, factory: ChatModelFactory, limit_s: float = CHECK_TIMEOUT
) -> CheckResult:
    """Send `spec` a tiny prompt through the streaming path the bot uses; never raises for model failures."""
    try:
        # Building may start a local server; only the answer itself is timed.
        model = await factory.get(spec)
        started = time.perf_counter()
        text = ""
        usage = None
        async with asyncio.timeout(limit_s):
            async for chunk in model.astream(
                [HumanMessage(CHECK_PROMPT)], max_tokens=CHECK_MAX_TOKENS
            ):
                text += content_text(chunk.content)
                usage = getattr(chunk, "usage_metadata", None) or usage
        latency_ms = (time.perf_counter() - started) * 1000
    except Exception as exc:  # every failure becomes a line in the report
        failure = classify_failure(exc, spec.name, spec.api_key_env, factory.redact)
        return CheckResult(spec.name, ok=False, latency_ms=None, detail=failure.message)
    # Some proxies answer 200 with an error text that repeats the key.
    reply = factory.redact(" ".join(text.split()))
    shown = reply if len(reply) <= 40 else reply[:39] + "…"
    tokens = f", {usage['input_tokens']}+{usage['output_tokens']} tokens" if usage else ""
    return CheckResult(
        spec.name, ok=True, latency_ms=latency_ms, detail=f"answered {shown!r}{tokens}"
    )
