"""`switchboard chat` as a real process in a real pseudo-terminal, against the fake model server.

The terminal's own line discipline turns Ctrl-C into SIGINT, as a person's would; SIGTERM
is what systemd, Docker and Kubernetes send to stop a process.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.service import STOPPED
from bot.service.compare import STOPPED as BATTLE_STOPPED
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.service import write_config

REPO = Path(__file__).resolve().parent.parent
LONG_REPLY = "word " * 2000
# How long to wait for the process to show something before the test gives up on it.
PATIENCE_S = 90.0
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


@pytest.fixture
def slow_server() -> Iterator[FakeOpenAI]:
    """A fake whose replies stream for a long time, one word every 20 ms."""
    with FakeOpenAI.in_thread(reply=lambda request: LONG_REPLY, token_delay=0.02) as fake:
        yield fake


@pytest.fixture
def env(tmp_path: Path, slow_server: FakeOpenAI) -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SWITCHBOARD_") and k not in {"DISCORD_TOKEN", "OPENAI_API_KEY"}
    }
    return {
        **clean,
        "SWITCHBOARD_CONFIG": str(
            write_config(tmp_path / "switchboard.toml", slow_server.base_url)
        ),
        "SWITCHBOARD_DATA_DIR": str(tmp_path / "data"),
        "SWITCHBOARD_MAX_RETRIES": "0",
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # nobody answers cursor-position requests here
    }


class Terminal:
    """`switchboard chat` with a pty as its controlling terminal."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=REPO,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.output = b""

    def screen(self, start: int = 0, end: int | None = None) -> str:
        """What was printed from byte `start` (to `end`), without terminal control sequences."""
        return _ANSI.sub(b"", self.output[start:end]).decode("utf-8", errors="replace")

    def wait_for(self, text: str, start: int = 0) -> int:
        """Read until `text` shows up after byte `start`; returns the byte just after it.

        Just after it, not the end of the output: what came in the same read (the next
        prompt, say) is still ahead of the returned mark for the next wait.
        """
        deadline = time.monotonic() + PATIENCE_S
        while text not in self.screen(start):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(
                    f"{text!r} never showed up; the terminal shows:\n{self.screen()[-3000:]}"
                )
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # the process closed the terminal
                    pass
        # The shortest output in which it shows (control sequences may sit inside it).
        low, high = start, len(self.output)
        while low < high:
            middle = (low + high) // 2
            if text in self.screen(start, middle):
                high = middle
            else:
                low = middle + 1
        return low

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=PATIENCE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


@pytest.fixture
def terminal(env: dict[str, str]) -> Iterator[Terminal]:
    term = Terminal(env, "--guild", "1", "--channel", "2")
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.proc.wait()


def answers(data_dir: Path) -> list[tuple[str, str | None, str]]:
    """(status, error, content) of every answer logged, oldest first."""
    with sqlite3.connect(data_dir / "switchboard.db") as db:
        return list(
            db.execute(
                "SELECT status, error, content FROM messages WHERE role = 'assistant' "
                "ORDER BY created_at"
            )
        )


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(
    terminal: Terminal, tmp_path: Path, slow_server: FakeOpenAI
) -> None:
    mark = terminal.wait_for("you>")
    terminal.type(b"tell me everything\r")
    mark = terminal.wait_for("word word word", mark)
    terminal.type(b"\x03")  # Ctrl-C: the pty's line discipline sends SIGINT
    mark = terminal.wait_for("Stopped.", mark)
    mark = terminal.wait_for("you>", mark)

    slow_server.reply = lambda request: "Short answer."
    terminal.type(b"and briefly?\r")
    mark = terminal.wait_for("— main", terminal.wait_for("Short answer.", mark))
    terminal.wait_for("you>", mark)
    terminal.type(b"\x03")  # Ctrl-C at the prompt leaves
    assert terminal.close() == 0

    (status, error, content), finished = answers(tmp_path / "data")
    assert status == "error" and error == STOPPED
    assert content.startswith("word") and len(content) < len(LONG_REPLY.strip())
    assert finished == ("ok", None, "Short answer.")
    assert "Traceback" not in terminal.screen()


def test_ctrl_c_stops_a_battle_and_the_chat_goes_on(
    terminal: Terminal, tmp_path: Path, slow_server: FakeOpenAI
) -> None:
    mark = terminal.wait_for("you>")
    terminal.type(b"/arena tell me everything\r")
    mark = terminal.wait_for("thinking", mark)
    deadline = time.monotonic() + PATIENCE_S
    while len(slow_server.chat_requests) < 2:  # both models have been asked and are writing
        assert time.monotonic() < deadline and terminal.proc.poll() is None
        time.sleep(0.05)
    terminal.type(b"\x03")
    mark = terminal.wait_for("Stopped.", mark)
    terminal.wait_for("you>", mark)
    terminal.type(b"\x04")  # Ctrl-D leaves
    assert terminal.close() == 0

    stopped = answers(tmp_path / "data")
    assert [(status, error) for status, error, _ in stopped] == [("error", BATTLE_STOPPED)] * 2
    assert "Traceback" not in terminal.screen()


def test_sigterm_mid_answer_logs_it_as_stopped_and_exits_cleanly(
    terminal: Terminal, tmp_path: Path
) -> None:
    mark = terminal.wait_for("you>")
    terminal.type(b"tell me everything\r")
    terminal.wait_for("word word word", mark)
    terminal.proc.send_signal(signal.SIGTERM)
    assert terminal.close() == 0

    [(status, error, content)] = answers(tmp_path / "data")  # written before the exit
    assert status == "error" and error == STOPPED and content.startswith("word")
    assert "Traceback" not in terminal.screen()


def test_sigterm_mid_answer_in_json_mode(
    env: dict[str, str], tmp_path: Path, slow_server: FakeOpenAI
) -> None:
    """The line in flight gets its one JSON object too; lines already answered keep theirs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"/model list\ntell me everything\n")
        proc.stdin.flush()  # stdin stays open: the process is stopped while it waits for more
        listing = json.loads(proc.stdout.readline())
        assert listing["command"] == "model list"
        data = tmp_path / "data"
        deadline = time.monotonic() + PATIENCE_S
        while not slow_server.chat_requests:  # the model has been asked and is writing
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    [stopped] = [json.loads(line) for line in rest.decode().splitlines()]
    assert stopped["reply"] is None and "shutting down" in stopped["error"]
    [(status, error, content)] = answers(data)
    assert status == "error" and error == STOPPED
    assert b"Traceback" not in stderr
