"""The terminal chat: the same service as the bot, as if the terminal were a Discord channel.

`TerminalChat` turns typed lines into `ChatRequest`s and commands. `run_interactive`
renders them for a person: a line editor with history (`prompt_reader`), "thinking…"
until the first token, the reply as Markdown, Ctrl-C to stop an answer. `run_json`
renders them for a program: exactly one JSON object per input line.

Input is read as bytes and decoded here, so a line that is not valid in the terminal's
encoding becomes U+FFFD characters instead of an exception that loses the lines read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol, TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.spinner import Spinner

from bot.cli_common import models_table
from bot.present import (
    change_line,
    forget_line,
    models_text,
    pool_text,
    privacy_line,
    verdict_line,
    vote_line,
)
from bot.service import ChatService
from core.errors import UserError, apology, report_unexpected
from core.exchange import VOTE_REASONS
from core.messages import (
    Author,
    ChatEvent,
    ChatRequest,
    ChatResult,
    FallbackUsed,
    Place,
    ReplyDelta,
    ReplyFinished,
    ReplyStarted,
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
  /good                    the last answer was good
  /bad [REASON] [TEXT]     it was not (REASON: wrong, unhelpful, unsafe, off_topic, too_long,
                           refused, other)
  /better TEXT             a better answer than the last one (kept to train on)
  /retry [MODEL]           another answer to the last question (by MODEL); votes then apply to it
  /arena PROMPT            a blind battle: two anonymous models answer as A and B
  /vote a|b|tie|bad [WHY]  which was better (bad: both were); then you see who they were
  /logging on|off|inherit  store what is said here, or not (then it is only counted)
  /privacy status          whether your exchanges are stored, and how much of yours is
  /privacy opt-out         keep being answered, but store nothing of yours from now on
  /privacy opt-in          store your exchanges again
  /privacy forget          delete everything stored about you, at once
  /settings                the settings in force here and where each comes from
  /new                     start a new conversation
  /help                    this list
  /quit                    leave (Ctrl-D works too; Ctrl-C stops an answer)"""

# Commands that ask models, which take a while: shown with a spinner, Ctrl-C stops them.
SLOW_COMMANDS = frozenset({"arena"})
# The bundled model a newcomer meets first: say what to expect of it, and how to do better.
TINY_BUNDLED = frozenset({"smollm2-135m-instruct"})
TINY_MODEL_NOTE = (
    "SmolLM2-135M is tiny: quick, free and offline, but often wrong. Better answers: "
    "`switchboard models add-gguf BIGGER.gguf --name big` then /model set big, "
    "or an OpenAI key (README, 'Configuration')."
)
# `chat --json`'s answer to the line in flight when the process is told to stop.
STOPPED_BY_SHUTDOWN = "Stopped before the reply was finished: Switchboard is shutting down."
_SURROGATES = re.compile("[\ud800-\udfff]")


