"""The terminal chat: the same service as the bot, as if the terminal were a Discord channel.

`TerminalChat` turns typed lines into `ChatRequest`s and commands; `run_interactive`
and `run_json` render them for a person or for a program (one JSON object per line).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console

from bot.cli_common import models_table
from bot.present import change_line, models_text
from bot.service import ChatService
from core.errors import UserError, apology, report_unexpected
from core.messages import (
    Author,
    ChatEvent,
    ChatRequest,
    ChatResult,
    FallbackUsed,
    Place,
    ReplyDelta,
    ReplyFinished,
    Scope,
)

log = logging.getLogger(__name__)

HELP = """Commands:
  /model list              the models you can choose
  /model set NAME          answer with NAME here
  /model info NAME         what NAME is
  /model reset             inherit the model again
  /system set TEXT         set the system prompt here
  /system show             show the system prompt in force
  /system reset            inherit the system prompt again
  /knowledge on|off        answer from the server's knowledge base, or not
  /settings                the settings in force here and where each comes from
  /new                     start a new conversation
  /quit                    leave (Ctrl-D works too)"""


def user_id_for(name: str) -> int:
    """A stable id for a terminal user name, so their history and settings persist."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


@dataclass
class CommandResult:
    """What a `/command` did."""

    command: str
    ok: bool
    message: str
    quit: bool = False


class TerminalChat:
    """A conversation in the terminal, in one place, as one user."""

    def __init__(self, service: ChatService, place: Place, author: Author) -> None:
        self.service = service
        self.place = place
        self.author = author
        self.conversation_id: str | None = None

    @property
    def scope(self) -> Scope:
        return "thread" if self.place.thread_id is not None else "channel"

    async def send(self, text: str) -> AsyncIterator[ChatEvent]:
        """Send a message in the current conversation (starting one if needed)."""
        request = ChatRequest(self.place, self.author, text, conversation_id=self.conversation_id)
        admission = self.service.admit(request)  # the service exempts the terminal today
        if not admission.allowed:
            raise UserError(f"Too many messages: wait {math.ceil(admission.retry_after)} s.")
        async for event in self.service.stream(request):
            if isinstance(event, ReplyFinished):
                self.conversation_id = event.result.conversation_id
            yield event

    async def command(self, line: str) -> CommandResult:
        """Run a `/command` line; user errors come back as a failed result."""
        try:
            words = shlex.split(line[1:])
        except ValueError:
            words = line[1:].split()
        name = " ".join(words[:2]) if words else ""
        try:
            return await self._dispatch(words, line)
        except UserError as exc:
            return CommandResult(name, False, exc.message)

    async def _dispatch(self, words: list[str], line: str) -> CommandResult:
        svc, place, who = self.service, self.place, self.author
        head = words[0] if words else ""
        sub = words[1] if len(words) > 1 else ""
        rest = line.split(None, 2)[2].strip() if len(line.split(None, 2)) > 2 else ""
        name = f"{head} {sub}".strip()
        if head in {"quit", "exit"}:
            return CommandResult(head, True, "Bye.", quit=True)
        if head == "help":
            return CommandResult(head, True, HELP)
        if head == "new":
            self.conversation_id = None
            return CommandResult(head, True, "Started a new conversation.")
        if head == "settings":
            eff = await svc.effective_settings(place)
            prompt = eff.system_prompt.value
            lines = [
                f"model: {eff.model.value} (from {eff.model.source})",
                f"system prompt: {prompt[:80]}{'…' if len(prompt) > 80 else ''} (from {eff.system_prompt.source})",
                f"knowledge: {'on' if eff.knowledge.value else 'off'} (from {eff.knowledge.source})",
            ]
            return CommandResult(head, True, "\n".join(lines))
        if head == "model" and sub == "list":
            return CommandResult(name, True, models_text(svc.list_models(), svc.default_model))
        if head == "model" and sub == "set" and len(words) > 2:
            return CommandResult(
                name, True, change_line(await svc.set_model(place, self.scope, words[2], who))
            )
        if head == "model" and sub == "info" and len(words) > 2:
            spec = await svc.get_model(words[2])
            info = json.dumps(spec.to_public_dict(), indent=2, default=str)
            return CommandResult(name, True, info)
        if head == "model" and sub == "reset":
            return CommandResult(
                name, True, change_line(await svc.reset_model(place, self.scope, who))
            )
        if head == "system" and sub == "set" and rest:
            return CommandResult(
                name, True, change_line(await svc.set_system_prompt(place, self.scope, rest, who))
            )
        if head == "system" and sub == "show":
            eff = await svc.effective_settings(place)
            return CommandResult(
                name, True, f"(from {eff.system_prompt.source})\n{eff.system_prompt.value}"
            )
        if head == "system" and sub == "reset":
            return CommandResult(
                name, True, change_line(await svc.reset_system_prompt(place, self.scope, who))
            )
        if head == "knowledge" and sub in {"on", "off"}:
            return CommandResult(
                name,
                True,
                change_line(await svc.set_knowledge(place, self.scope, sub == "on", who)),
            )
        raise UserError(
            f"Unknown or incomplete command `/{' '.join(words)}`. Type /help for the list."
        )


