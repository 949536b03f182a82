"""The /knowledge commands: upload, list, remove and search a server's documents, and switch answering from them.

    KnowledgeCog(knowledge_base, chat_service, knowledge_role="Librarian", manager_role="Bot Manager")

Uploads answer at once (deferred) and report progress by editing that response, at most
once a second; the embedding work runs in the knowledge base's worker threads, so the bot
keeps answering everyone else meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import author_of, ensure_can_change, permission_refusal, place_of, scope_for
from bot.discord.respond import answering, send
from bot.present import change_line, human_size
from bot.service import ChatService
from core.errors import PermissionDenied, UserError
from core.messages import Source
from knowledge.base import KnowledgeBase
from knowledge.types import DocumentInfo, FileResult, IngestReport, ProgressUpdate, RemoteFile

log = logging.getLogger(__name__)

EMBED_COLOUR = discord.Colour.teal()
_MESSAGE_ROOM = 1900  # a message holds 2,000 characters
_DESCRIPTION_ROOM = 3900  # an embed description holds 4,096
_AUTOCOMPLETE_MAX = 25
_PASSAGE_PREVIEW = 350
EDIT_INTERVAL_S = 1.0  # Discord rate-limits edits; once a second is plenty for a progress line
_STATUS_ICON = {"added": "✅", "replaced": "♻️", "skipped": "⏭️", "refused": "❌"}
_IN_A_SERVER = "The knowledge base belongs to a server: use this command in one of its channels."
_NO_DOCUMENTS = (
    "This server's knowledge base has no documents yet, so answers have nothing to draw on: "
    "add some with `/knowledge add`."
)


def result_line(result: FileResult) -> str:
    """One file's outcome for a Discord message."""
    passages = (
        f" ({result.chunks} passage{'s' if result.chunks != 1 else ''})"
        if result.status in ("added", "replaced")
        else ""
    )
    reason = (
        f" — {result.reason}" if result.reason and result.status in ("skipped", "refused") else ""
    )
    return f"{_STATUS_ICON[result.status]} **{discord.utils.escape_markdown(result.name)}**: {result.status}{passages}{reason}"


def report_text(report: IngestReport) -> str:
    """The final upload message, shortened to fit."""
    head = report.summary().splitlines()[0]
    return fit_lines(
        [f"**Knowledge base:** {head}", *(result_line(r) for r in report.results)], _MESSAGE_ROOM
    )


def progress_text(update: ProgressUpdate) -> str:
    """The in-progress upload message."""
    line = f"⏳ Adding documents… {update.files_done}/{update.files_total} files, {update.chunks_done}/{update.chunks_total} passages embedded"
    if update.current and update.files_done < update.files_total:
        line += f"\nNow: {discord.utils.escape_markdown(update.current)}"
    return line


def document_line(doc: DocumentInfo) -> str:
    """One document of /knowledge list."""
    when = discord.utils.format_dt(doc.added_at, "R")
    return f"**{discord.utils.escape_markdown(doc.name)}** · {doc.chunks} passages · {human_size(doc.bytes)} · added by {discord.utils.escape_markdown(doc.uploader)} {when}"


def source_block(number: int, source: Source) -> str:
    """One passage of /knowledge search, quoted."""
    where = f" ({source.location})" if source.location else ""
    text = " ".join(source.text.split())
    text = text if len(text) <= _PASSAGE_PREVIEW else text[:_PASSAGE_PREVIEW].rstrip() + "…"
    return f"**[{number}] {discord.utils.escape_markdown(source.document)}{where}** · score {source.score:.2f}\n> {text}"


def fit_lines(lines: list[str], room: int) -> str:
    """Join lines, ending with "…and N more" when they do not fit in `room` characters."""
    shown: list[str] = []
    used = 0
    for n, line in enumerate(lines):
        if used + len(line) + 1 > room - 40:
            shown.append(f"…and {len(lines) - n} more.")
            break
        shown.append(line)
        used += len(line) + 1
    return "\n".join(shown)


def _download(attachment: discord.Attachment) -> Callable[[], Awaitable[bytes]]:
    """Read an attachment's bytes; a failed download is a UserError that refuses this file alone."""

    async def read() -> bytes:
        try:
            return await attachment.read()
        except discord.HTTPException as exc:
            raise UserError(
                f"{attachment.filename} could not be downloaded from Discord ({exc.status}); try again."
            ) from exc

    return read


