"""The terminal chat in-process: the real service, the fake model server, prompt_toolkit's pipe input.

(`switchboard chat` as a real process in a real pty is in tests/test_terminal_pty.py.)
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from sqlalchemy import select

from bot.app import App, open_app
from bot.service import STOPPED
from bot.terminal import (
    TINY_MODEL_NOTE,
    TerminalChat,
    answer_in_console,
    clean_line,
    input_lines,
    prompt_reader,
    run_interactive,
    run_json,
    stream_reader,
    user_id_for,
)
from core.messages import Author, Place
from core.settings import Settings
from store.models import Message
from tests.fakes.openai_server import FakeOpenAI

ADA = Author(user_id_for("ada"), "ada")


def chat_in(app: App, guild: int = 1, channel: int = 5, thread: int | None = None) -> TerminalChat:
    return TerminalChat(app.service, Place(guild, channel, thread), ADA, knowledge=app.knowledge)


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, force_terminal=False, color_system=None), out


async def answers(app: App) -> list[Message]:
    await app.writer.drain()
    async with app.sessions() as session:
        rows = await session.scalars(
            select(Message).where(Message.role == "assistant").order_by(Message.created_at)
        )
        return list(rows.all())


# --------------------------------------------------------------------------- settings


async def test_settings_respect_the_guild(chat_app: App, service_settings: Settings) -> None:
    """Terminal ids are made up: channel 5 of server 1 is not channel 5 of server 2."""
    one, two = chat_in(chat_app, guild=1), chat_in(chat_app, guild=2)
    assert (await one.command("/knowledge on")).ok
    assert (await one.command("/model set backup")).ok

    mine = (await one.command("/settings")).message
    assert "knowledge: on (from channel)" in mine and "model: backup (from channel)" in mine
    theirs = (await two.command("/settings")).message
    assert "knowledge: off (from global)" in theirs and "model: main (from global)" in theirs

    # Another process reads the same from the database.
    async with open_app(service_settings, knowledge=False, migrate=False) as other:
        again = (await chat_in(other, guild=2).command("/settings")).message
        assert "knowledge: off (from global)" in again
        assert "knowledge: on (from channel)" in (await chat_in(other).command("/settings")).message


async def test_knowledge_on_with_no_documents_says_how_to_add_some(
    service_settings: Settings, tmp_path: Path
) -> None:
    settings = service_settings.model_copy(
        update={"chroma_host": None, "knowledge_collection_prefix": f"t{os.getpid()}-"}
    )
    async with open_app(settings) as app:
        result = await chat_in(app, guild=42).command("/knowledge on")
    assert result.ok and "**on**" in result.message
    assert "no documents yet" in result.message
    assert "`switchboard knowledge add PATH... --guild 42`" in result.message
    off = await chat_in(app, guild=42).command("/knowledge off")
    assert "no documents" not in off.message


async def test_an_unexpected_failure_in_a_command_apologises_and_the_chat_goes_on(
    chat_app: App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = chat_in(chat_app)

    async def broken(place: Place) -> None:  # a bug in the service
        raise RuntimeError("boom")

    # (A database that goes away is not a bug: reads then answer from memory.)
    monkeypatch.setattr(chat_app.service, "effective_settings", broken)
    result = await chat.command("/settings")
    assert not result.ok and "error id" in result.message
    error_id = result.message.split("`")[1]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    assert (await chat.command("/help")).ok


async def test_model_not_found_points_to_the_terminal_command(chat_app: App) -> None:
    result = await chat_in(chat_app).command("/model info mian")
    assert not result.ok
    assert result.message == "No model named 'mian'. Did you mean 'main'? See /model list."


# ------------------------------------------------------------------------------ input


def test_clean_line_replaces_lone_surrogates() -> None:
    undecodable = b"caf\xe9 ok".decode("utf-8", errors="surrogateescape")
    assert clean_line(undecodable) == "caf\ufffd ok"
    assert clean_line("plain ✓") == "plain ✓"


async def test_input_lines_survive_bytes_that_are_not_utf8() -> None:
    """A real pipe, read through its file descriptor: bad bytes cost no line."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"first\n\xff\xfe\xfd second\r\nthird, no newline")
    os.close(write_fd)
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="strict") as stream:
        lines = [line async for line in input_lines(stream)]
    assert lines == ["first", "\ufffd\ufffd\ufffd second", "third, no newline"]