def result_json(result: ChatResult) -> dict[str, Any]:
    """The JSON object `chat --json` prints for a reply."""
    return {
        "reply": result.reply if result.error is None or result.reply else None,
        "model": result.model,
        "conversation_id": result.conversation_id,
        "message_id": result.message_id,
        "latency_ms": round(result.latency_ms, 1) if result.latency_ms is not None else None,
        "usage": (
            {
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
                "total_tokens": result.usage.total_tokens,
            }
            if result.usage
            else None
        ),
        "cost_usd": result.cost_usd,
        "fallback_from": result.fallback_from,
        "error": result.error,
        "log_problem": result.log_problem,
        "sources": [
            {
                "document": s.document,
                "location": s.location,
                "chunk_id": s.chunk_id,
                "score": round(s.score, 4),
            }
            for s in result.sources
        ],
    }


async def _lines(stream: TextIO) -> AsyncIterator[str]:
    """Lines from a blocking text stream, read off the event loop."""
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def run_json(
    chat: TerminalChat, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout
) -> int:
    """Read one line at a time; print exactly one JSON object per line. Exit 0 at end of input."""

    def emit(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        stdout.flush()

    async for line in _lines(stdin):
        if not line.strip():
            continue
        if line.startswith("/"):
            result = await chat.command(line)
            emit({"command": result.command, "ok": result.ok, "message": result.message})
            if result.quit:
                break
            continue
        emit(await _reply_json(chat, line))
    return 0


async def _reply_json(chat: TerminalChat, line: str) -> dict[str, Any]:
    empty = dict.fromkeys(
        [
            "reply",
            "model",
            "conversation_id",
            "message_id",
            "latency_ms",
            "usage",
            "cost_usd",
            "fallback_from",
        ]
    )
    try:
        async for event in chat.send(line):
            if isinstance(event, ReplyFinished):
                return result_json(event.result)
    except UserError as exc:
        return {
            **empty,
            "conversation_id": chat.conversation_id,
            "error": exc.message,
            "sources": [],
        }
    except Exception as exc:
        error_id = report_unexpected(log, exc, "answering in the terminal")
        return {
            **empty,
            "conversation_id": chat.conversation_id,
            "error": apology(error_id),
            "sources": [],
        }
    return {**empty, "error": "No reply was produced.", "sources": []}


async def run_interactive(
    chat: TerminalChat, console: Console | None = None, read: Callable[[str], str] = input
) -> int:
    """A chat prompt for a person: replies stream in; `/help` lists the commands."""
    console = console or Console()
    eff = await chat.service.effective_settings(chat.place)
    console.print(
        f"[bold]Switchboard[/bold] — chatting with [cyan]{eff.model.value}[/cyan]. "
        "Type /help for commands, /quit to leave."
    )
    while True:
        try:
            line = (await asyncio.to_thread(read, "you> ")).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            result = await chat.command(line)
            if line.strip() == "/model list" and result.ok:
                console.print(models_table(chat.service.list_models(), chat.service.default_model))
            else:
                console.print(result.message, style=None if result.ok else "red", markup=False)
            if result.quit:
                return 0
            continue
        await _stream_to_console(chat, line, console)


async def _stream_to_console(chat: TerminalChat, line: str, console: Console) -> None:
    out = console.file
    try:
        async for event in chat.send(line):
            if isinstance(event, ReplyDelta):
                out.write(event.text)
                out.flush()
            elif isinstance(event, FallbackUsed):
                console.print(
                    f"\n{event.failed_model} failed ({event.reason}); {event.model} answers instead.",
                    style="yellow",
                    markup=False,
                )
            elif isinstance(event, ReplyFinished):
                r = event.result
                out.write("\n")
                if r.error:
                    console.print(r.error, style="red", markup=False)
                for i, src in enumerate(r.sources, 1):
                    where = f", {src.location}" if src.location else ""
                    console.print(f"  [{i}] {src.document}{where}", style="dim", markup=False)
                usage = f", {r.usage.total_tokens} tokens" if r.usage else ""
                cost = f", ${r.cost_usd:.6f}" if r.cost_usd else ""
                model = r.model or "no model"
                stood_in = f" (standing in for {r.fallback_from})" if r.fallback_from else ""
                console.print(
                    f"— {model}{stood_in}, {r.latency_ms or 0:.0f} ms{usage}{cost}",
                    style="dim",
                    markup=False,
                )
    except UserError as exc:
        console.print(exc.message, style="red", markup=False)
    except Exception as exc:
        console.print(
            apology(report_unexpected(log, exc, "answering in the terminal")),
            style="red",
            markup=False,
        )
