"""Secrets never leak: providers that repeat the key they were sent, through every way out.

The fake model server answers with error bodies that echo the key each request carried
(`fail_next(..., echo_key=True)`), and OpenAI's "Invalid URL" 404 repeats a base_url's
query. Keys of several shapes, and one of no known shape that only the redactor's list of
values can catch, must not reach `chat --json`, `models check`, the stored rows, the
Discord footer, `/model info`, the log, or `knowledge add` / `knowledge search`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from typer.testing import CliRunner

from bot.app import App, open_app, secrets_redactor
from bot.cli_knowledge import knowledge_app
from bot.service import ChatService
from core.redact import MARK
from core.settings import Settings
from store.models import Message
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.discord import World
from tests.fixtures.knowledge import knowledge_settings

REPO = Path(__file__).resolve().parent.parent

# The variable each model's key is in, and the key (each of another shape).
KEYS = {
    "SB_TEST_OPENAI_KEY": "sk-proj-4fGh8JkLmN0pQrStUvWxYz12_aBcDeFgHiJ-kLmNoPqR",
    "SB_TEST_GROQ_KEY": "gsk_8sd7F6g5H4j3K2l1ZxCvBnMqWeRtYuIoPaSdFgHjKlZxCvBnM",
    "SB_TEST_HF_KEY": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "SB_TEST_JWT": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzd2l0Y2hib2FyZCJ9.Zm9vYmFyYmF6cXV4",
    "SB_TEST_AZURE_KEY": "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c",
    "SB_TEST_ODD_KEY": "Tr0ub4dor&3!correct~horse",  # no known shape: caught by value only
}
QUERY_KEY = "qk9Vb7Nm5Lk3Jh1Gf"  # inside a base_url's query
URL_PASSWORD = "pa55-in-the-url"  # inside a base_url's userinfo
SECRETS = [*KEYS.values(), QUERY_KEY, URL_PASSWORD]
# The models that reach the fake's chat endpoint (and so get its echoing errors).
ECHOING = ["openai-style", "groq-style", "hf-style", "jwt-style", "azure-style", "odd-style"]


def leaked(text: str) -> list[str]:
    """The secrets (or their URL-encoded forms) found in `text`."""
    return [s for s in SECRETS if s in text or quote(s, safe="") in text]


def squeezed(table: str) -> str:
    """A rich table's text without spaces, line breaks and borders: a key wrapped over lines is whole again."""
    return re.sub(r"[\s│┃|]", "", table)


