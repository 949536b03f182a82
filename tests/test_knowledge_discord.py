"""The /knowledge commands through simcord, on the real knowledge base (real Chroma, real local embeddings)."""

from __future__ import annotations

import pytest
import simcord

from bot.app import knowledge_config
from bot.discord.bot import SwitchboardBot
from bot.discord.knowledge import KnowledgeCog
from bot.service import ChatService
from knowledge.base import KnowledgeBase
from tests.fixtures.discord import MANAGER_ROLE, World

LIBRARIAN = "Librarian"
GUIDE = b"# Blender guide\n\nError code E-4711 means the lid is not locked. Turn the lid until it clicks.\n"


@pytest.fixture
def simcord_bot(chat_service: ChatService, kb: KnowledgeBase) -> SwitchboardBot:
    """The real bot with the knowledge cog, as the CLI builds it."""
    cog = KnowledgeCog(kb, chat_service, knowledge_role=LIBRARIAN, manager_role=MANAGER_ROLE)
    return SwitchboardBot(chat_service, manager_role=MANAGER_ROLE, shard_count=1, extra_cogs=[cog])


@pytest.fixture(autouse=True)
def opened(world: World) -> World:
    """These tests are about the bot's own checks: the server lets every member see /knowledge."""
    world.open_to_everyone("knowledge")
    return world


@pytest.fixture
def librarian(world: World) -> simcord.MemberActor:
    role = world.guild.create_role(LIBRARIAN)
    return world.guild.add_member(world.env.create_user("librarian"), roles=[role])


async def test_only_knowledge_admins_see_the_commands_by_default(world: World) -> None:
    world.guild.set_command_permissions(
        int(world.env.backend.find_command("knowledge", world.guild.id)["id"]), {}
    )  # back to what Discord does until a server admin opens it
    assert "knowledge add" in world.admin.available_commands(world.channel)
    assert "knowledge add" not in world.alice.available_commands(world.channel)
    assert "knowledge list" not in world.mod.available_commands(world.channel)


async def test_admin_uploads_and_gets_a_report(world: World, kb: KnowledgeBase) -> None:
    result = await world.admin.slash(
        world.channel,
        "knowledge add",
        file=("guide.md", GUIDE),
        file2=("notes.txt", bytes(range(256)) * 4),
    )
    assert result.ephemeral
    content = result.response.content
    assert "1 added, 1 refused" in content
    assert (
        "guide.md**: added (1 passage)" in content
        and "notes.txt**: refused" in content
        and "binary data" in content
    )
    docs = await kb.list_documents(world.guild.id)
    assert [(d.name, d.chunks) for d in docs] == [("guide.md", 1)]
    assert docs[0].uploader.startswith("admin")
    assert (docs[0].uploader_name, docs[0].uploader_id) == ("admin", world.admin.id)


