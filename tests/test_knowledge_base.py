"""KnowledgeBase on real Chroma with real local embeddings: uploads, replacement, refusals, isolation, models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import knowledge.base as base_module
import knowledge.ingest as ingest_module
from bot.app import knowledge_config
from core.errors import ConfigError, NotFound, UserError
from core.settings import Settings
from knowledge.base import KnowledgeBase
from knowledge.embeddings import LocalEmbedder
from knowledge.types import ProgressUpdate, RemoteFile
from tests.fixtures.knowledge import encrypt_pdf, make_docx, make_pdf, make_zip_bomb, new_guild_id

GUIDE = b"# Blender guide\n\nError code E-4711 means the lid is not locked.\n\n## Warranty\n\nThe blender has a two year warranty.\n"
SHIPPING = b"Parcels ship from Rotterdam and arrive within three business days."


class RenamedEmbedder:
    """The real local model under another name, standing in for a change of embedding model."""

    def __init__(self, inner: LocalEmbedder, name: str) -> None:
        self._inner = inner
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._inner.embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self._inner.embed_query(text)


def _chroma_rows(kb: KnowledgeBase, guild_id: int) -> dict:
    collection = kb._open(guild_id, create=False)
    return collection.get(include=["metadatas", "documents"])


async def test_add_list_search_remove(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    report = await kb.add_bytes(
        guild, [("guide.md", GUIDE), ("shipping.txt", SHIPPING)], uploader="alice#1"
    )
    assert [(r.name, r.status) for r in report.results] == [
        ("guide.md", "added"),
        ("shipping.txt", "added"),
    ]
    docs = await kb.list_documents(guild)
    assert [(d.name, d.chunks, d.bytes, d.uploader) for d in docs] == [
        ("guide.md", 2, len(GUIDE), "alice#1"),
        ("shipping.txt", 1, len(SHIPPING), "alice#1"),
    ]

    sources = await kb.search(guild, "what does E-4711 mean?", k=2)
    assert sources[0].document == "guide.md" and sources[0].location == "# Blender guide"
    assert "E-4711" in sources[0].text and 0 < sources[0].score <= 1

    removed = await kb.remove(guild, "guide.md")
    assert removed.name == "guide.md"
    assert [d.name for d in await kb.list_documents(guild)] == ["shipping.txt"]
    assert all(s.document != "guide.md" for s in await kb.search(guild, "E-4711 lid", k=5))
    with pytest.raises(NotFound, match="/knowledge list"):
        await kb.remove(guild, "guide.md")


async def test_chunks_carry_their_provenance(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    report = await kb.add_bytes(guild, [("guide.md", GUIDE)], uploader="alice#1")
    doc_id = report.results[0].document_id
    rows = _chroma_rows(kb, guild)
    metas = sorted(rows["metadatas"], key=lambda m: m["position"])
    assert [m["position"] for m in metas] == [0, 1]
    assert [m["location"] for m in metas] == ["# Blender guide", "## Warranty"]
    for meta in metas:
        assert (
            meta["doc_id"] == doc_id
            and meta["name"] == "guide.md"
            and meta["uploader"] == "alice#1"
        )
        assert meta["added_at"] > 0 and len(meta["hash"]) == 16 and len(meta["doc_hash"]) == 64
        assert (
            meta["uploader_name"] == "alice#1" and "uploader_id" not in meta
        )  # no id: added without one
    assert sorted(rows["ids"]) == [f"{doc_id}-0", f"{doc_id}-1"]


async def test_uploader_name_and_id_are_kept_apart(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    await kb.add_bytes(
        guild, [("guide.md", GUIDE)], uploader="Alice Smith", uploader_id=123456789012345678
    )
    meta = _chroma_rows(kb, guild)["metadatas"][0]
    assert (meta["uploader_name"], meta["uploader_id"]) == ("Alice Smith", 123456789012345678)
    [doc] = await kb.list_documents(guild)
    assert (doc.uploader_name, doc.uploader_id) == ("Alice Smith", 123456789012345678)
    assert doc.uploader == "Alice Smith (123456789012345678)"  # what the lists show, as before


async def test_documents_stored_with_the_uploader_as_one_text_still_list(kb: KnowledgeBase) -> None:
    # Chunks written before uploader_name and uploader_id existed hold only "uploader": "name (id)".
    guild = new_guild_id()
    await kb.add_bytes(guild, [("new.txt", SHIPPING)], uploader="bob", uploader_id=42)
    old = {
        "position": 0,
        "added_at": 1_700_000_000.0,
        "hash": "0" * 16,
        "doc_bytes": 10,
        "doc_chunks": 1,
    }
    rows = [
        ("discord.md", "Alice Smith (123456789012345678)"),
        ("terminal.md", "ops"),
        ("team.md", "support (EU)"),  # brackets without an id are part of the name
    ]
    texts = [f"old document {name}" for name, _ in rows]
    collection = kb._open(guild, create=True)
    collection.add(
        ids=[f"old{n}-0" for n in range(len(rows))],
        embeddings=list(kb.embedder.embed_documents(texts)),
        documents=texts,
        metadatas=[
            {**old, "doc_id": f"old{n}", "name": name, "uploader": who, "doc_hash": str(n) * 64}
            for n, (name, who) in enumerate(rows)
        ],
    )
    docs = {d.name: d for d in await kb.list_documents(guild)}
    assert {name: (d.uploader_name, d.uploader_id, d.uploader) for name, d in docs.items()} == {
        "discord.md": ("Alice Smith", 123456789012345678, "Alice Smith (123456789012345678)"),
        "terminal.md": ("ops", None, "ops"),
        "team.md": ("support (EU)", None, "support (EU)"),
        "new.txt": ("bob", 42, "bob (42)"),
    }


async def test_remote_files_are_checked_once_and_only_those_that_pass_are_fetched(
    kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real_precheck = ingest_module.precheck

    def counting_precheck(name: str, size: int, max_file_bytes: int) -> str | None:
        checked.append(name)
        return real_precheck(name, size, max_file_bytes)

    monkeypatch.setattr(ingest_module, "precheck", counting_precheck)
    fetched: list[str] = []

    def remote(
        name: str, data: bytes, *, size: int | None = None, failure: str | None = None
    ) -> RemoteFile:
        async def read() -> bytes:
            fetched.append(name)
            if failure is not None:
                raise UserError(failure)
            return data

        return RemoteFile(name, len(data) if size is None else size, read)

    lost = "lost.txt could not be downloaded from Discord (503); try again."
    files = [
        remote("deck.pptx", b"PK\x03\x04"),
        remote("guide.md", GUIDE),
        remote("lost.txt", b"never arrives", failure=lost),
        remote("huge.txt", b"", size=1 << 40),
        remote("shipping.txt", SHIPPING),
    ]
    guild = new_guild_id()
    report = await kb.add_remote(guild, files, uploader="alice", uploader_id=7)
    assert [(r.name, r.status) for r in report.results] == [
        ("deck.pptx", "refused"),
        ("guide.md", "added"),
        ("lost.txt", "refused"),
        ("huge.txt", "refused"),
        ("shipping.txt", "added"),
    ]
    reasons = [r.reason or "" for r in report.results]
    assert ".docx" in reasons[0] and reasons[2] == lost and "limit per file" in reasons[3]
    assert fetched == [
        "guide.md",
        "lost.txt",
        "shipping.txt",
    ]  # nothing refused up front was downloaded
    assert sorted(checked) == sorted(f.name for f in files)  # each file checked once
    assert [(d.name, d.uploader_id) for d in await kb.list_documents(guild)] == [
        ("guide.md", 7),
        ("shipping.txt", 7),
    ]


def test_the_knowledge_package_does_not_read_the_settings() -> None:
    # knowledge/ takes its small config objects; only the wiring (bot.app) knows Settings.
    code = (
        "import sys, knowledge.base, knowledge.evaluate, knowledge.embeddings, knowledge.ingest; "
        "print(sorted(m for m in sys.modules if m == 'core.settings' or m == 'bot' or m.startswith('bot.')))"
    )
    repo = Path(__file__).resolve().parent.parent  # `-c` puts the working folder first on the path
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert result.stdout.strip() == "[]"


async def test_same_name_replaces_and_same_content_is_skipped(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    await kb.add_bytes(guild, [("faq.txt", b"The office opens at nine.")], uploader="a")
    again = await kb.add_bytes(guild, [("faq.txt", b"The office opens at nine.")], uploader="b")
    assert again.results[0].status == "skipped" and "unchanged" in (again.results[0].reason or "")
    copy = await kb.add_bytes(guild, [("faq-copy.txt", b"The office opens at nine.")], uploader="b")
    assert copy.results[0].status == "skipped" and "faq.txt" in (copy.results[0].reason or "")

    replaced = await kb.add_bytes(
        guild, [("faq.txt", b"The office opens at ten o'clock since May.")], uploader="b"
    )
    assert replaced.results[0].status == "replaced"
    docs = await kb.list_documents(guild)
    assert [(d.name, d.uploader) for d in docs] == [("faq.txt", "b")]
    texts = _chroma_rows(kb, guild)["documents"]
    assert texts == ["The office opens at ten o'clock since May."]
    hits = await kb.search(guild, "when does the office open", k=3)
    assert [h.text for h in hits] == ["The office opens at ten o'clock since May."]


async def test_bad_files_are_refused_and_the_rest_go_in(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    files = [
        ("guide.md", GUIDE),
        ("empty.txt", b""),
        ("binary.txt", bytes(range(256)) * 8),
        ("secret.pdf", encrypt_pdf(make_pdf(["classified"]), "pw")),
        ("broken.pdf", b"%PDF-1.7\n1 0 obj << garbage"),
        ("bomb.docx", make_zip_bomb()),
        ("slides.pptx", b"PK\x03\x04"),
        (
            "manual.pdf",
            make_pdf(["Page one is about setup.", "Page two explains descaling with citric acid."]),
        ),
        (
            "policy.docx",
            make_docx([("heading", "Refunds"), ("para", "Refunds are paid within 30 days.")]),
        ),
        ("page.html", b"<h1>Hours</h1><p>Open from 8 to 6.</p><script>x()</script>"),
    ]
    report = await kb.add_bytes(guild, files, uploader="admin")
    status = {r.name: r.status for r in report.results}
    assert status == {
        "guide.md": "added",
        "empty.txt": "refused",
        "binary.txt": "refused",
        "secret.pdf": "refused",
        "broken.pdf": "refused",
        "bomb.docx": "refused",
        "slides.pptx": "refused",
        "manual.pdf": "added",
        "policy.docx": "added",
        "page.html": "added",
    }
    reasons = {r.name: r.reason or "" for r in report.by_status("refused")}
    assert (
        "empty" in reasons["empty.txt"]
        and "binary" in reasons["binary.txt"]
        and "password" in reasons["secret.pdf"]
    )
    assert (
        "zip bomb" in reasons["bomb.docx"]
        and ".docx" in reasons["slides.pptx"]
        and "PDF" in reasons["broken.pdf"]
    )
    assert sorted(d.name for d in await kb.list_documents(guild)) == [
        "guide.md",
        "manual.pdf",
        "page.html",
        "policy.docx",
    ]
    hit = (await kb.search(guild, "descaling citric acid", k=1))[0]
    assert (hit.document, hit.location) == ("manual.pdf", "page 2")


async def test_size_caps(kb_settings: Settings, local_embedder: LocalEmbedder) -> None:
    settings = kb_settings.model_copy(
        update={"knowledge_max_file_mb": 1000 / 1048576, "knowledge_max_guild_mb": 1500 / 1048576}
    )
    kb = KnowledgeBase(knowledge_config(settings), embedder=local_embedder)
    guild = new_guild_id()
    report = await kb.add_bytes(
        guild,
        [("big.txt", b"word " * 300), ("a.txt", b"alpha " * 150), ("b.txt", b"beta " * 150)],
        uploader="x",
    )
    assert [r.status for r in report.results] == ["refused", "added", "refused"]
    assert "limit per file" in (report.results[0].reason or "")
    assert "over its" in (report.results[2].reason or "") and "Remove some documents" in (
        report.results[2].reason or ""
    )
    # Replacing a document counts its old size out of the total.
    replaced = await kb.add_bytes(guild, [("a.txt", b"gamma " * 160)], uploader="x")
    assert replaced.results[0].status == "replaced"


async def test_folders_are_read_recursively(kb: KnowledgeBase, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "readme.md").write_bytes(GUIDE)
    (root / "sub" / "ship.txt").write_bytes(SHIPPING)
    (root / "sub" / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_text("ignored")
    guild = new_guild_id()
    report = await kb.add_files(guild, [root, tmp_path / "missing.txt"], uploader="cli")
    assert [(r.name, r.status) for r in report.results] == [
        ("readme.md", "added"),
        ("sub/photo.jpg", "skipped"),
        ("sub/ship.txt", "added"),
        ("missing.txt", "refused"),
    ]
    assert "does not exist" in (report.results[-1].reason or "")


def _links_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder whose links point out of it and within it, and a secret file outside it."""
    outside = tmp_path / "outside"
    (outside / "private").mkdir(parents=True)
    secret = outside / "shadow.txt"
    secret.write_text("root:SECRETHASH4711:19000:0:99999:7:::")
    (outside / "private" / "leak.md").write_text("# Leak\n\nThe SECRETHASH4711 is here too.")
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "readme.md").write_bytes(GUIDE)
    (root / "shadow.txt").symlink_to(secret)
    (root / "sub" / "private").symlink_to(outside / "private", target_is_directory=True)
    (root / "alias.md").symlink_to(root / "readme.md")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "broken.txt").symlink_to(root / "nowhere.txt")
    return root, secret