def switchboard(
    env: dict[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the real `switchboard` command line."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_keyed_config(path: Path, fake: FakeOpenAI) -> Path:
    """A registry whose every model has a credential of another shape."""
    compatible = 'provider = "openai-compatible"\nmodel = "fake-model"\n'
    path.write_text(
        'default_model = "openai-style"\n'
        f'[models.openai-style]\n{compatible}base_url = "{fake.base_url}"\napi_key_env = "SB_TEST_OPENAI_KEY"\n'
        f'[models.groq-style]\n{compatible}base_url = "{fake.base_url}"\napi_key_env = "SB_TEST_GROQ_KEY"\n'
        f'[models.hf-style]\n{compatible}base_url = "{fake.base_url}"\napi_key_env = "SB_TEST_HF_KEY"\n'
        f'[models.jwt-style]\n{compatible}base_url = "{fake.base_url}"\napi_key_env = "SB_TEST_JWT"\n'
        '[models.azure-style]\nprovider = "azure-openai"\nmodel = "gpt-4o"\ndeployment = "d"\n'
        f'base_url = "{fake.root_url}"\napi_version = "2024-10-21"\napi_key_env = "SB_TEST_AZURE_KEY"\n'
        f'[models.odd-style]\n{compatible}base_url = "{fake.base_url}"\napi_key_env = "SB_TEST_ODD_KEY"\n'
        f'[models.url-key]\n{compatible}base_url = "{fake.base_url}?api-key={QUERY_KEY}"\n'
        f'[models.url-password]\n{compatible}base_url = "http://bot:{URL_PASSWORD}@127.0.0.1:9/v1"\n'
    )
    return path


def test_the_fake_really_echoes_the_key() -> None:
    """The premise of every test below: the error bodies do carry the key."""
    with FakeOpenAI.in_thread() as fake:
        fake.fail_next(400, echo_key=True)
        key = KEYS["SB_TEST_ODD_KEY"]
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        echoed = httpx.post(
            f"{fake.base_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        )
        invalid = httpx.post(f"{fake.base_url}?api-key={QUERY_KEY}/chat/completions", json=body)
    assert echoed.status_code == 400 and echoed.text.count(key) >= 2
    assert invalid.status_code == 404 and QUERY_KEY in invalid.json()["error"]["message"]


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.in_thread() as fake:
        yield fake


@pytest.fixture
def keyed_env(tmp_path: Path, fake_server: FakeOpenAI) -> dict[str, str]:
    """The CLI's environment: the keyed registry, the keys, and wide enough that rich never wraps a key."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SWITCHBOARD_") and k not in {"DISCORD_TOKEN", "OPENAI_API_KEY"}
    }
    config = write_keyed_config(tmp_path / "keyed.toml", fake_server)
    env.update(
        KEYS,
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
        SWITCHBOARD_MAX_RETRIES="0",
        HF_HUB_OFFLINE="1",
        COLUMNS="2000",
    )
    return env


def test_chat_json_the_stored_rows_and_the_log_show_no_key(
    keyed_env: dict[str, str], fake_server: FakeOpenAI, tmp_path: Path
) -> None:
    fake_server.fail_next(400, times=len(ECHOING), echo_key=True)
    names = [*ECHOING, "url-key", "url-password"]
    lines = [line for name in names for line in (f"/model set {name}", "hello")]
    lines.append("/model info url-password")
    proc = switchboard(keyed_env, "chat", "--json", stdin="\n".join(lines) + "\n")

    assert proc.returncode == 0, proc.stderr
    assert leaked(proc.stdout) == [] and leaked(proc.stderr) == []
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    replies = {name: out[2 * i + 1] for i, name in enumerate(names)}
    for name in ECHOING:  # the provider's own words are quoted, the key in them masked
        error = replies[name]["error"]
        assert error.startswith(f"{name} refused the request (HTTP 400: Invalid request.")
        assert MARK in error, error
    assert "HTTP 404: Invalid URL (POST /v1/?api-key=[redacted])" in replies["url-key"]["error"]
    assert replies["url-password"]["error"].startswith("url-password ")
    info = json.loads(out[-1]["message"])
    assert info["base_url"] == "http://bot:[redacted]@127.0.0.1:9/v1"
    # The log (stderr: warnings and up) names each failure, scrubbed like everything else.
    assert "model openai-style failed: bad_request" in proc.stderr and MARK in proc.stderr

    with sqlite3.connect(tmp_path / "data" / "switchboard.db") as db:
        stored = [
            row[0] for row in db.execute("SELECT error FROM messages WHERE error IS NOT NULL")
        ]
    assert len(stored) == len(names)  # one failed answer per model
    assert leaked("\n".join(stored)) == []
    assert sum(MARK in error for error in stored) == len(ECHOING) + 1  # and url-key's 404


def test_models_check_and_list_show_no_key(
    keyed_env: dict[str, str], fake_server: FakeOpenAI
) -> None:
    fake_server.fail_next(400, times=len(ECHOING), echo_key=True)
    check = switchboard(keyed_env, "models", "check")

    assert check.returncode == 1  # nothing answered
    assert leaked(check.stdout + check.stderr) == [] and leaked(squeezed(check.stdout)) == []
    for name in ECHOING:
        [line] = [row for row in check.stdout.splitlines() if f" {name} " in row]
        assert "refused the request (HTTP 400" in line and MARK in line, line
    assert "api-key=[redacted]" in check.stdout

    listing = switchboard(keyed_env, "models", "list")
    assert listing.returncode == 0, listing.stderr
    assert "url-password" in listing.stdout and leaked(listing.stdout + listing.stderr) == []


async def test_the_app_log_scrubs_every_secret_it_holds(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """Tracebacks and arguments in the log lose the keys, even ones of no known shape."""
    settings = Settings(
        config=write_keyed_config(tmp_path / "keyed.toml", fake_openai),
        data_dir=tmp_path / "data",
        environ=dict(KEYS),
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # as the CLI's basicConfig puts on the root logger
    root = logging.getLogger()
    root.addHandler(handler)
    log = logging.getLogger("tests.secrets")
    try:
        async with open_app(settings, knowledge=False):
            try:
                raise RuntimeError(f"echoed {' '.join(SECRETS)}")
            except RuntimeError:
                log.exception("call failed with %s", KEYS["SB_TEST_ODD_KEY"])
        log.warning("after close %s", KEYS["SB_TEST_ODD_KEY"])  # the filter went with the app
    finally:
        root.removeHandler(handler)
    during, after = stream.getvalue().split("after close ")
    assert "Traceback" in during and "RuntimeError: echoed [redacted]" in during
    assert leaked(during) == [] and during.count(MARK) == len(SECRETS) + 1
    assert after.strip() == KEYS["SB_TEST_ODD_KEY"]


def test_the_redactor_knows_the_token_the_database_and_the_embedding_secrets(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        environ={"SB_TEST_EMBED_KEY": "embedding-key-of-an-odd-shape"},
        database_url="postgresql://bot:db-pa55word@db.example/sb?sslpassword=ssl-pa55",
        embedding_base_url="https://tok-en-user@embed.example/v1",
        embedding_api_key_env="SB_TEST_EMBED_KEY",
        **{"DISCORD_TOKEN": SecretStr("discord-token-of-an-odd-shape")},
    )
    redact = secrets_redactor(settings)
    text = "db-pa55word ssl-pa55 tok-en-user embedding-key-of-an-odd-shape discord-token-of-an-odd-shape"
    assert redact(text) == " ".join([MARK] * 5)


# -- Discord -----------------------------------------------------------------------------


@pytest.fixture
def service_settings(tmp_path: Path, fake_openai: FakeOpenAI) -> Settings:
    """The Discord world's settings: a keyed main model that falls back to another keyed one."""
    config = tmp_path / "switchboard.toml"
    compatible = f'provider = "openai-compatible"\nbase_url = "{fake_openai.base_url}"\n'
    config.write_text(
        'default_model = "main"\n'
        f'[models.main]\n{compatible}model = "fake-model"\napi_key_env = "SB_TEST_ODD_KEY"\nfallback = "backup"\n'
        f'[models.backup]\n{compatible}model = "fake-backup"\napi_key_env = "SB_TEST_JWT"\n'
        f'[models.proxied]\nprovider = "openai-compatible"\nmodel = "m"\n'
        f'base_url = "https://bot:{URL_PASSWORD}@proxy.example/v1?api-key={QUERY_KEY}"\n'
    )
    return Settings(
        config=config,
        data_dir=tmp_path / "data",
        environ=dict(KEYS),
        max_retries=0,
        request_timeout=5,
        messages_per_minute=0,
    )


async def test_the_discord_footer_and_the_stored_attempt_show_no_key(
    world: World, fake_openai: FakeOpenAI, chat_service: ChatService, chat_app: App
) -> None:
    fake_openai.fail_next(400, echo_key=True)  # main fails, repeating its key; backup answers

    await world.alice.send(world.channel, f"{world.bot.user.mention} hi")

    [answer] = [m for m in world.channel.history() if m.author.id == world.bot.user.id]
    body, footer = answer.content.split("\n-# ", 1)
    assert body == "Echo: hi"
    assert footer.startswith("answered by backup (main was unavailable: main refused the request")
    assert MARK in footer and leaked(answer.content) == []

    await chat_service.writer.drain()
    async with chat_app.sessions() as session:
        errors = list(
            await session.scalars(select(Message.error).where(Message.error.is_not(None)))
        )
    assert len(errors) == 1 and MARK in errors[0] and leaked(errors[0]) == []


async def test_model_info_in_discord_masks_the_base_url(world: World) -> None:
    world.open_to_everyone("model")
    shown = await world.alice.slash(world.channel, "model info", name="proxied")

    [embed] = shown.response.embeds
    [endpoint] = [f.value for f in embed.fields if f.name == "Endpoint"]
    assert endpoint == "`https://bot:[redacted]@proxy.example/v1?api-key=[redacted]`"
    assert leaked(str(embed.to_dict())) == []


# -- knowledge ---------------------------------------------------------------------------

EMBED_KEY = "Emb3d!ng~k3y&of-no-shape"  # only the app's redactor knows it is one


@pytest.fixture
def embedding_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FakeOpenAI, Path]]:
    """The knowledge CLI on an OpenAI-compatible embeddings endpoint (the fake) with a key."""
    settings = knowledge_settings("embedded", tmp_path / "data")
    with FakeOpenAI.in_thread() as fake:
        for name, value in {
            "SWITCHBOARD_DATA_DIR": str(settings.data_dir),
            "SWITCHBOARD_KNOWLEDGE_COLLECTION_PREFIX": settings.knowledge_collection_prefix,
            "SWITCHBOARD_EMBEDDING_PROVIDER": "openai-compatible",
            "SWITCHBOARD_EMBEDDING_MODEL": "fake-embedder",
            "SWITCHBOARD_EMBEDDING_BASE_URL": fake.base_url,
            "SWITCHBOARD_EMBEDDING_API_KEY_ENV": "SB_TEST_EMBED_KEY",
            "SB_TEST_EMBED_KEY": EMBED_KEY,
            "COLUMNS": "2000",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("CHROMA_HOST", raising=False)
        # No config: the built-in registry (a config file named but missing is an error).
        monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
        monkeypatch.chdir(tmp_path)
        doc = tmp_path / "guide.md"
        doc.write_text("# Guide\n\nError code E-4711 means the lid is not locked.\n")
        yield fake, doc


def test_knowledge_add_and_search_show_one_clean_line(
    embedding_cli: tuple[FakeOpenAI, Path],
) -> None:
    fake, doc = embedding_cli
    runner = CliRunner()
    assert runner.invoke(knowledge_app, ["add", str(doc), "--guild", "9"]).exit_code == 0

    fake.fail_next(400, times=2, echo_key=True)  # the whole batch, then the file on its own
    added = runner.invoke(knowledge_app, ["add", str(doc), "--guild", "10"])
    assert added.exit_code == 1  # the file was refused
    table = squeezed(added.stdout)
    assert EMBED_KEY not in added.output + table and "Traceback" not in added.output
    assert "guide.mdrefused" in table and "Theembeddingsendpointrefusedtherequest" in table
    assert MARK in table

    fake.fail_next(400, echo_key=True)
    searched = runner.invoke(knowledge_app, ["search", "lid", "--guild", "9"])
    assert searched.exit_code == 1
    assert searched.stdout == "" and len(searched.stderr.strip().splitlines()) == 1
    assert searched.stderr.startswith("The embeddings endpoint refused the request")
    assert MARK in searched.stderr and EMBED_KEY not in searched.output

    fake.fail_next(401, echo_key=True)
    refused = runner.invoke(knowledge_app, ["search", "lid", "--guild", "9"])
    assert refused.exit_code == 1 and "SWITCHBOARD_EMBEDDING_API_KEY_ENV" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and EMBED_KEY not in refused.output


async def test_a_chat_answers_without_passages_while_the_embeddings_endpoint_is_down(
    service_settings: Settings,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from core.messages import Author, ChatRequest, Place

    kb = knowledge_settings("embedded", tmp_path / "kb")
    settings = service_settings.model_copy(
        update={
            "chroma_host": None,
            "knowledge_collection_prefix": kb.knowledge_collection_prefix,
            "embedding_provider": "openai-compatible",
            "embedding_model": "fake-embedder",
            "embedding_base_url": fake_openai.base_url,
            "embedding_api_key_env": "SB_TEST_EMBED_KEY",
            "environ": {**KEYS, "SB_TEST_EMBED_KEY": EMBED_KEY},
        }
    )
    place = Place(5, 6)
    async with open_app(settings) as app:
        assert app.knowledge is not None
        await app.knowledge.add_bytes(
            5, [("rules.md", b"The event code is ZX-4471.")], uploader="m"
        )
        await app.service.set_knowledge(place, "channel", True, Author(3, "mod"))
        # The first request and both of the embedder's retries fail, repeating the key.
        fake_openai.fail_next(503, times=3, retry_after=0.01, echo_key=True)
        with caplog.at_level(logging.WARNING, logger="bot.service.chat"):
            result = await app.service.answer(ChatRequest(place, Author(1, "a"), "event code?"))
    assert result.error is None and result.sources == ()
    assert result.reply == "Echo: event code?"
    [warning] = [r for r in caplog.records if r.name == "bot.service.chat"]
    assert "The embeddings endpoint had a server error" in warning.getMessage()
    assert warning.exc_info is None and EMBED_KEY not in caplog.text


def test_an_unreachable_embeddings_endpoint_is_one_line_with_its_url_masked() -> None:
    from core.errors import Unavailable
    from knowledge.embeddings import OpenAIEmbedder

    embedder = OpenAIEmbedder(
        "m",
        api_key=SecretStr(EMBED_KEY),
        base_url=f"http://bot:{URL_PASSWORD}@127.0.0.1:9/v1?api-key={QUERY_KEY}",
        provider="openai-compatible",
        timeout=5,
    )
    with pytest.raises(Unavailable) as caught:  # after the client's own two retries
        embedder.embed_query("x")
    assert str(caught.value) == (
        "Cannot reach the embeddings endpoint at http://bot:[redacted]@127.0.0.1:9/v1?api-key=[redacted] "
        "(openai-compatible:m). Check SWITCHBOARD_EMBEDDING_BASE_URL and that the server is running."
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
