"""The `switchboard` command line, run as a real subprocess against the fake model server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.service import write_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_server():
    with FakeOpenAI.in_thread() as fake:
        yield fake


@pytest.fixture
def cli_env(tmp_path: Path, fake_server: FakeOpenAI) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SWITCHBOARD_") and k not in {"DISCORD_TOKEN", "OPENAI_API_KEY"}
    }
    env.update(
        SWITCHBOARD_CONFIG=str(write_config(tmp_path / "switchboard.toml", fake_server.base_url)),
        SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
        SWITCHBOARD_MAX_RETRIES="0",
        HF_HUB_OFFLINE="1",
    )
    return env


def switchboard(
    env: dict[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chat_json_one_object_per_line(cli_env: dict[str, str], fake_server: FakeOpenAI) -> None:
    lines = [
        "hello there",
        "/model list",
        "and again",
        "/model set backup",
        "/model set nonsense",
        "/new",
        "fresh start",
        "/system set Be brief.",
    ]
    proc = switchboard(
        cli_env,
        "chat",
        "--json",
        "--guild",
        "5",
        "--channel",
        "6",
        "--user",
        "ada",
        stdin="\n".join(lines) + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(lines)
    first, listing, second, set_ok, set_bad, new, third, system = out
    assert set(first) >= {
        "reply",
        "model",
        "conversation_id",
        "message_id",
        "latency_ms",
        "usage",
        "fallback_from",
        "error",
    }
    assert (
        first["reply"] == "Echo: hello there"
        and first["model"] == "main"
        and first["error"] is None
    )
    assert first["usage"]["prompt_tokens"] > 0 and first["fallback_from"] is None
    assert listing["command"] == "model list" and listing["ok"] and "backup" in listing["message"]
    assert second["conversation_id"] == first["conversation_id"]
    assert "hello there" in str(fake_server.chat_requests[1].body["messages"])
    assert (
        set_ok == {"command": "model set", "ok": True, "message": set_ok["message"]}
        and "backup" in set_ok["message"]
    )
    assert set_bad["ok"] is False and "nonsense" in set_bad["message"]
    assert new["ok"] and third["conversation_id"] != first["conversation_id"]
    assert third["model"] == "backup"
    assert system["ok"]


def test_chat_json_exits_zero_when_replies_fail(
    cli_env: dict[str, str], fake_server: FakeOpenAI
) -> None:
    fake_server.fail_next(500, times=20)
    proc = switchboard(cli_env, "chat", "--json", stdin="/model set solo\nhello\nagain\n")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 3
    for reply in out[1:]:
        assert reply["reply"] is None and "solo" in reply["error"]
    assert "Traceback" not in proc.stdout + proc.stderr


def with_dead_models(env: dict[str, str], *names: str) -> dict[str, str]:
    """The test config plus models whose endpoint refuses connections."""
    config = Path(env["SWITCHBOARD_CONFIG"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tables = "".join(
        f'\n[models.{name}]\nprovider = "openai-compatible"\nmodel = "x"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\n'
        for name in names
    )
    config.write_text(config.read_text() + tables)
    return env


def test_compare_json_one_object_per_model_and_a_failure_of_its_own(
    cli_env: dict[str, str], fake_server: FakeOpenAI
) -> None:
    env = with_dead_models(cli_env, "dead")
    proc = switchboard(env, "compare", "What is 2+2?", "--models", "main, solo,dead", "--json")
    assert proc.returncode == 0, proc.stderr
    main, solo, dead = (json.loads(line) for line in proc.stdout.splitlines())
    for answer in (main, solo, dead):
        assert set(answer) >= {
            "model",
            "reply",
            "latency_ms",
            "ttft_ms",
            "usage",
            "cost_usd",
            "error",
        }
    assert (main["model"], main["reply"], main["error"]) == ("main", "Echo: What is 2+2?", None)
    assert main["usage"]["total_tokens"] > 0 and main["cost_usd"] > 0 and main["ttft_ms"] > 0
    assert solo["reply"] == "Echo: What is 2+2?" and solo["cost_usd"] == 0.0
    assert dead["model"] == "dead" and dead["reply"] is None and "dead" in dead["error"]
    assert len({a["prompt_id"] for a in (main, solo, dead)}) == 1
    assert sorted(r.model for r in fake_server.chat_requests) == ["fake-model", "fake-solo"]

    all_fail = switchboard(env, "compare", "hi", "--models", "dead,dead", "--json")
    assert all_fail.returncode == 1 and "at least two" in all_fail.stderr
    with_dead_models(env, "dead2")
    all_fail = switchboard(env, "compare", "hi", "--models", "dead,dead2", "--json")
    assert all_fail.returncode == 1, "every model failed"
    assert [json.loads(line)["error"] is not None for line in all_fail.stdout.splitlines()] == [
        True,
        True,
    ]


def test_compare_prints_a_table_and_refuses_unknown_models_in_one_line(
    cli_env: dict[str, str],
) -> None:
    proc = switchboard(cli_env, "compare", "hello", "--models", "main,solo")
    assert proc.returncode == 0, proc.stderr
    for shown in ("main", "solo", "Echo: hello", " ms", "$0.0000", "free"):
        assert shown in proc.stdout, shown
    unknown = switchboard(cli_env, "compare", "hello", "--models", "main,nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == ("No model named 'nope'. See `switchboard models list`.")
    alone = switchboard(cli_env, "compare", "hello")
    assert alone.returncode == 1 and "Only main would answer" in alone.stderr
    assert "Traceback" not in proc.stderr + unknown.stderr + alone.stderr


def test_missing_api_key_names_the_variable(tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = tmp_path / "openai.toml"
    config.write_text(
        'default_model = "gpt"\n[models.gpt]\nprovider = "openai"\nmodel = "gpt-4o-mini"\napi_key_env = "OPENAI_API_KEY"\n'
    )
    proc = switchboard(
        {**cli_env, "SWITCHBOARD_CONFIG": str(config)}, "chat", "--json", stdin="hi\n"
    )
    assert proc.returncode == 0
    reply = json.loads(proc.stdout)
    assert "OPENAI_API_KEY" in reply["error"]


def test_run_without_token_says_which_variable(cli_env: dict[str, str]) -> None:
    proc = switchboard(cli_env, "run")
    assert proc.returncode == 2
    assert "DISCORD_TOKEN" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_models_list_and_check(
    cli_env: dict[str, str], tmp_path: Path, fake_server: FakeOpenAI
) -> None:
    listing = switchboard(cli_env, "models", "list")
    assert listing.returncode == 0, listing.stderr
    for name in ("main", "backup", "solo", "tiny"):
        assert name in listing.stdout

    config = tmp_path / "check.toml"
    config.write_text(
        'default_model = "up"\n'
        f'[models.up]\nprovider = "openai-compatible"\nmodel = "fake-model"\nbase_url = "{fake_server.base_url}"\n'
        '[models.down]\nprovider = "openai-compatible"\nmodel = "x"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    check = switchboard({**cli_env, "SWITCHBOARD_CONFIG": str(config)}, "models", "check")
    assert check.returncode == 1  # one model is down
    up_line = next(line for line in check.stdout.splitlines() if " up " in line)
    down_line = next(line for line in check.stdout.splitlines() if " down " in line)
    assert "yes" in up_line and "no" in down_line and "unreachable" in check.stdout.lower()


def test_db_upgrade_creates_the_database(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = switchboard(cli_env, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "switchboard.db").stat().st_size > 0


def test_bad_config_is_one_clear_message(cli_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        'default_model = "a"\n[models.a]\nprovider = "openai"\nmodel = "m"\napi_key = "sk-secret-123"\n'
    )
    proc = switchboard(
        {**cli_env, "SWITCHBOARD_CONFIG": str(config)}, "chat", "--json", stdin="hi\n"
    )
    assert proc.returncode == 1
    assert "api_key_env" in proc.stderr and "sk-secret-123" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_error_messages_are_shown_exactly_as_written(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "odd.toml"
    config.write_text('default_model = "a"\n[models]\na = "not a table"\n')
    proc = switchboard({**cli_env, "SWITCHBOARD_CONFIG": str(config)}, "models", "list")
    assert proc.returncode == 1
    # The table's name in brackets survives: it is not taken for rich markup.
    assert "models.a must be a table ([models.a])." in proc.stderr


async def test_run_builds_the_export_tune_and_knowledge_cogs_with_both_roles(
    service_settings,
) -> None:
    from bot.app import open_app
    from bot.cli import extra_cogs
    from bot.discord.export import ExportCog
    from bot.discord.knowledge import KnowledgeCog
    from bot.discord.tune import TuneCog

    settings = service_settings.model_copy(
        update={"manager_role": "Mods", "knowledge_role": "Librarians"}
    )
    async with open_app(settings) as app:
        export, tune, cog = extra_cogs(app)
    assert isinstance(tune, TuneCog)
    assert tune.tunes is app.tunes and tune.manager_role == "Mods"
    assert isinstance(cog, KnowledgeCog)
    assert (cog.knowledge_role, cog.manager_role) == ("Librarians", "Mods")
    assert cog.kb is app.knowledge and cog.service is app.service
    assert isinstance(export, ExportCog)
    assert export.exporter is app.exporter and export.manager_role == "Mods"


def test_a_bad_setting_names_the_variable_but_not_its_value(cli_env: dict[str, str]) -> None:
    proc = switchboard(
        {**cli_env, "SWITCHBOARD_MAX_RETRIES": "s3cr3t-ish", "CHROMA_PORT": "nope"},
        "models",
        "list",
    )
    assert proc.returncode == 2
    assert "SWITCHBOARD_MAX_RETRIES" in proc.stderr and "CHROMA_PORT" in proc.stderr
    assert "s3cr3t-ish" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_models_add_gguf_registers_a_file_for_every_process(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    from chains.gguf import bundled_models

    gguf = bundled_models()["smollm2-135m-instruct"]
    added = switchboard(
        cli_env, "models", "add-gguf", str(gguf), "--name", "my-smol", "--context-size", "1024"
    )
    assert added.returncode == 0, added.stderr
    assert "Registered my-smol" in added.stdout
    # Another process sees it (the registry reads the models registered in the database).
    listing = switchboard(cli_env, "models", "list")
    assert "my-smol" in listing.stdout and "1,024" in listing.stdout

    taken = switchboard(cli_env, "models", "add-gguf", str(gguf), "--name", "main")
    assert taken.returncode == 1 and "`main` is already a model in" in taken.stderr
    configured = switchboard(
        cli_env, "models", "add-gguf", str(gguf), "--name", "main", "--replace"
    )
    assert configured.returncode == 1 and "already a model in" in configured.stderr

    # A registered name is refused too, unless --replace.
    again = switchboard(cli_env, "models", "add-gguf", str(gguf), "--name", "my-smol")
    assert again.returncode == 1
    assert "`my-smol` is already a registered model" in again.stderr and "--replace" in again.stderr
    replaced = switchboard(
        cli_env, "models", "add-gguf", str(gguf), "--name", "my-smol", "--context-size", "2048",
        "--replace",
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert "2,048" in switchboard(cli_env, "models", "list").stdout

    removed = switchboard(cli_env, "models", "remove", "my-smol")
    assert removed.returncode == 0 and "Removed my-smol" in removed.stdout
    assert "my-smol" not in switchboard(cli_env, "models", "list").stdout
    gone = switchboard(cli_env, "models", "remove", "my-smol")
    assert gone.returncode == 1 and "See `switchboard models list`." in gone.stderr
    kept = switchboard(cli_env, "models", "remove", "main")
    assert kept.returncode == 1 and "remove it from that file" in kept.stderr
    missing = switchboard(
        cli_env, "models", "add-gguf", str(tmp_path / "nope.gguf"), "--name", "nope"
    )
    assert (
        missing.returncode == 1
        and "nope.gguf" in missing.stderr
        and "Traceback" not in missing.stderr
    )


def test_an_explicit_config_that_does_not_exist_is_an_error_naming_it(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "typo.toml"
    proc = switchboard(
        {**cli_env, "SWITCHBOARD_CONFIG": str(missing)}, "chat", "--json", stdin="hi\n"
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert str(missing) in proc.stderr and "SWITCHBOARD_CONFIG" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_messages_point_to_cli_commands(cli_env: dict[str, str]) -> None:
    proc = switchboard(cli_env, "models", "check", "mian")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "No model named 'mian'. Did you mean 'main'? See `switchboard models list`."
    )


def test_run_fails_in_one_line_without_library_noise(cli_env: dict[str, str]) -> None:
    """No voice-support warnings, no migration logs: only the reason it cannot run."""
    env = {**cli_env, "DISCORD_TOKEN": "not-a-token.not.valid"}  # refused, or Discord unreachable
    proc = switchboard(env, "run")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Discord" in proc.stderr
    verbose = switchboard(env, "run", "--verbose")
    assert verbose.returncode == 1 and "alembic" in verbose.stderr
    assert "voice will NOT be supported" not in verbose.stderr  # the bot has no voice


def test_chat_json_survives_input_that_is_not_utf8(cli_env: dict[str, str]) -> None:
    """Whatever the locale's error handler says: every line read is answered, none lost."""
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--json"],
        input=b"before\n\xff\xfe broken\n\nafter\n",
        env={**cli_env, "PYTHONIOENCODING": "utf-8:strict"},
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [o["reply"] for o in out] == [
        "Echo: before",
        "Echo: \ufffd\ufffd broken",
        None,
        "Echo: after",
    ]
    assert "empty" in out[2]["error"]
    assert b"Traceback" not in proc.stderr
