"""`/privacy` in `switchboard chat --json` and `switchboard db purge`, as real subprocesses."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.test_cli import cli_env, fake_server, switchboard  # noqa: F401 (fixtures)


def age(db: Path, like: str, when: str = "2020-01-01 00:00:00.000000") -> None:
    """Make the prompt matching `like` and its answer old (SQLite keeps UTC as text)."""
    with sqlite3.connect(db) as connection:
        (prompt,) = connection.execute(
            "SELECT id FROM messages WHERE content LIKE ? AND role = 'user'", (like,)
        ).fetchone()
        connection.execute(
            "UPDATE messages SET created_at = ? WHERE id = ? OR parent_id = ?",
            (when, prompt, prompt),
        )


def contents(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return sorted(row[0] for row in connection.execute("SELECT content FROM messages"))


def test_privacy_in_the_terminal_and_db_purge(cli_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    lines = ["an old question", "a new question", "/privacy status"]
    proc = switchboard(cli_env, "chat", "--json", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    *_, status = [json.loads(line) for line in proc.stdout.splitlines()]
    assert status["ok"] and "2 messages you wrote" in status["message"]
    db = tmp_path / "data" / "switchboard.db"
    age(db, "an old question")

    unset = switchboard(cli_env, "db", "purge")
    assert unset.returncode == 0, unset.stderr
    assert "no retention is set" in unset.stdout and len(contents(db)) == 4

    env = {**cli_env, "SWITCHBOARD_RETENTION_DAYS": "30"}
    dry = switchboard(env, "db", "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == (
        "Would delete 1 prompt with 1 answer, 0 conversations left empty; nothing was "
        "changed (retention 30 days)."
    )
    assert len(contents(db)) == 4

    done = switchboard(env, "db", "purge")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Deleted 1 prompt with 1 answer")
    assert contents(db) == ["Echo: a new question", "a new question"]

    # Forgetting, in the terminal, acts at once.
    forget = switchboard(cli_env, "chat", "--json", stdin="/privacy forget\n/privacy status\n")
    gone, after = [json.loads(line) for line in forget.stdout.splitlines()]
    assert gone["ok"] and gone["message"].startswith("Deleted 1 message you wrote, 1 answer")
    assert "0 messages you wrote" in after["message"] and contents(db) == []


def test_a_bad_retention_is_one_line(cli_env: dict[str, str]) -> None:  # noqa: F811
    proc = switchboard({**cli_env, "SWITCHBOARD_RETENTION_DAYS": "-3"}, "db", "purge")
    assert proc.returncode == 2
    assert "SWITCHBOARD_RETENTION_DAYS" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