async def test_an_attachment_that_cannot_be_downloaded_is_refused_alone(
    world: World, kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    cdn = world.env.backend.cdn
    stored = cdn.get
    monkeypatch.setattr(
        cdn, "get", lambda url: None if url.endswith("/lost.txt") else stored(url)
    )  # Discord answers 404
    result = await world.admin.slash(
        world.channel,
        "knowledge add",
        file=("lost.txt", b"never arrives"),
        file2=("guide.md", GUIDE),
    )
    content = result.response.content
    assert "1 added, 1 refused" in content
    assert (
        "lost.txt**: refused — lost.txt could not be downloaded from Discord (404); try again."
        in content
    )
    assert content.index("lost.txt") < content.index("guide.md")  # in the order given
    assert [d.name for d in await kb.list_documents(world.guild.id)] == ["guide.md"]


async def test_members_without_permission_cannot_change_it(world: World, kb: KnowledgeBase) -> None:
    added = await world.alice.slash(world.channel, "knowledge add", file=("guide.md", GUIDE))
    assert (
        added.ephemeral
        and "Manage Server" in added.response.content
        and LIBRARIAN in added.response.content
    )
    mod = await world.mod.slash(world.channel, "knowledge add", file=("guide.md", GUIDE))
    assert "Manage Server" in mod.response.content  # Manage Channels is not enough
    assert await kb.list_documents(world.guild.id) == []
    removed = await world.alice.slash(world.channel, "knowledge remove", document="guide.md")
    assert "Manage Server" in removed.response.content


async def test_knowledge_role_may_upload_list_search_and_remove(
    world: World, librarian: simcord.MemberActor, kb: KnowledgeBase
) -> None:
    added = await librarian.slash(
        world.channel,
        "knowledge add",
        file=("guide.md", GUIDE),
        file2=("ship.txt", b"Parcels ship from Rotterdam in three days."),
    )
    assert "2 added" in added.response.content

    listed = await world.alice.slash(world.channel, "knowledge list")
    assert listed.ephemeral
    embed = listed.response.embeds[0]
    assert (
        "**guide.md** · 1 passages" in embed.description
        and "added by librarian" in embed.description
    )
    assert embed.footer.text.startswith("2 documents · 2 passages")

    found = await world.alice.slash(world.channel, "knowledge search", query="E-4711", count=1)
    result = found.followups[0] if found.followups else found.response
    block = result.embeds[0].description
    assert block.startswith("**[1] guide.md (# Blender guide)** · score ") and "E-4711" in block

    choices = await librarian.autocomplete(world.channel, "knowledge remove", "document", "gui")
    assert [c["value"] for c in choices] == ["guide.md"]
    assert await world.alice.autocomplete(world.channel, "knowledge remove", "document", "") == []

    removed = await librarian.slash(world.channel, "knowledge remove", document="guide.md")
    assert "Removed **guide.md** (1 passages)" in removed.response.content
    again = await librarian.slash(world.channel, "knowledge remove", document="guide.md")
    assert again.ephemeral and "no document called" in again.response.content
    assert [d.name for d in await kb.list_documents(world.guild.id)] == ["ship.txt"]


async def test_oversized_and_unsupported_attachments_are_refused_before_download(
    world: World, kb_settings, chat_service: ChatService, local_embedder
) -> None:  # noqa: ANN001
    small = KnowledgeBase(
        knowledge_config(kb_settings.model_copy(update={"knowledge_max_file_mb": 100 / 1048576})),
        embedder=local_embedder,
    )
    world.bot.get_cog("KnowledgeCog").kb = small
    result = await world.admin.slash(
        world.channel,
        "knowledge add",
        file=("big.md", b"x" * 500),
        file2=("deck.pptx", b"PK"),
        file3=("ok.txt", b"fine"),
    )
    content = result.response.content
    assert "big.md**: refused" in content and "limit per file" in content
    assert "deck.pptx**: refused" in content and ".docx" in content
    assert "ok.txt**: added" in content
    assert (
        content.index("big.md") < content.index("deck.pptx") < content.index("ok.txt")
    )  # in the order given


def original_edits(world: World) -> list[str]:
    """The contents the bot patched into interaction responses, in order."""
    return [
        (r.json or {}).get("content", "")
        for r in world.env.http_requests
        if r.method == "PATCH"
        and r.path.startswith("/webhooks/")
        and r.path.endswith("/messages/@original")
    ]


async def test_an_upload_that_outlasts_the_interaction_is_reported_by_dm(
    world: World, kb: KnowledgeBase
) -> None:
    # An interaction's token lasts 15 minutes; after that Discord refuses every edit of its response.
    world.env.inject_error(
        "PATCH",
        "/webhooks/*/messages/@original",
        status=401,
        code=50027,
        message="Invalid Webhook Token",
        times=None,
    )

    await world.admin.slash(world.channel, "knowledge add", file=("guide.md", GUIDE))

    sent = [
        (r.path, (r.json or {}).get("content", ""))
        for r in world.env.http_requests
        if r.method == "POST"
    ]
    reports = [
        (path, content)
        for path, content in sent
        if content.startswith("**Knowledge base:** 1 added")
    ]
    assert len(reports) == 1, sent
    assert (
        reports[0][0] != f"/channels/{world.channel.id}/messages"
    )  # to the uploader alone, not the channel
    assert [d.name for d in await kb.list_documents(world.guild.id)] == ["guide.md"]


async def test_progress_edits_are_throttled(world: World) -> None:
    cog = world.bot.get_cog("KnowledgeCog")
    files = {
        f"file{n}" if n > 1 else "file": (
            f"doc{n}.txt",
            f"Document number {n} is about topic {n}.".encode(),
        )
        for n in range(1, 6)
    }

    cog.clock = lambda: 0.0  # time stands still: after the first, no progress edit may go out
    result = await world.admin.slash(world.channel, "knowledge add", **files)
    assert "5 added" in result.response.content
    edits = original_edits(world)
    assert len([e for e in edits if e.startswith("⏳")]) == 1, edits
    assert edits[-1].startswith("**Knowledge base:** 5 added")

    ticks = iter(range(0, 10_000, 5))
    cog.clock = lambda: float(next(ticks))  # five seconds pass between updates: each may be shown
    before = len(original_edits(world))
    renamed = {k: (f"again-{name}", data + b" Again.") for k, (name, data) in files.items()}
    await world.admin.slash(world.channel, "knowledge add", **renamed)
    progress = [e for e in original_edits(world)[before:] if e.startswith("⏳")]
    assert len(progress) > 1
    assert any("5/5 passages embedded" in e or "files" in e for e in progress)


async def test_use_on_and_answers_draw_on_the_documents(
    world: World, chat_service: ChatService, kb: KnowledgeBase, fake_openai
) -> None:  # noqa: ANN001
    await world.admin.slash(world.channel, "knowledge add", file=("guide.md", GUIDE))
    refused = await world.alice.slash(world.channel, "knowledge use", state="on")
    assert refused.ephemeral and "Manage Channels" in refused.response.content

    switched = await world.mod.slash(world.channel, "knowledge use", state="on")
    assert not switched.ephemeral and "on" in switched.response.content
    assert "no documents" not in switched.response.content
    chat_service.knowledge = kb  # the app passes the same knowledge base to the service

    thread = world.thread("lid trouble")
    await world.alice.send(thread, f"{world.bot.user.mention} what does E-4711 mean?")
    request = fake_openai.chat_requests[-1]
    sent = "\n".join(str(m["content"]) for m in request.messages)
    assert (
        "Error code E-4711 means the lid is not locked" in sent
    )  # threads inherit the channel's switch

    off = await world.mod.slash(world.channel, "knowledge use", state="off")
    assert "off" in off.response.content
    await world.alice.send(world.channel, f"{world.bot.user.mention} what does E-4711 mean?")
    sent = "\n".join(str(m["content"]) for m in fake_openai.chat_requests[-1].messages)
    assert "Error code E-4711 means" not in sent


async def test_use_on_without_documents_says_how_to_add_some(world: World) -> None:
    switched = await world.mod.slash(world.channel, "knowledge use", state="on")
    assert "**on**" in switched.response.content
    assert "no documents yet" in switched.response.content
    assert "`/knowledge add`" in switched.response.content
    off = await world.mod.slash(world.channel, "knowledge use", state="off")
    assert "no documents" not in off.response.content


async def test_empty_knowledge_base(world: World) -> None:
    listed = await world.alice.slash(world.channel, "knowledge list")
    assert "empty" in listed.response.content
    found = await world.alice.slash(world.channel, "knowledge search", query="anything")
    answer = found.followups[0] if found.followups else found.response
    assert "Nothing found" in answer.content