def user_id_for(name: str) -> int:
    """A stable id for a terminal user name, so their history and settings persist."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


def clean_line(text: str) -> str:
    """A typed line as text that can be stored and printed: lone surrogates become U+FFFD.

    prompt_toolkit (and Python's text streams under `surrogateescape`) keep bytes that are
    not valid UTF-8 as lone surrogates, which no UTF-8 file, terminal or database takes.
    """
    return _SURROGATES.sub("\ufffd", text)


class DocumentLister(Protocol):
    """What the terminal needs of the knowledge base: whether a server has documents."""

    async def list_documents(self, guild_id: int) -> Sequence[object]: ...


@dataclass
class CommandResult:
    """What a `/command` did."""

    command: str
    ok: bool
    message: str
    quit: bool = False
    data: dict[str, Any] | None = None  # more fields for `chat --json` (a battle's answers)


class TerminalChat:
    """A conversation in the terminal, in one place, as one user."""

    def __init__(
        self,
        service: ChatService,
        place: Place,
        author: Author,
        *,
        knowledge: DocumentLister | None = None,
    ) -> None:
        self.service = service
        self.place = place
        self.author = author
        self.knowledge = knowledge
        self.conversation_id: str | None = None
        self.last_answer_id: str | None = None  # what /good, /bad, /better and /retry are about
        self.last_battle_id: str | None = None  # what /vote is about

    @property
    def scope(self) -> Scope:
        return "thread" if self.place.thread_id is not None else "channel"

    async def send(self, text: str) -> AsyncIterator[ChatEvent]:
        """Send a message in the current conversation (starting one if needed)."""
        request = ChatRequest(self.place, self.author, text, conversation_id=self.conversation_id)
        admission = self.service.admit(request)  # the service exempts the terminal today
        if not admission.allowed:
            raise UserError(f"Too many messages: wait {math.ceil(admission.retry_after)} s.")
        async for event in self._follow(self.service.stream(request)):
            yield event

    def answers(self, line: str) -> AsyncIterator[ChatEvent]:
        """The reply events for a line that is answered: a message, or `/retry [MODEL]`."""
        if is_retry(line):
            words = line.split()
            return self.retry(words[1] if len(words) > 1 else None)
        return self.send(line)

    async def retry(self, model: str | None = None) -> AsyncIterator[ChatEvent]:
        """Another answer to the last question (by `model`); later votes apply to it."""
        async for event in self._follow(
            self.service.retry(self._last_answer(), self.author, model)
        ):
            yield event

    async def _follow(self, events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
        async for event in events:
            if isinstance(event, ReplyStarted):
                # Known before the answer is: a stopped answer is still part of the conversation.
                self.conversation_id = event.conversation_id
                self.last_answer_id = event.message_id
            elif isinstance(event, ReplyFinished):
                self.conversation_id = event.result.conversation_id
            yield event

    def _last_answer(self) -> str:
        if self.last_answer_id is None:
            raise UserError("There is no answer yet to give feedback on: ask something first.")
        return self.last_answer_id

    async def command(self, line: str) -> CommandResult:
        """Run a `/command` line; errors come back as a failed result, and the chat goes on."""
        try:
            words = shlex.split(line[1:])
        except ValueError:
            words = line[1:].split()
        # Commands followed by free text are named by their first word alone.
        name = words[0] if words and words[0] in SLOW_COMMANDS | {"vote"} else " ".join(words[:2])
        try:
            return await self._dispatch(words, line)
        except UserError as exc:
            return CommandResult(name, False, exc.message)
        except Exception as exc:
            error_id = report_unexpected(log, exc, f"running /{name} in the terminal")
            return CommandResult(name, False, apology(error_id))

    async def _dispatch(self, words: list[str], line: str) -> CommandResult:
        svc, place, who = self.service, self.place, self.author
        head = words[0] if words else ""
        sub = words[1] if len(words) > 1 else ""
        rest = line.split(None, 2)[2].strip() if len(line.split(None, 2)) > 2 else ""
        name = f"{head} {sub}".strip()
        if head in {"quit", "exit"}:
            return CommandResult(head, True, "Bye.", quit=True)
        if head in {"good", "bad"}:
            reason = comment = None
            if head == "bad":  # /bad [REASON] [TEXT]
                after = line.split(None, 1)[1].strip() if len(words) > 1 else ""
                reason = sub if sub in VOTE_REASONS else None
                comment = (after[len(sub) :].strip() if reason else after) or None
            value = 1 if head == "good" else -1
            outcome = await svc.vote(
                self._last_answer(), who, value, source="terminal", reason=reason, comment=comment
            )
            return CommandResult(head, True, vote_line(outcome))
        if head == "better":
            text = line.split(None, 1)[1].strip() if len(words) > 1 else ""
            if not text:
                raise UserError(
                    "Write the better answer after /better, e.g. `/better Paris is the capital.`"
                )
            await svc.correct(self._last_answer(), who, text)
            return CommandResult(
                head, True, "Thanks: your better answer is kept beside the original."
            )
        if head == "arena":
            return await self._arena(line.split(None, 1)[1].strip() if len(words) > 1 else "")
        if head == "vote":
            return await self._vote(sub, rest)
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
                f"logging: {'on' if eff.logging.value else 'off'} (from {eff.logging.source})",
                "retention: "
                + (f"{eff.retention.value} days" if eff.retention.value else "kept forever")
                + f" (from {eff.retention.source})",
                f"arena pool: {pool_text(eff.arena_pool.value)} (from {eff.arena_pool.source})",
            ]
            return CommandResult(head, True, "\n".join(lines))
        if head == "model" and sub == "list":
            return CommandResult(name, True, models_text(svc.list_models(), svc.default_model))
        if head == "model" and sub == "set" and len(words) > 2:
            return CommandResult(
                name,
                True,
                change_line(
                    # The terminal is the operator's: an admin, who may try candidates.
                    await svc.set_model(place, self.scope, words[2], who, admin=True)
                ),
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
        if head == "privacy" and sub == "forget":
            # The person is at the keyboard: no question first. Uploads they made with
            # `switchboard knowledge add --as NAME` carry their name alone, so match it.
            report = await svc.forget(who, by_name=True)
            self.conversation_id = self.last_answer_id = None  # what they continue is gone
            return CommandResult(name, True, forget_line(report))
        if head == "privacy" and sub in {"status", "opt-out", "opt-in"}:
            if sub == "status":
                status = await svc.privacy_status(who)
            elif sub == "opt-out":
                status = await svc.opt_out(who)
            else:
                status = await svc.opt_in(who)
            return CommandResult(name, True, privacy_line(status))
        if head == "logging" and sub in {"on", "off", "inherit"}:
            enabled = {"on": True, "off": False, "inherit": None}[sub]
            return CommandResult(
                name, True, change_line(await svc.set_logging(place, self.scope, enabled, who))
            )
        if head == "knowledge" and sub in {"on", "off"}:
            change = await svc.set_knowledge(place, self.scope, sub == "on", who)
            message = change_line(change)
            if change.now.value and await self._no_documents():
                message += (
                    "\nThis server's knowledge base has no documents yet, so answers have nothing "
                    f"to draw on: add some with `switchboard knowledge add PATH... --guild {place.guild_id}`."
                )
            return CommandResult(name, True, message)
        raise UserError(
            f"Unknown or incomplete command `/{' '.join(words)}`. Type /help for the list."
        )

    async def _arena(self, text: str) -> CommandResult:
        """`/arena PROMPT`: two anonymous models answer; `/vote` reveals them."""
        if not text:
            raise UserError("Write the question after /arena, e.g. `/arena Explain DNS briefly.`")
        battle = await self.service.battle(self.place, self.author, text)
        self.last_battle_id = battle.id
        sides = [("A", battle.a), ("B", battle.b)]
        parts = [f"--- {label} ---\n{side.reply or ''}{side.error or ''}" for label, side in sides]
        message = "\n".join(
            [*parts, "Which was better? /vote a, /vote b, /vote tie or /vote bad (both were)."]
        )
        data = {
            "battle_id": battle.id,
            **{label.lower(): {"reply": side.reply, "error": side.error} for label, side in sides},
        }
        return CommandResult("arena", True, message, data=data)

    async def _vote(self, outcome: str, reason: str) -> CommandResult:
        """`/vote a|b|tie|bad [REASON]` on the last battle: the models are revealed."""
        if self.last_battle_id is None:
            raise UserError("There is no battle to vote on: start one with /arena PROMPT.")
        if not outcome:
            raise UserError("Vote /vote a, /vote b, /vote tie or /vote bad (both were bad).")
        verdict = await self.service.battle_vote(
            self.last_battle_id, self.author, outcome.lower(), reason or None
        )
        data = {
            "battle_id": verdict.battle_id,
            "outcome": verdict.outcome,
            "model_a": verdict.model_a,
            "model_b": verdict.model_b,
            "counted": verdict.counted,
            "invalid": verdict.invalid,
            "already_voted": verdict.already_voted,
        }
        return CommandResult("vote", True, verdict_line(verdict), data=data)

    async def _no_documents(self) -> bool:
        """Whether this server's knowledge base is known to be empty (False when unsure)."""
        if self.knowledge is None or self.place.guild_id is None:
            return False
        try:
            return not await self.knowledge.list_documents(self.place.guild_id)
        except Exception:  # only a hint: the switch itself is set
            log.warning("could not list the knowledge base's documents", exc_info=True)
            return False


def is_retry(line: str) -> bool:
    """Whether a line is `/retry [MODEL]`, which is answered like a message."""
    words = line.split()
    return bool(words) and words[0] == "/retry"


# ----------------------------------------------------------------------------- input


async def input_lines(stream: IO[Any]) -> AsyncIterator[str]:
    """The lines of `stream` (without their line ends), read off the event loop.

    A stream with a file descriptor is read with `os.read` in a daemon thread, so a read
    blocked on a terminal or pipe never holds up exit (SIGTERM), and its bytes are decoded
    here: what is not valid in the stream's encoding becomes U+FFFD, whatever the locale's
    error handler says, and no line is lost to a decoding error.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    encoding = getattr(stream, "encoding", None) or "utf-8"

    def put(item: str | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass

    def decode(raw: bytes) -> str:
        return clean_line(raw.decode(encoding, errors="replace").rstrip("\r\n"))

    def pump_fd(fd: int) -> None:
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                put(decode(raw))
        if pending:
            put(decode(pending))

    def pump() -> None:
        try:
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # io.StringIO, io.BytesIO and the like
                while line := stream.readline():
                    put(
                        decode(line) if isinstance(line, bytes) else clean_line(line.rstrip("\r\n"))
                    )
            else:
                pump_fd(fd)
        except Exception as exc:
            put(exc)
        finally:
            put(None)

    threading.Thread(target=pump, name="switchboard-stdin", daemon=True).start()
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


LineReader = Callable[[], Awaitable[str]]
"""Reads the next line: EOFError at the end of input, KeyboardInterrupt for Ctrl-C."""


def prompt_reader(
    history_file: Path | None, *, input: Any = None, output: Any = None
) -> LineReader:
    """A prompt_toolkit line editor (arrow keys, history, Ctrl-R), history kept in `history_file`."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory

    history: History = InMemoryHistory()
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.touch()
            history = FileHistory(str(history_file))
        except OSError as exc:
            log.warning("chat history not kept: cannot write %s (%s)", history_file, exc)
    session: PromptSession[str] = PromptSession(history=history, input=input, output=output)

    async def read() -> str:
        return clean_line(await session.prompt_async("you> "))

    return read


def stream_reader(stream: IO[Any]) -> LineReader:
    """Lines from a stream that is not a terminal (a pipe, a file), one per call."""
    lines: AsyncIterator[str] | None = None

    async def read() -> str:
        nonlocal lines
        if lines is None:
            lines = input_lines(stream)
        try:
            return await anext(lines)
        except StopAsyncIteration:
            raise EOFError from None

    return read


# ------------------------------------------------------------------------------ JSON


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


_NO_REPLY = dict.fromkeys(
    [
        "reply",
        "model",
        "conversation_id",
        "message_id",
        "latency_ms",
        "usage",
        "cost_usd",
        "fallback_from",
        "log_problem",
    ]
)


def _error_json(chat: TerminalChat, message: str) -> dict[str, Any]:
    return {**_NO_REPLY, "conversation_id": chat.conversation_id, "error": message, "sources": []}


async def run_json(
    chat: TerminalChat, stdin: IO[Any] = sys.stdin, stdout: TextIO = sys.stdout
) -> int:
    """Read one line at a time; print exactly one JSON object per line. Exit 0 at end of input.

    A blank line gets an error object too, so a program can count on one answer per line.
    """

    def emit(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        stdout.flush()

    async for line in input_lines(stdin):
        if line.startswith("/") and not is_retry(line):
            result = await chat.command(line)
            emit(
                {
                    "command": result.command,
                    "ok": result.ok,
                    "message": result.message,
                    **(result.data or {}),
                }
            )
            if result.quit:
                break
            continue
        try:
            obj = await _reply_json(chat, line)
        except asyncio.CancelledError:  # SIGTERM: the service logs the answer as stopped
            emit(_error_json(chat, STOPPED_BY_SHUTDOWN))
            raise
        emit(obj)
    return 0


async def _reply_json(chat: TerminalChat, line: str) -> dict[str, Any]:
    try:
        async for event in chat.answers(line):
            if isinstance(event, ReplyFinished):
                return result_json(event.result)
    except UserError as exc:
        return _error_json(chat, exc.message)
    except Exception as exc:
        return _error_json(chat, apology(report_unexpected(log, exc, "answering in the terminal")))
    return _error_json(chat, "No reply was produced.")


# ----------------------------------------------------------------------- interactive


async def run_interactive(
    chat: TerminalChat,
    read: LineReader,
    console: Console | None = None,
    *,
    log_file: Path | None = None,
) -> int:
    """A chat prompt for a person: replies stream in; `/help` lists the commands."""
    console = console or Console()
    await _banner(chat, console, log_file)
    while True:
        try:
            line = (await read()).strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            console.print()
            return 0
        if not line:
            continue
        if line.startswith("/") and not is_retry(line):
            slow = (line[1:].split() or [""])[0] in SLOW_COMMANDS
            finished = await (_slow_command(chat, line, console) if slow else chat.command(line))
            if finished is None:  # stopped with Ctrl-C
                continue
            result = finished
            if line == "/model list" and result.ok:
                console.print(models_table(chat.service.list_models(), chat.service.default_model))
            else:
                console.print(result.message, style=None if result.ok else "red", markup=False)
            if result.quit:
                return 0
            continue
        await answer_in_console(chat, line, console)


async def _slow_command(chat: TerminalChat, line: str, console: Console) -> CommandResult | None:
    """A command that asks models: "thinking…" meanwhile; Ctrl-C stops it (None)."""
    task = asyncio.create_task(chat.command(line))
    with _interrupt_cancels(task), console.status("thinking…", spinner="dots"):
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the whole chat is stopping (SIGTERM)
    console.print("Stopped.", style="yellow", markup=False, highlight=False)
    return None


async def _banner(chat: TerminalChat, console: Console, log_file: Path | None) -> None:
    eff = await chat.service.effective_settings(chat.place)
    where = f"server {chat.place.guild_id}, channel {chat.place.channel_id}"
    if chat.place.thread_id is not None:
        where += f", thread {chat.place.thread_id}"
    console.print(
        f"[bold]Switchboard[/bold] — chatting with [cyan]{eff.model.value}[/cyan] ({where}). "
        "Type /help for commands; Ctrl-C stops an answer; Ctrl-D or /quit leaves.",
        highlight=False,
    )
    try:
        spec = await chat.service.get_model(eff.model.value)
    except UserError:  # the first message says what is wrong with it
        spec = None
    if spec is not None and spec.bundled in TINY_BUNDLED:
        console.print(TINY_MODEL_NOTE, style="yellow", markup=False, highlight=False)
    if log_file is not None:
        console.print(f"Log: {log_file}", style="dim", markup=False, highlight=False)


class _Tail:
    """The last lines of a renderable that fit on the screen.

    Rich redraws a live view by moving the cursor up over it, which cannot reach lines
    that have scrolled off the top: a view no taller than the screen redraws cleanly. The
    whole reply is printed once it is finished.
    """

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        room = max(1, options.size.height - 1)
        for line in lines[-room:]:
            yield from line
            yield Segment.line()


class _ReplyView:
    """The reply while it streams: "thinking…" until the first token, then its Markdown so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.text = ""
        self._spinner = Spinner("dots", "thinking…", style="dim")
        self._live = Live(
            console=console,
            transient=True,  # replaced by the finished reply, printed whole
            refresh_per_second=10,
            redirect_stdout=False,
            redirect_stderr=False,
            get_renderable=self._renderable,
        )

    def _renderable(self) -> RenderableType:
        return _Tail(Markdown(self.text)) if self.text else self._spinner

    def add(self, piece: str) -> None:
        self.text += piece

    @contextmanager
    def live(self) -> Iterator[None]:
        with self._live:
            yield


@contextmanager
def _interrupt_cancels(task: asyncio.Task[Any]) -> Iterator[None]:
    """While `task` runs, Ctrl-C (SIGINT) cancels it alone rather than the whole chat."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(task.cancel)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


async def answer_in_console(chat: TerminalChat, line: str, console: Console) -> None:
    """Answer `line`, streaming into the console; Ctrl-C stops the answer, not the chat."""
    view = _ReplyView(console)
    task = asyncio.create_task(_stream(chat, line, view))
    with _interrupt_cancels(task):
        try:
            result = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the whole chat is stopping (SIGTERM): the service logs the answer
            result = None  # Ctrl-C: the service logged what was written, as stopped
    if view.text:
        console.print(Markdown(view.text))
    if task.cancelled():
        console.print("Stopped.", style="yellow", markup=False, highlight=False)
    elif result is not None:
        _footer(result, console)


async def _stream(chat: TerminalChat, line: str, view: _ReplyView) -> ChatResult | None:
    console = view.console
    with view.live():
        try:
            async for event in chat.answers(line):
                if isinstance(event, ReplyDelta):
                    view.add(event.text)
                elif isinstance(event, FallbackUsed):
                    console.print(
                        f"{event.failed_model} failed ({event.reason}); {event.model} answers instead.",
                        style="yellow",
                        markup=False,
                        highlight=False,
                    )
                elif isinstance(event, ReplyFinished):
                    return event.result
        except UserError as exc:
            console.print(exc.message, style="red", markup=False, highlight=False)
        except Exception as exc:
            console.print(
                apology(report_unexpected(log, exc, "answering in the terminal")),
                style="red",
                markup=False,
                highlight=False,
            )
    return None


def _footer(result: ChatResult, console: Console) -> None:
    if result.error:
        console.print(result.error, style="red", markup=False, highlight=False)
    for i, src in enumerate(result.sources, 1):
        where = f", {src.location}" if src.location else ""
        console.print(f"  [{i}] {src.document}{where}", style="dim", markup=False, highlight=False)
    usage = f", {result.usage.total_tokens} tokens" if result.usage else ""
    cost = f", ${result.cost_usd:.6f}" if result.cost_usd else ""
    model = result.model or "no model"
    stood_in = f" (standing in for {result.fallback_from})" if result.fallback_from else ""
    console.print(
        f"— {model}{stood_in}, {result.latency_ms or 0:.0f} ms{usage}{cost}",
        style="dim",
        markup=False,
        highlight=False,
    )