async def test_links_in_a_folder_are_never_followed_and_each_is_reported(
    kb: KnowledgeBase, tmp_path: Path
) -> None:
    root, secret = _links_folder(tmp_path)
    named = tmp_path / "named.txt"
    named.symlink_to(secret)
    guild = new_guild_id()
    report = await kb.add_files(guild, [root, named], uploader="cli")
    assert [(r.name, r.status) for r in report.results] == [
        ("alias.md", "skipped"),
        ("broken.txt", "skipped"),
        ("readme.md", "added"),
        ("shadow.txt", "skipped"),
        ("sub/loop", "skipped"),
        ("sub/private", "skipped"),
        ("named.txt", "refused"),
    ]
    reasons = {r.name: r.reason or "" for r in report.results}
    assert reasons["shadow.txt"] == (
        f"a symbolic link to {secret.resolve()}, outside the folder; links are not followed inside a folder"
    )
    assert (
        f"to {(tmp_path / 'outside' / 'private').resolve()}, outside the folder"
        in (reasons["sub/private"])
    )
    assert reasons["alias.md"].startswith("a symbolic link to readme.md in the same folder")
    assert reasons["sub/loop"].startswith("a symbolic link to . in the same folder")
    assert "which does not exist" in reasons["broken.txt"]
    assert reasons["named.txt"] == (
        f"{named} is a symbolic link (to {secret.resolve()}); it was not read. Pass --follow-symlinks to read what it points to."
    )
    assert [d.name for d in await kb.list_documents(guild)] == ["readme.md"]
    assert await kb.search(guild, "SECRETHASH4711", k=5, mode="keyword") == []