class _ThrottledEditor:
    """Edits an interaction's original response with the latest progress, at most once per interval."""

    def __init__(self, interaction: discord.Interaction, clock: Callable[[], float]) -> None:
        self._interaction = interaction
        self._clock = clock
        self._last = float("-inf")
        self._pending: str | None = None
        self._task: asyncio.Task[None] | None = None

    def show(self, text: str) -> None:
        """Remember the newest text; send it now if the last edit is old enough and none is in flight."""
        self._pending = text
        if self._task is None and self._clock() - self._last >= EDIT_INTERVAL_S:
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        text, self._pending = self._pending, None
        self._last = self._clock()
        try:
            if text is not None:
                await self._interaction.edit_original_response(content=text)
        except discord.HTTPException:
            log.debug("could not edit the upload progress", exc_info=True)
        finally:
            self._task = None

    async def finish(self, text: str) -> None:
        """Wait for an edit in flight, then show the final text."""
        if self._task is not None:
            await self._task
        self._pending = None
        try:
            await self._interaction.edit_original_response(
                content=text, allowed_mentions=discord.AllowedMentions.none()
            )
        except discord.HTTPException:
            # An interaction's token lasts 15 minutes: tell the person about a longer upload by DM instead.
            try:
                await self._interaction.user.send(
                    text, allowed_mentions=discord.AllowedMentions.none()
                )
            except discord.HTTPException:
                log.warning(
                    "could not report a finished upload to %s",
                    self._interaction.user.id,
                    exc_info=True,
                )


