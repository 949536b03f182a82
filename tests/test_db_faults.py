"""Start-up and `switchboard db` faults: each is one line naming the setting, never a traceback.

Every test runs the real command line (`python -m bot ...`) as a subprocess against a
real database, or a real thing that stops one: a free port, a wrong password, random
bytes, a file where a folder should be.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from core.settings import Settings
from migrations import database_revision, plan_downgrade, upgrade_database
from store.db import create_engine, create_session_factory
from store.models import Conversation, Message, MessageInput
from tests.fixtures.store import sqlite_url

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-not-shown"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: data in tmp_path/data, no model registry file (the bundled model)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SWITCHBOARD_") and k not in {"DISCORD_TOKEN", "OPENAI_API_KEY"}
    }
    clean.update(
        SWITCHBOARD_CONFIG=str(tmp_path / "none.toml"),
        SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
    )
    return clean


def switchboard(
    env: dict[str, str], *args: str, **changes: str
) -> subprocess.CompletedProcess[str]:
    """Run `python -m bot ARGS` with `changes` to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env={**env, **changes},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The single error line a failed command printed (and nothing else, no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nothing_listening_names_the_url_setting_without_its_password(
    env: dict[str, str],
) -> None:
    url = f"postgresql://switchboard:{PASSWORD}@127.0.0.1:{free_port()}/switchboard"
    for command in (("db", "upgrade"), ("models", "list")):
        line = one_line(switchboard(env, *command, SWITCHBOARD_DATABASE_URL=url))
        assert line.startswith("Nothing is listening at 127.0.0.1:")
        assert "SWITCHBOARD_DATABASE_URL" in line and "switchboard:***@" in line
        assert PASSWORD not in line


@pytest.mark.postgres
def test_a_wrong_password_is_one_line_without_the_password(env: dict[str, str]) -> None:
    server = Settings().test_postgres_url
    if not server:
        pytest.skip("SWITCHBOARD_TEST_POSTGRES_URL is not set")
    url = make_url(server).set(password=PASSWORD).render_as_string(hide_password=False)
    line = one_line(switchboard(env, "models", "list", SWITCHBOARD_DATABASE_URL=url))
    assert "refused the login" in line and "password authentication failed" in line
    assert "check the user name and password in SWITCHBOARD_DATABASE_URL" in line
    assert PASSWORD not in line


def test_an_unknown_scheme_or_no_url_at_all_says_what_to_write(env: dict[str, str]) -> None:
    line = one_line(
        switchboard(
            env, "db", "upgrade", SWITCHBOARD_DATABASE_URL=f"mysql://me:{PASSWORD}@db/switchboard"
        )
    )
    assert "SWITCHBOARD_DATABASE_URL names a 'mysql' database" in line
    assert "postgresql://" in line and PASSWORD not in line
    line = one_line(switchboard(env, "models", "list", SWITCHBOARD_DATABASE_URL=PASSWORD))
    assert "SWITCHBOARD_DATABASE_URL is not a database URL" in line and PASSWORD not in line


def test_a_corrupt_sqlite_file_is_left_untouched(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "data" / "switchboard.db"
    path.parent.mkdir()
    garbage = b"not a database " + os.urandom(8192)
    path.write_bytes(garbage)
    for command in (("models", "list"), ("db", "downgrade", "base")):
        line = one_line(switchboard(env, *command))
        assert f"{path} is not a usable SQLite database (file is not a database)" in line
        assert "left untouched" in line and "SWITCHBOARD_DATA_DIR" in line
        assert path.read_bytes() == garbage
    # Nothing beside it either (no journal or WAL), only the migrations' lock file.
    assert {p.name for p in path.parent.iterdir()} <= {path.name, path.name + ".migrations.lock"}


async def test_a_database_at_an_unknown_revision_is_refused_and_kept(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "data" / "switchboard.db"
    await upgrade_database(sqlite_url(path))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    before = path.read_bytes()
    for command in (("models", "list"), ("db", "downgrade", "-1")):
        line = one_line(switchboard(env, *command))
        assert f"The database in SWITCHBOARD_DATA_DIR ({path}) is at revision '9999'" in line
        assert "0001, 0002" in line and "Nothing was changed" in line
    assert path.read_bytes() == before


def test_a_data_folder_that_cannot_be_made_names_the_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    # Tests run as root here, which chmod does not stop: use a file where the folder goes.
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    for command, folder, why in (
        (("models", "list"), blocker, "is a file, not a folder"),
        (("models", "list"), blocker / "data", "is inside a file"),
        (("db", "upgrade"), blocker / "data", "is inside a file"),
    ):
        line = one_line(switchboard(env, *command, SWITCHBOARD_DATA_DIR=str(folder)))
        assert "SWITCHBOARD_DATA_DIR" in line and f"{folder} {why}" in line, line
        assert "may write to" in line
    assert blocker.read_text() == "in the way"


def test_a_bad_revision_lists_the_known_ones(env: dict[str, str]) -> None:
    for verb in ("upgrade", "downgrade"):
        line = one_line(switchboard(env, "db", verb, "nope"))
        assert line.startswith(f"Cannot {verb} to 'nope'")
        assert "0001, 0002" in line and "(head)" in line and "base" in line


async def seed(url: str) -> None:
    """A conversation: a prompt with cleaned text, and an answer built from it."""
    engine = create_engine(url)
    try:
        async with create_session_factory(engine)() as session:
            conversation = Conversation(origin="terminal")
            session.add(conversation)
            await session.flush()
            prompt = Message(
                conversation_id=conversation.id, role="user", content="hi", cleaned=True
            )
            session.add(prompt)
            await session.flush()
            answer = Message(
                conversation_id=conversation.id, parent_id=prompt.id, role="assistant", content="yo"
            )
            session.add(answer)
            await session.flush()
            session.add(MessageInput(answer_id=answer.id, position=0, input_id=prompt.id))
            await session.commit()
    finally:
        await engine.dispose()


async def test_downgrade_refuses_to_drop_data_without_yes_and_backs_up_first(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "data" / "switchboard.db"
    url = sqlite_url(path)
    await upgrade_database(url)
    head = await database_revision(url)
    await seed(url)

    line = one_line(switchboard(env, "db", "downgrade", "base"), code=2)
    assert f"Downgrading from {head} to base would drop" in line
    assert "conversations (1 row)" in line and "messages (2 rows)" in line
    assert "message_inputs (1 row)" in line and "registered_models" not in line  # empty
    assert "--yes" in line and "nothing was changed" in line
    assert await database_revision(url) == head

    done = switchboard(env, "db", "downgrade", "base", "--yes")
    assert done.returncode == 0, done.stderr
    [backup] = (tmp_path / "data" / "backups").iterdir()
    assert f"Backed up {path} to {backup}." in done.stdout
    assert f"Database downgraded from {head} to base" in done.stdout
    assert await database_revision(url) is None
    # The copy is the database as it was, data and revision.
    with sqlite3.connect(backup) as copy:
        assert copy.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        assert copy.execute("SELECT count(*) FROM messages").fetchall() == [(2,)]
    copy.close()


async def test_downgrade_minus_one_goes_one_revision_back(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "data" / "switchboard.db")
    await upgrade_database(url)
    plan = await plan_downgrade(url, "-1")
    # The newest revision drops only empty columns here, so no --yes is needed.
    assert plan.undone and not plan.losing
    proc = switchboard(env, "db", "downgrade", "-1")
    assert proc.returncode == 0, proc.stderr
    assert f"Database downgraded from {plan.current} to {plan.target}" in proc.stdout
    assert await database_revision(url) == plan.target

    too_far = one_line(switchboard(env, "db", "downgrade", "-9"))
    assert too_far.startswith("-9 goes below base") and "db downgrade base" in too_far
    up = one_line(switchboard(env, "db", "downgrade", plan.current or "?"))
    assert "only goes down" in up and await database_revision(url) == plan.target


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: SQLite always, PostgreSQL when configured."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "switchboard.db")
    return str(request.getfixturevalue("postgres_url"))


def known_revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    from migrations import alembic_config

    return [
        s.revision
        for s in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()
    ]


async def test_plan_downgrade_counts_what_each_revision_drops(fresh_url: str) -> None:
    url = fresh_url
    await upgrade_database(url)
    await seed(url)

    to_0002 = await plan_downgrade(url, "0002")
    later = tuple(sorted((r for r in known_revisions() if r > "0002"), reverse=True))
    assert to_0002.undone == later and to_0002.target == "0002"
    assert [str(drop) for drop in to_0002.losing] == ["messages.cleaned (1 row)"]
    assert "votes (0 rows)" in [str(drop) for drop in to_0002.dropped], "empty ones are named too"

    to_0001 = await plan_downgrade(url, "0001")
    assert [str(drop) for drop in to_0001.losing] == [
        "message_inputs (1 row)",
        "messages.cleaned (1 row)",
        "messages.kind (2 rows)",
    ]
    nothing = await plan_downgrade(url, "head")
    head = nothing.current
    assert nothing.undone == () and head == max(known_revisions())
    assert await database_revision(url) == head  # planning changes nothing


def test_an_unexpected_error_is_one_line_with_an_id_and_the_traceback_in_the_log(
    env: dict[str, str], tmp_path: Path
) -> None:
    # A command whose work fails with a bug: the real run_async, in a real process.
    script = textwrap.dedent(
        """
        import typer
        from rich.console import Console
        from bot.cli_common import load_settings, run_async

        def main() -> None:
            err = Console(stderr=True, soft_wrap=True)
            load_settings(err)

            async def work() -> None:
                raise KeyError("the detail only the log shows")

            run_async(work, err)

        typer.run(main)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True
    )
    line = one_line(proc)
    log = tmp_path / "data" / "switchboard.log"
    assert line.startswith("Something went wrong (error id ") and f"details are in {log}" in line
    assert "the detail only the log shows" not in proc.stderr
    error_id = line.split("error id ")[1].split(")")[0]
    text = log.read_text()
    assert f"unexpected error {error_id}" in text
    assert "Traceback" in text and "the detail only the log shows" in text
