"""Forgetting a person in the knowledge base: their name comes off the documents they added
(real Chroma, embedded and server; real local embeddings)."""

from __future__ import annotations

from knowledge.base import FORGOTTEN_UPLOADER, KnowledgeBase
from tests.fixtures.knowledge import new_guild_id

GUIDE = b"# Blender guide\n\nError code E-4711 means the lid is not locked.\n"
NOTES = b"Parcels ship from Rotterdam and arrive within three business days."
ALICE_ID = 123456789012345678


async def test_forgetting_an_uploader_in_every_server(kb: KnowledgeBase) -> None:
    one, two = new_guild_id(), new_guild_id()
    await kb.add_bytes(one, [("guide.md", GUIDE)], uploader="Alice", uploader_id=ALICE_ID)
    await kb.add_bytes(one, [("notes.txt", NOTES)], uploader="Bob", uploader_id=7)
    await kb.add_bytes(two, [("alice.md", GUIDE * 40)], uploader="Alice", uploader_id=ALICE_ID)
    await kb.add_bytes(two, [("cli.md", NOTES)], uploader="Alice")  # the terminal: a name alone

    assert await kb.forget_uploader(ALICE_ID) == 2
    docs = {d.name: d for guild in (one, two) for d in await kb.list_documents(guild)}
    assert (docs["guide.md"].uploader_name, docs["guide.md"].uploader_id) == (
        FORGOTTEN_UPLOADER,
        None,
    )
    assert docs["alice.md"].uploader == FORGOTTEN_UPLOADER and docs["alice.md"].chunks > 1
    assert docs["notes.txt"].uploader == "Bob (7)"
    assert docs["cli.md"].uploader == "Alice"  # not matched by id
    # Every passage changed, not only the first, and the passages are still found.
    metas = kb._open(two, create=False).get(include=["metadatas"])["metadatas"]  # noqa: SLF001
    assert not any("Alice" in str(meta) or ALICE_ID == meta.get("uploader_id") for meta in metas
                   if meta["name"] == "alice.md")  # fmt: skip
    assert [s.document for s in await kb.retrieve(two, "error code E-4711 lid")][:1] == ["alice.md"]

    assert await kb.forget_uploader(None, "Alice") == 1  # by name: the terminal's upload
    assert {d.uploader for d in await kb.list_documents(two)} == {FORGOTTEN_UPLOADER}
    assert await kb.forget_uploader(ALICE_ID) == 0