class KnowledgeCog(commands.Cog):
    """Fill a server's knowledge base from Discord and choose where the bot answers from it."""

    # The knowledge admins' group: shown to people with Manage Server by default. A server
    # admin can open it to the knowledge role, moderators or everyone under Server Settings →
    # Integrations; who may do what is still checked on every use.
    knowledge = app_commands.Group(
        name="knowledge",
        description="The server's knowledge base: documents the bot answers from.",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(
        self,
        knowledge_base: KnowledgeBase,
        service: ChatService,
        *,
        knowledge_role: str | None = None,
        manager_role: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kb = knowledge_base
        self.service = service
        self.knowledge_role = knowledge_role
        self.manager_role = manager_role
        self.clock = clock

    # ------------------------------------------------------------ plumbing

    def _is_knowledge_admin(self, interaction: discord.Interaction) -> bool:
        return self._refusal(interaction) is None

    def _refusal(self, interaction: discord.Interaction) -> str | None:
        """Why this person may not change the knowledge base (None when they may)."""
        if interaction.guild_id is None:
            return _IN_A_SERVER
        return permission_refusal(
            interaction,
            doing="Changing the knowledge base",
            needs="manage_guild",
            role=self.knowledge_role,
        )

    def _ensure_admin(self, interaction: discord.Interaction) -> int:
        """The guild id, after checking the person may change its knowledge base."""
        refusal = self._refusal(interaction)
        if refusal is not None:
            raise PermissionDenied(refusal)
        assert interaction.guild_id is not None
        return interaction.guild_id

    async def _no_documents(self, guild_id: int) -> bool:
        """Whether the server's knowledge base is known to be empty (False when unsure)."""
        try:
            return not await self.kb.list_documents(guild_id)
        except Exception:  # only a hint: the switch itself is set
            log.warning("could not list the documents of guild %s", guild_id, exc_info=True)
            return False

    @staticmethod
    def _guild(interaction: discord.Interaction) -> int:
        if interaction.guild_id is None:
            raise UserError(_IN_A_SERVER)
        return interaction.guild_id

    # ------------------------------------------------------------ commands

    @knowledge.command(name="add")
    @app_commands.describe(
        file="A document: .txt, .md, .pdf, .html or .docx.",
        file2="Another document.",
        file3="Another document.",
        file4="Another document.",
        file5="Another document.",
        file6="Another document.",
        file7="Another document.",
        file8="Another document.",
        file9="Another document.",
        file10="Another document.",
    )
    async def add(
        self,
        interaction: discord.Interaction,
        file: discord.Attachment,
        file2: discord.Attachment | None = None,
        file3: discord.Attachment | None = None,
        file4: discord.Attachment | None = None,
        file5: discord.Attachment | None = None,
        file6: discord.Attachment | None = None,
        file7: discord.Attachment | None = None,
        file8: discord.Attachment | None = None,
        file9: discord.Attachment | None = None,
        file10: discord.Attachment | None = None,
    ) -> None:
        """Add documents to this server's knowledge base (a document with the same name is replaced)."""
        async with answering(interaction, "adding documents", log):
            guild_id = self._ensure_admin(interaction)
            attachments = [
                a
                for a in (file, file2, file3, file4, file5, file6, file7, file8, file9, file10)
                if a is not None
            ]
            await interaction.response.defer(ephemeral=True, thinking=True)
            editor = _ThrottledEditor(interaction, self.clock)
            editor.show(
                f"⏳ Adding {len(attachments)} document{'s' if len(attachments) != 1 else ''}…"
            )
            # The knowledge base refuses what is too big or of the wrong type before it is downloaded.
            uploader = author_of(interaction.user)
            report = await self.kb.add_remote(
                guild_id,
                [RemoteFile(a.filename, a.size, _download(a)) for a in attachments],
                uploader=uploader.name,
                uploader_id=uploader.id,
                progress=lambda update: editor.show(progress_text(update)),
            )
            await editor.finish(report_text(report))

    @knowledge.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """List this server's documents: passages, size, who added them and when."""
        async with answering(interaction, "listing documents", log):
            docs = await self.kb.list_documents(self._guild(interaction))
            if not docs:
                await send(
                    interaction,
                    "This server's knowledge base is empty. Admins add documents with `/knowledge add`.",
                    ephemeral=True,
                )
                return
            embed = discord.Embed(
                title="Knowledge base",
                description=fit_lines([document_line(d) for d in docs], _DESCRIPTION_ROOM),
                colour=EMBED_COLOUR,
            )
            embed.set_footer(
                text=f"{len(docs)} documents · {sum(d.chunks for d in docs)} passages · {human_size(sum(d.bytes for d in docs))}"
            )
            await send(interaction, embed=embed, ephemeral=True)

    @knowledge.command(name="remove")
    @app_commands.describe(document="The document's name, as /knowledge list shows it.")
    async def remove(self, interaction: discord.Interaction, document: str) -> None:
        """Remove a document and all its passages from this server's knowledge base."""
        async with answering(interaction, "removing a document", log):
            guild_id = self._ensure_admin(interaction)
            doc = await self.kb.remove(guild_id, document)
            await send(
                interaction,
                f"🗑️ Removed **{discord.utils.escape_markdown(doc.name)}** ({doc.chunks} passages).",
                ephemeral=True,
            )

    @remove.autocomplete("document")
    async def _document_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """Document names containing what has been typed so far (only for people who may remove them)."""
        if interaction.guild_id is None or not self._is_knowledge_admin(interaction):
            return []
        typed = current.casefold()
        names = [d.name for d in await self.kb.list_documents(interaction.guild_id)]
        matches = sorted(
            (n for n in names if typed in n.casefold()),
            key=lambda n: (not n.casefold().startswith(typed), n.casefold()),
        )
        return [
            app_commands.Choice(name=n[:100], value=n[:100]) for n in matches[:_AUTOCOMPLETE_MAX]
        ]

    @knowledge.command(name="search")
    @app_commands.describe(query="What to look for.", count="How many passages to show (1-10).")
    async def search(
        self,
        interaction: discord.Interaction,
        query: str,
        count: app_commands.Range[int, 1, 10] = 5,
    ) -> None:
        """Show the passages of this server's documents that best match a query, with their scores."""
        async with answering(interaction, "searching the knowledge base", log):
            guild_id = self._guild(interaction)
            await interaction.response.defer(ephemeral=True, thinking=True)
            sources = await self.kb.search(guild_id, query, k=count)
            if not sources:
                await send(
                    interaction,
                    "Nothing found: this server's knowledge base is empty or has no passage that matches.",
                    ephemeral=True,
                )
                return
            blocks = [source_block(n, s) for n, s in enumerate(sources, start=1)]
            embed = discord.Embed(
                title=f"Search: {query[:200]}",
                description=fit_lines(blocks, _DESCRIPTION_ROOM),
                colour=EMBED_COLOUR,
            )
            await send(interaction, embed=embed, ephemeral=True)

    @knowledge.command(name="use")
    @app_commands.describe(
        state="on: answer from the knowledge base here; off: don't; inherit: follow the channel or server setting.",
        server="Set the server default instead of this channel (needs Manage Server).",
    )
    async def use(
        self,
        interaction: discord.Interaction,
        state: Literal["on", "off", "inherit"],
        server: bool = False,
    ) -> None:
        """Answer from the knowledge base in this channel (its threads follow), or stop."""
        async with answering(interaction, "switching the knowledge base", log):
            guild_id = self._guild(interaction)
            place = place_of(interaction.channel, interaction.guild_id)
            scope = scope_for(place, server)
            if not self._is_knowledge_admin(interaction):
                ensure_can_change(interaction, scope, self.manager_role)
            enabled = {"on": True, "off": False, "inherit": None}[state]
            change = await self.service.set_knowledge(
                place, scope, enabled, author_of(interaction.user)
            )
            text = change_line(change)
            if change.now.value and await self._no_documents(guild_id):
                text += f"\n{_NO_DOCUMENTS}"
            await send(interaction, text, ephemeral=False)