async def test_a_named_link_is_followed_only_when_asked(kb: KnowledgeBase, tmp_path: Path) -> None:
    root, secret = _links_folder(tmp_path)
    named_file = tmp_path / "named.txt"
    named_file.symlink_to(secret)
    named_folder = tmp_path / "docs-link"
    named_folder.symlink_to(root, target_is_directory=True)
    guild = new_guild_id()
    report = await kb.add_files(
        guild, [named_file, named_folder], uploader="cli", follow_symlinks=True
    )
    statuses = {r.name: r.status for r in report.results}
    # The named link is read under its own name; links inside the folder it names still are not.
    assert statuses == {
        "named.txt": "added",
        "alias.md": "skipped",
        "broken.txt": "skipped",
        "readme.md": "added",
        "shadow.txt": "skipped",
        "sub/loop": "skipped",
        "sub/private": "skipped",
    }
    [hit] = await kb.search(guild, "SECRETHASH4711", k=1, mode="keyword")
    assert hit.document == "named.txt"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "gone.txt")
    [result] = (await kb.add_files(guild, [dangling], uploader="cli", follow_symlinks=True)).results
    assert result.status == "refused" and "which does not exist" in (result.reason or "")


async def test_servers_never_see_each_others_documents(kb: KnowledgeBase) -> None:
    one, two = new_guild_id(), new_guild_id()
    await kb.add_bytes(one, [("guide.md", GUIDE)], uploader="a")
    assert await kb.list_documents(two) == []
    assert await kb.search(two, "E-4711 lid warranty", k=5) == []
    assert await kb.retrieve(two, "E-4711 lid warranty") == []
    await kb.add_bytes(two, [("shipping.txt", SHIPPING)], uploader="b")
    assert {s.document for s in await kb.search(two, "E-4711 lid warranty blender", k=5)} == {
        "shipping.txt"
    }
    assert kb.collection_name(one) != kb.collection_name(two)