async def test_chat_json_answers_every_line_even_blank_and_undecodable(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    stdin = io.BytesIO(b"hello\n\n   \ncaf\xe9\n/help\n")
    stdout = io.StringIO()
    assert await run_json(chat_in(chat_app), stdin, stdout) == 0
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(out) == 5
    hello, blank, spaces, cafe, help_ = out
    assert hello["reply"] == "Echo: hello" and hello["error"] is None
    for empty in (blank, spaces):
        assert empty["reply"] is None and "nothing to answer" in empty["error"]
        assert empty["conversation_id"] == hello["conversation_id"]
        assert set(empty) == set(hello)
    assert cafe["reply"] == "Echo: caf\ufffd"
    assert help_["command"] == "help" and help_["ok"]


# ------------------------------------------------------------------------ interactive


async def test_the_line_editor_keeps_history_in_a_file_and_renders_markdown(
    chat_app: App, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.reply = lambda request: "A **bold** claim:\n\n- one\n- two"
    history = tmp_path / "data" / "chat-history"
    console, out = plain_console()
    # What the person types at each prompt: a line, arrow up and Enter, Ctrl-C (leaves).
    typed = iter(["say it\r", "\x1b[A\r", "\x03"])
    with create_pipe_input() as keys:
        read = prompt_reader(history, input=keys, output=DummyOutput())

        async def type_then_read() -> str:
            keys.send_text(next(typed))
            return await read()

        assert await run_interactive(chat_in(chat_app), type_then_read, console) == 0
    said = [r.last_user_text for r in fake_openai.chat_requests]
    assert said == ["say it", "say it"]
    assert "say it" in history.read_text()
    shown = out.getvalue()
    assert "A bold claim:" in shown and "**" not in shown  # Markdown, not literal stars
    assert "• one" in shown
    assert shown.count("— main,") == 2  # each reply's footer


async def test_ctrl_d_leaves_and_the_banner_warns_about_the_tiny_bundled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./switchboard.toml here, and none named: the bundled model
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    settings = Settings(data_dir=tmp_path / "data", environ={})
    async with open_app(settings, knowledge=False) as app:
        console, out = plain_console()
        with create_pipe_input() as keys:
            read = prompt_reader(None, input=keys, output=DummyOutput())
            keys.send_text("\x04")  # Ctrl-D
            assert await run_interactive(chat_in(app), read, console, log_file=Path("x.log")) == 0
    shown = " ".join(out.getvalue().split())
    assert "chatting with smollm2" in shown
    assert " ".join(TINY_MODEL_NOTE.split()) in shown
    assert "Log: x.log" in shown


async def test_piped_input_without_a_terminal_still_chats(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    console, out = plain_console()
    read = stream_reader(io.StringIO("hi there\n/quit\nnever read\n"))
    assert await run_interactive(chat_in(chat_app), read, console) == 0
    assert "Echo: hi there" in out.getvalue() and "Bye." in out.getvalue()
    assert [r.last_user_text for r in fake_openai.chat_requests] == ["hi there"]


async def test_ctrl_c_mid_answer_stops_that_answer_and_the_chat_goes_on(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: "word " * 400
    fake_openai.token_delay = 0.02
    chat = chat_in(chat_app)
    out = io.StringIO()
    console = Console(file=out, width=80, height=20, force_terminal=True, color_system=None)

    answering = asyncio.create_task(answer_in_console(chat, "talk at length", console))
    while "word word" not in out.getvalue():  # the live view shows the reply coming in
        assert not answering.done()
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
    await answering
    assert "Stopped." in out.getvalue()

    [stopped] = await answers(chat_app)
    assert stopped.status == "error" and stopped.error == STOPPED
    assert stopped.content.startswith("word") and len(stopped.content) < len("word " * 400)

    fake_openai.reply = lambda request: "Short."
    fake_openai.token_delay = 0
    await answer_in_console(chat, "and now?", console)
    stopped_again, finished = await answers(chat_app)
    assert finished.status == "ok" and finished.content == "Short."
    assert finished.conversation_id == stopped.conversation_id  # the conversation goes on
    assert "talk at length" in str(fake_openai.chat_requests[-1].messages)