async def test_a_file_that_cannot_be_stored_leaves_no_trace(
    kb: KnowledgeBase, local_embedder: LocalEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BadLastVector(RenamedEmbedder):
        """Real vectors, except a wrong-sized one for a passage containing POISON, which Chroma rejects."""

        def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
            vectors = [[float(x) for x in v] for v in self._inner.embed_documents(texts)]
            return [v[:10] if "POISON" in t else v for v, t in zip(vectors, texts, strict=True)]  # type: ignore[return-value]

    monkeypatch.setattr(
        base_module, "_PAGE", 2
    )  # store in small batches so the failure comes after a partial write
    kb._embedder = BadLastVector(local_embedder, local_embedder.name)
    guild = new_guild_id()
    good = await kb.add_bytes(guild, [("old.md", b"# A\n\nfirst version")], uploader="x")
    assert good.results[0].status == "added"
    poisoned = (
        "\n\n".join(f"# Part {i}\n\nsection {i} text" for i in range(4))
        + "\n\n# Last\n\nPOISON here"
    )
    report = await kb.add_bytes(
        guild, [("old.md", poisoned.encode()), ("fine.txt", b"fine content")], uploader="x"
    )
    assert [r.status for r in report.results] == ["refused", "added"]
    assert "could not be stored" in (report.results[0].reason or "")
    docs = {d.name: d for d in await kb.list_documents(guild)}
    assert set(docs) == {"old.md", "fine.txt"} and docs["old.md"].chunks == 1
    assert sorted(_chroma_rows(kb, guild)["documents"]) == ["A\nfirst version", "fine content"]


async def test_a_file_whose_embedding_fails_is_refused_alone(
    kb: KnowledgeBase, local_embedder: LocalEmbedder
) -> None:
    class FailsOnce(RenamedEmbedder):
        def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
            if any("EXPLODE" in t for t in texts):
                raise RuntimeError("endpoint fell over")
            return self._inner.embed_documents(texts)

    kb._embedder = FailsOnce(local_embedder, local_embedder.name)
    guild = new_guild_id()
    # Big enough files that each is embedded in its own batch.
    ok = ("ok.txt", ("calm sentence. " * 400).encode())
    bad = ("bad.txt", ("EXPLODE now. " * 400).encode())
    report = await kb.add_bytes(guild, [bad, ok], uploader="x")
    assert [r.status for r in report.results] == ["refused", "added"]
    assert "endpoint fell over" in (report.results[0].reason or "")
    assert [d.name for d in await kb.list_documents(guild)] == ["ok.txt"]


async def test_progress_reaches_the_end(kb: KnowledgeBase) -> None:
    updates: list[ProgressUpdate] = []
    guild = new_guild_id()
    await kb.add_bytes(
        guild,
        [("guide.md", GUIDE), ("empty.txt", b""), ("shipping.txt", SHIPPING)],
        uploader="x",
        progress=updates.append,
    )
    assert updates[-1].files_done == updates[-1].files_total == 3
    assert updates[-1].chunks_done == updates[-1].chunks_total == 3
    assert [u.files_done for u in updates] == sorted(u.files_done for u in updates)
    assert {u.finished.name for u in updates if u.finished} == {
        "guide.md",
        "empty.txt",
        "shipping.txt",
    }


async def test_embedding_runs_off_the_event_loop(
    kb: KnowledgeBase, local_embedder: LocalEmbedder
) -> None:
    loop_thread = threading.get_ident()
    loop_turned = threading.Event()
    threads: list[int] = []

    class WaitsForTheLoop(RenamedEmbedder):
        """Encoding waits until the event loop has run something else: it deadlocks on the loop."""

        def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
            threads.append(threading.get_ident())
            if not loop_turned.wait(timeout=30):
                raise RuntimeError("the event loop did not run while embedding")
            return self._inner.embed_documents(texts)

    kb._embedder = WaitsForTheLoop(local_embedder, local_embedder.name)
    upload = asyncio.create_task(kb.add_bytes(new_guild_id(), [("guide.md", GUIDE)], uploader="x"))
    await asyncio.sleep(0)
    loop_turned.set()  # the loop is free while the upload is under way
    report = await upload
    assert report.results[0].status == "added"
    assert threads and loop_thread not in threads


class GatedEmbedder:
    """The real local model, whose passage batches wait at a gate until the test opens it."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self._inner = inner
        self.waiting = threading.Event()  # an upload is inside embed_documents
        self.gate = threading.Event()

    @property
    def name(self) -> str:
        return self._inner.name

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.waiting.set()
        self.gate.wait(timeout=600)  # only a guard against hanging the suite
        return self._inner.embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self._inner.embed_query(text)


async def test_a_search_returns_while_an_upload_is_still_running(
    kb_settings: Settings, local_embedder: LocalEmbedder
) -> None:
    guild = new_guild_id()
    config = knowledge_config(kb_settings)
    # Added by another process (or before a restart): this one has no keyword index for it yet.
    earlier = KnowledgeBase(config, embedder=local_embedder)
    await earlier.add_bytes(guild, [("guide.md", GUIDE)], uploader="a")
    await earlier.aclose()

    gated = GatedEmbedder(local_embedder)
    kb = KnowledgeBase(config, embedder=gated)
    big = " ".join(f"Parcel {n} ships from Rotterdam to Lyon by train." for n in range(300))
    upload = asyncio.create_task(kb.add_bytes(guild, [("big.txt", big.encode())], uploader="b"))
    try:
        assert await asyncio.to_thread(gated.waiting.wait, 120)
        # Bounded only so that a search stuck behind the upload fails instead of hanging.
        hybrid = await asyncio.wait_for(kb.search(guild, "what does E-4711 mean?", k=3), 60)
        keyword = await asyncio.wait_for(kb.search(guild, "E-4711", k=3, mode="keyword"), 60)
        assert not upload.done()  # the upload is still held at the gate
        assert hybrid[0].document == "guide.md" and [s.document for s in keyword] == ["guide.md"]
        assert await kb.search(guild, "Rotterdam Lyon", k=3, mode="keyword") == []
    finally:
        gated.gate.set()
    report = await upload
    assert [(r.name, r.status) for r in report.results] == [("big.txt", "added")]
    # The keyword index built during the upload gave way to one with its passages.
    after = await kb.search(guild, "Rotterdam Lyon", k=3, mode="keyword")
    assert after and {s.document for s in after} == {"big.txt"}
    await kb.aclose()


async def test_another_model_is_a_clear_error_until_reindexed(
    kb_settings: Settings, local_embedder: LocalEmbedder
) -> None:
    guild = new_guild_id()
    first = KnowledgeBase(knowledge_config(kb_settings), embedder=local_embedder)
    await first.add_bytes(guild, [("guide.md", GUIDE), ("shipping.txt", SHIPPING)], uploader="x")
    other = KnowledgeBase(
        knowledge_config(kb_settings),
        embedder=RenamedEmbedder(local_embedder, "local:another-model"),
    )
    with pytest.raises(ConfigError, match="switchboard knowledge reindex") as caught:
        await other.retrieve(guild, "warranty")
    assert (
        "local:all-MiniLM-L6-v2" in caught.value.message
        and "local:another-model" in caught.value.message
    )
    updates: list[ProgressUpdate] = []
    assert await other.reindex(guild, progress=updates.append) == 3
    assert updates[-1].chunks_done == 3
    assert (await other.search(guild, "E-4711", k=1))[0].document == "guide.md"
    assert [d.name for d in await other.list_documents(guild)] == ["guide.md", "shipping.txt"]
    fresh = KnowledgeBase(knowledge_config(kb_settings), embedder=local_embedder)
    with pytest.raises(ConfigError, match="reindex"):
        await fresh.list_documents(guild)


async def test_changes_from_another_process_reach_the_keyword_index(
    kb_settings: Settings, local_embedder: LocalEmbedder
) -> None:
    guild = new_guild_id()
    writer = KnowledgeBase(knowledge_config(kb_settings), embedder=local_embedder)
    reader = KnowledgeBase(knowledge_config(kb_settings), embedder=local_embedder)
    reader.index_recheck_s = 0
    await writer.add_bytes(guild, [("guide.md", GUIDE)], uploader="x")
    assert {
        s.document for s in await reader.search(guild, "Rotterdam", k=5, mode="keyword")
    } == set()
    await writer.add_bytes(guild, [("shipping.txt", SHIPPING)], uploader="x")
    assert {s.document for s in await reader.search(guild, "Rotterdam", k=5, mode="keyword")} == {
        "shipping.txt"
    }


async def test_empty_and_blank_queries(kb: KnowledgeBase) -> None:
    guild = new_guild_id()
    assert await kb.search(guild, "anything") == []
    await kb.add_bytes(guild, [("guide.md", GUIDE)], uploader="x")
    assert await kb.search(guild, "   ") == []
    assert await kb.retrieve(guild, "") == []


def test_unreachable_chroma_server_is_a_config_error(
    tmp_path: Path, local_embedder: LocalEmbedder
) -> None:
    settings = Settings().model_copy(
        update={"data_dir": tmp_path, "chroma_host": "127.0.0.1", "chroma_port": 9}
    )
    kb = KnowledgeBase(knowledge_config(settings), embedder=local_embedder)
    with pytest.raises(ConfigError, match="CHROMA_HOST"):
        asyncio.run(kb.list_documents(1))


async def test_openai_compatible_embeddings(kb_settings: Settings, fake_openai) -> None:  # noqa: ANN001
    settings = kb_settings.model_copy(
        update={
            "embedding_provider": "openai-compatible",
            "embedding_base_url": fake_openai.base_url,
            "embedding_model": "text-embedding-3-small",
            "embedding_api_key_env": "EMBED_KEY",
            "environ": {"EMBED_KEY": "sk-test"},
        }
    )
    kb = KnowledgeBase(knowledge_config(settings))
    assert kb.embedder.name == "openai-compatible:text-embedding-3-small"
    guild = new_guild_id()
    report = await kb.add_bytes(
        guild, [("guide.md", GUIDE), ("shipping.txt", SHIPPING)], uploader="x"
    )
    assert [r.status for r in report.results] == ["added", "added"]
    embedding_calls = [r for r in fake_openai.requests if r.path.endswith("/embeddings")]
    assert embedding_calls and all(r.model == "text-embedding-3-small" for r in embedding_calls)
    assert (await kb.search(guild, "E-4711", k=1))[0].document == "guide.md"

    fake_openai.fail_next(401, times=3)
    refused = await kb.add_bytes(guild, [("new.txt", b"brand new text")], uploader="x")
    assert refused.results[0].status == "refused" and "API key" in (refused.results[0].reason or "")
    assert [d.name for d in await kb.list_documents(guild)] == ["guide.md", "shipping.txt"]


def test_openai_embeddings_need_a_key(tmp_path: Path) -> None:
    settings = Settings().model_copy(
        update={
            "data_dir": tmp_path,
            "embedding_provider": "openai",
            "embedding_api_key_env": "NO_SUCH_KEY",
            "environ": {},
        }
    )
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        _ = KnowledgeBase(knowledge_config(settings)).embedder


async def test_heavy_parts_report_once_that_they_have_loaded(kb_settings: Settings) -> None:
    # The app freezes the heap at that moment: Chroma and torch live until the process exits.
    loaded: list[str] = []
    kb = KnowledgeBase(knowledge_config(kb_settings), on_loaded=lambda: loaded.append("part"))
    guild = new_guild_id()
    await kb.add_bytes(guild, [("guide.md", GUIDE)], uploader="alice")
    assert loaded == ["part", "part"]  # the Chroma client, and the local embedding model
    await kb.search(guild, "Why does my blender show E-4711?")
    await kb.add_bytes(guild, [("shipping.txt", SHIPPING)], uploader="alice")
    assert loaded == ["part", "part"]
    await kb.aclose()
