"""Repositories: the SQL behind settings, conversations, registered models, feedback, the
arena, the leaderboard and privacy.

Each takes an `AsyncSession`; the caller owns the transaction and commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, make_transient_to_detached
from sqlalchemy.sql.dml import Insert

from store.models import (
    MESSAGE_FIELDS,
    SETTING_FIELDS,
    SETTING_SCOPES,
    AnonymousCount,
    Battle,
    BattleVote,
    ChannelSetting,
    Conversation,
    DiscordMessage,
    Message,
    MessageInput,
    ModelGateEvent,
    Person,
    Preference,
    RegisteredModel,
    SettingChange,
    Spending,
    TuneJob,
    Vote,
    default_kind,
    new_id,
    table_of,
    utcnow,
)

# Spec keys that would put a credential in the database.
_SECRET_KEYS = frozenset(
    {"api_key", "apikey", "key", "password", "secret", "token", "access_token", "authorization"}
)
_FIELD_TYPES: dict[str, type] = {
    "model": str,
    "system_prompt": str,
    "knowledge_enabled": bool,
    "log_enabled": bool,
    "retention_days": int,
    "arena_pool": list,
}
# Every messages column, in one order: rows that all carry every column insert as one batch.
MESSAGE_COLUMNS: tuple[str, ...] = tuple(sorted(MESSAGE_FIELDS))
# Ids per IN (...) list: well under SQLite's 32,766 bound parameters.
_IDS_PER_QUERY = 5_000


def _insert_ignoring_conflicts(session: AsyncSession, table: Any) -> Insert:
    """INSERT that skips rows whose key already exists (SQLite and PostgreSQL)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


def _setting_key(scope: str, scope_id: int, guild_id: int | None) -> tuple[Any, ...]:
    """WHERE conditions for one settings row: its scope, its id and its server (None: a DM)."""
    server = (
        ChannelSetting.guild_id.is_(None)
        if guild_id is None
        else ChannelSetting.guild_id == guild_id
    )
    return (ChannelSetting.scope == scope, ChannelSetting.scope_id == scope_id, server)


def _as_text(value: object) -> str | None:
    """How a setting value is written in the change history."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


class SettingsRepository:
    """Per-guild, per-channel and per-thread settings, and who changed them."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def rows_for(
        self, guild_id: int | None, channel_id: int, thread_id: int | None
    ) -> dict[str, ChannelSetting]:
        """The rows that exist for this place, keyed "thread", "channel", "guild" (one query)."""
        found = await self.rows_for_places([(guild_id, channel_id, thread_id)])
        wanted = {"thread": thread_id, "channel": channel_id, "guild": guild_id}
        return {
            scope: found[(scope, guild_id, scope_id)]
            for scope, scope_id in wanted.items()
            if scope_id is not None and (scope, guild_id, scope_id) in found
        }

    async def rows_for_places(
        self, places: Iterable[tuple[int | None, int, int | None]]
    ) -> dict[tuple[str, int | None, int], ChannelSetting]:
        """The rows for any of these (guild, channel, thread) places; one query.

        Keyed (scope, guild id, scope id): a channel or thread is known by its server too,
        because the terminal's made-up ids repeat across servers (a DM's server is None).
        """
        ids: dict[str, set[int]] = {"channel": set(), "thread": set(), "guild": set()}
        for guild_id, channel_id, thread_id in places:
            for scope, scope_id in (
                ("guild", guild_id),
                ("channel", channel_id),
                ("thread", thread_id),
            ):
                if scope_id is not None:
                    ids[scope].add(scope_id)
        conditions = [
            and_(ChannelSetting.scope == scope, ChannelSetting.scope_id.in_(sorted(scope_ids)))
            for scope, scope_ids in ids.items()
            if scope_ids
        ]
        if not conditions:
            return {}
        # By id alone, which the index serves; a row of another server with the same id is
        # read too but keyed apart, so it never answers for this place.
        rows = (await self.session.scalars(select(ChannelSetting).where(or_(*conditions)))).all()
        return {(row.scope, row.guild_id, row.scope_id): row for row in rows}

    async def get(self, scope: str, scope_id: int, guild_id: int | None) -> ChannelSetting | None:
        """The settings row of one scope in one server (None: a DM), if any."""
        return await self.session.scalar(
            select(ChannelSetting).where(*_setting_key(scope, scope_id, guild_id))
        )

    async def set_field(
        self,
        *,
        scope: str,
        scope_id: int,
        guild_id: int | None,
        field: str,
        value: object | None,
        actor_id: int,
        actor_name: str,
    ) -> object | None:
        """Set one field (None resets it to inherit), record the change, return the old value."""
        if scope not in SETTING_SCOPES:
            raise ValueError(f"unknown setting scope {scope!r}")
        if field not in SETTING_FIELDS:
            raise ValueError(f"unknown setting field {field!r}")
        if value is not None and not isinstance(value, _FIELD_TYPES[field]):
            raise TypeError(f"{field} takes {_FIELD_TYPES[field].__name__}, not {value!r}")
        # Insert-if-missing first, so two concurrent first writes cannot both insert,
        # then lock the row (FOR UPDATE on PostgreSQL; SQLite's write lock is already held).
        await self.session.execute(
            _insert_ignoring_conflicts(self.session, table_of(ChannelSetting)).values(
                id=new_id(), scope=scope, scope_id=scope_id, guild_id=guild_id, updated_at=utcnow()
            )
        )
        row = await self.session.scalar(
            select(ChannelSetting)
            .where(*_setting_key(scope, scope_id, guild_id))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        assert row is not None
        old: object | None = getattr(row, field)
        if old != value or type(old) is not type(value):
            setattr(row, field, value)
            row.updated_at = utcnow()
            row.updated_by = actor_id
            self.session.add(
                SettingChange(
                    id=new_id(),
                    scope=scope,
                    scope_id=scope_id,
                    guild_id=guild_id,
                    field=field,
                    old_value=_as_text(old),
                    new_value=_as_text(value),
                    actor_id=actor_id,
                    actor_name=actor_name,
                    changed_at=utcnow(),
                )
            )
        # A row with nothing set says nothing; drop it rather than keep an empty override.
        if all(getattr(row, name) is None for name in SETTING_FIELDS):
            await self.session.delete(row)
        await self.session.flush()
        return old

    async def changes(
        self, scope: str, scope_id: int, guild_id: int | None, limit: int = 20
    ) -> list[SettingChange]:
        """The latest changes to one scope's settings in one server (None: a DM), newest first."""
        server = (
            SettingChange.guild_id.is_(None)
            if guild_id is None
            else SettingChange.guild_id == guild_id
        )
        rows = await self.session.scalars(
            select(SettingChange)
            .where(SettingChange.scope == scope, SettingChange.scope_id == scope_id, server)
            .order_by(SettingChange.changed_at.desc(), SettingChange.id.desc())
            .limit(limit)
        )
        return list(rows.all())


class ConversationRepository:
    """Conversations, their messages, and the Discord messages that carry the answers."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(
        self,
        *,
        id: str | None = None,
        guild_id: int | None,
        channel_id: int | None,
        thread_id: int | None,
        started_by: int | None,
        origin: str = "discord",
    ) -> Conversation:
        """Start a conversation (inserted at once, so messages can refer to it)."""
        conversation = Conversation(
            id=id or new_id(),
            guild_id=guild_id,
            channel_id=channel_id,
            thread_id=thread_id,
            started_by=started_by,
            origin=origin,
            created_at=utcnow(),
        )
        # A plain INSERT (no unit-of-work flush) is much cheaper on the logging hot path;
        # then the object joins the session as if loaded, so later changes are tracked.
        await self.session.execute(
            insert(table_of(Conversation)),
            [{c.key: getattr(conversation, c.key) for c in table_of(Conversation).columns}],
        )
        make_transient_to_detached(conversation)
        self.session.add(conversation)
        return conversation

    async def ensure(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Create the conversations that do not exist yet (the log writer may replay a write).

        Each row has id, guild_id, channel_id, thread_id, started_by and origin.
        """
        now = utcnow()
        unique = {row["id"]: {**row, "created_at": row.get("created_at") or now} for row in rows}
        if unique:
            await self.session.execute(
                _insert_ignoring_conflicts(self.session, table_of(Conversation)),
                list(unique.values()),
            )

    async def get(self, id: str) -> Conversation | None:
        """One conversation by id."""
        return await self.session.get(Conversation, id)

    async def delete(self, id: str) -> bool:
        """Delete a conversation with its messages and Discord links; False if it did not exist.

        What derives from its messages goes too (the parent links cascade), even a line
        continued in another conversation, such as a thread started from one of its answers.
        """
        await self._delete_lines(select(Message.id).where(Message.conversation_id == id))
        result = await self.session.execute(delete(Conversation).where(Conversation.id == id))
        return bool(cast(CursorResult[Any], result).rowcount)

    async def delete_messages(self, message_ids: Iterable[str]) -> int:
        """Delete these messages and everything that derives from them; returns how many went.

        Counted: the given messages that exist and their descendants (their answers, the
        line built on them). Their input links and Discord links go with them. The
        database would cascade on its own; the rows are deleted one by one, newest
        first, so that SQLite never has to walk a cascade deeper than it allows.
        """
        ids = list(dict.fromkeys(message_ids))
        deleted = 0
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            deleted += await self._delete_lines(select(Message.id).where(Message.id.in_(chunk)))
        return deleted

    async def _delete_lines(self, roots: Select[Any]) -> int:
        """Delete the messages `roots` selects and their descendants, newest first."""
        line = roots.cte("doomed", recursive=True)
        # UNION, not UNION ALL: each message is walked once, however many roots lead to it.
        line = line.union(select(Message.id).join(line, Message.parent_id == line.c.id))
        # Newest first: SQLite runs each level of an ON DELETE CASCADE as a nested trigger
        # and refuses more than 1,000 levels, so the database must never walk a long line.
        result = await self.session.scalars(
            select(Message.id)
            .where(Message.id.in_(select(line.c.id)))
            .order_by(Message.created_at.desc(), Message.id.desc())
        )
        doomed = result.all()
        table = table_of(Message)
        if self.session.get_bind().dialect.name == "postgresql":
            # PostgreSQL cascades after the statement, when the listed rows are gone: a
            # few large DELETEs, newest first, leave it nothing to walk.
            for start in range(0, len(doomed), _IDS_PER_QUERY):
                chunk = doomed[start : start + _IDS_PER_QUERY]
                await self.session.execute(delete(table).where(table.c.id.in_(chunk)))
        elif doomed:
            # SQLite cascades row by row, so one row per DELETE (one executemany), newest
            # first: each row's descendants are gone by the time it is deleted.
            await self.session.execute(
                delete(table).where(table.c.id == bindparam("doomed_id")),
                [{"doomed_id": id} for id in doomed],
            )
        return len(doomed)

    async def answers_using(self, message_ids: Iterable[str]) -> list[str]:
        """Ids of the answers whose inputs include any of these messages, oldest first."""
        ids = list(dict.fromkeys(message_ids))
        found: dict[str, tuple[Any, str]] = {}
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            used = select(MessageInput.answer_id).where(MessageInput.input_id.in_(chunk))
            rows = await self.session.execute(
                select(Message.id, Message.created_at).where(Message.id.in_(used))
            )
            found.update((row.id, (row.created_at, row.id)) for row in rows)
        return sorted(found, key=found.__getitem__)

    async def inputs_of(self, answer_id: str) -> list[str]:
        """The ids of the stored messages an answer was built from, in order."""
        rows = await self.session.scalars(
            select(MessageInput.input_id)
            .where(MessageInput.answer_id == answer_id)
            .order_by(MessageInput.position)
        )
        return list(rows.all())

    async def latest_for_thread(self, thread_id: int) -> Conversation | None:
        """The most recent conversation held in a Discord thread."""
        return await self.session.scalar(
            select(Conversation)
            .where(Conversation.thread_id == thread_id)
            .order_by(Conversation.created_at.desc(), Conversation.id.desc())
            .limit(1)
        )

    async def latest_for_dm(self, channel_id: int) -> Conversation | None:
        """The most recent conversation in a DM channel (no server, no thread)."""
        return await self.session.scalar(
            select(Conversation)
            .where(
                Conversation.channel_id == channel_id,
                Conversation.guild_id.is_(None),
                Conversation.thread_id.is_(None),
            )
            .order_by(Conversation.created_at.desc(), Conversation.id.desc())
            .limit(1)
        )

    async def find_by_discord_message(self, discord_message_id: int) -> tuple[str, str] | None:
        """(conversation_id, message_id) of the answer a Discord message the bot sent carries."""
        row = (
            await self.session.execute(
                select(DiscordMessage.conversation_id, DiscordMessage.message_id).where(
                    DiscordMessage.discord_message_id == discord_message_id
                )
            )
        ).first()
        return (row.conversation_id, row.message_id) if row is not None else None

    async def messages(self, conversation_id: str) -> list[Message]:
        """All messages of a conversation, oldest first."""
        rows = await self.session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation_id)
            .order_by(Message.created_at, Message.id)
        )
        return list(rows.all())

    async def get_message(self, message_id: str) -> Message | None:
        """One message by id."""
        return await self.session.get(Message, message_id)

    async def lineage(self, message_id: str, limit: int) -> list[Message]:
        """`message_id` and up to `limit - 1` ancestors along parent links, oldest first."""
        if limit <= 0:
            return []
        # One recursive query; the depth bound also stops a (corrupt) cycle.
        walk = (
            select(Message.id, Message.parent_id, literal_column("0", Integer).label("depth"))
            .where(Message.id == message_id)
            .cte("lineage", recursive=True)
        )
        parent = select(Message.id, Message.parent_id, (walk.c.depth + 1).label("depth")).join(
            walk, Message.id == walk.c.parent_id
        )
        walk = walk.union_all(parent.where(walk.c.depth < limit - 1))
        rows = await self.session.scalars(
            select(Message).join(walk, Message.id == walk.c.id).order_by(walk.c.depth.desc())
        )
        return list(rows.all())

    def add_message(self, **fields: Any) -> Message:
        """Add one message to the session (id, created_at and kind are filled in if missing)."""
        unknown = set(fields) - MESSAGE_FIELDS
        if unknown:
            raise ValueError(f"unknown message fields: {sorted(unknown)}")
        message = Message(
            **{
                "id": new_id(),
                "created_at": utcnow(),
                "kind": default_kind(fields.get("role")),
                **fields,
            }
        )
        self.session.add(message)
        return message

    async def add_messages(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """Insert many messages in one statement; returns their ids in order.

        Missing ids are generated; missing `created_at` are filled with strictly
        increasing times, so rows given together keep their order; a missing `kind` is
        "prompt" for a user row and "answer" for an assistant row.
        """
        now = utcnow()
        prepared: list[dict[str, Any]] = []
        for index, row in enumerate(rows):
            unknown = set(row) - MESSAGE_FIELDS
            if unknown:
                raise ValueError(f"unknown message fields: {sorted(unknown)}")
            complete = {name: row.get(name) for name in MESSAGE_COLUMNS}
            complete["id"] = complete["id"] or new_id()
            complete["created_at"] = complete["created_at"] or now + timedelta(microseconds=index)
            complete["kind"] = complete["kind"] or default_kind(complete["role"])
            prepared.append(complete)
        await self.insert_rows(prepared)
        return [row["id"] for row in prepared]

    async def insert_rows(
        self,
        messages: list[dict[str, Any]],
        inputs: list[dict[str, Any]] | None = None,
    ) -> None:
        """Insert complete message rows and their input links: one executemany each.

        No checks and no defaults: each message row carries every column of
        `MESSAGE_COLUMNS` (that is what makes one batch of it), each input row
        answer_id, position and input_id. For the exchange log's hot path.
        """
        if messages:
            await self.session.execute(insert(table_of(Message)), messages)
        if inputs:
            await self.session.execute(insert(table_of(MessageInput)), inputs)

    async def link_discord_messages(
        self, message_id: str, conversation_id: str, discord_message_ids: Iterable[int]
    ) -> None:
        """Record the Discord messages that carry an answer (linking one twice is harmless)."""
        values = [
            {
                "discord_message_id": did,
                "message_id": message_id,
                "conversation_id": conversation_id,
            }
            for did in dict.fromkeys(discord_message_ids)
        ]
        if values:
            await self.session.execute(
                _insert_ignoring_conflicts(self.session, table_of(DiscordMessage)), values
            )

    async def discord_messages_for(self, message_id: str) -> list[int]:
        """The Discord message ids that carry an answer, in id order."""
        rows = await self.session.scalars(
            select(DiscordMessage.discord_message_id)
            .where(DiscordMessage.message_id == message_id)
            .order_by(DiscordMessage.discord_message_id)
        )
        return list(rows.all())

    async def count_messages(self) -> int:
        """How many messages are stored."""
        return int(await self.session.scalar(select(func.count()).select_from(Message)) or 0)


class ModelRepository:
    """Models registered at run time (fine-tunes, GGUF files)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self) -> list[RegisteredModel]:
        """All registered models, by name."""
        rows = await self.session.scalars(select(RegisteredModel).order_by(RegisteredModel.name))
        return list(rows.all())

    async def get(self, name: str) -> RegisteredModel | None:
        """One registered model by name."""
        return await self.session.get(RegisteredModel, name)

    async def add(self, name: str, spec: dict[str, Any], created_by: str | None) -> None:
        """Register a model, replacing one of the same name."""
        secret = _SECRET_KEYS.intersection(key.lower() for key in spec)
        if secret:
            raise ValueError(
                f"a registered model's spec is stored as is, so it may hold no secrets "
                f"({', '.join(sorted(secret))}); name the variable that holds the key in api_key_env"
            )
        existing = await self.session.get(RegisteredModel, name)
        if existing is None:
            self.session.add(
                RegisteredModel(name=name, spec=spec, created_by=created_by, created_at=utcnow())
            )
        else:
            existing.spec = spec
            existing.created_by = created_by
            existing.created_at = utcnow()
        await self.session.flush()

    async def remove(self, name: str) -> bool:
        """Unregister a model; False if there was none by that name."""
        result = await self.session.execute(
            delete(RegisteredModel).where(RegisteredModel.name == name)
        )
        return bool(cast(CursorResult[Any], result).rowcount)


# Kinds of message a person may vote on or correct: what a model answered.
VOTABLE_KINDS: tuple[str, ...] = ("answer", "alternative", "comparison", "battle")


@dataclass(frozen=True, slots=True)
class ModelVotes:
    """The feedback one model got in a place and period."""

    model_name: str
    answers: int
    up: int
    down: int
    corrections: int
    reasons: dict[str, int]


class FeedbackRepository:
    """Votes on answers, and people's corrections of them."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def votable(self, answer_id: str) -> Message | None:
        """The answer with this id, if it is one a person may vote on or correct."""
        message = await self.session.get(Message, answer_id)
        if message is None or message.kind not in VOTABLE_KINDS:
            return None
        return message

    async def vote(
        self,
        answer: Message,
        *,
        voter_id: int,
        voter_name: str,
        value: int,
        source: str,
        reason: str | None = None,
        comment: str | None = None,
    ) -> int | None:
        """Record one person's vote on `answer` (replacing theirs); returns the value it replaced."""
        existing = await self.session.scalar(
            select(Vote)
            .where(Vote.answer_id == answer.id, Vote.voter_id == voter_id)
            .with_for_update()
        )
        now = utcnow()
        if existing is None:
            self.session.add(
                Vote(
                    id=new_id(),
                    answer_id=answer.id,
                    voter_id=voter_id,
                    voter_name=voter_name,
                    value=value,
                    reason=reason,
                    comment=comment,
                    source=source,
                    guild_id=answer.guild_id,
                    channel_id=answer.channel_id,
                    created_at=now,
                    updated_at=now,
                )
            )
            await self.session.flush()
            return None
        previous = existing.value
        existing.value = value
        existing.voter_name = voter_name
        existing.source = source
        # A thumbs-up carries no reason; a new thumbs-down keeps an earlier reason unless given one.
        existing.reason = (
            reason if value < 0 and reason is not None else (None if value > 0 else existing.reason)
        )
        existing.comment = (
            comment if comment is not None else (None if value > 0 else existing.comment)
        )
        existing.updated_at = now
        await self.session.flush()
        return previous

    async def unvote(self, answer_id: str, voter_id: int) -> int | None:
        """Remove a person's vote on an answer; the value removed, or None if there was none."""
        existing = await self.session.scalar(
            select(Vote).where(Vote.answer_id == answer_id, Vote.voter_id == voter_id)
        )
        if existing is None:
            return None
        previous = existing.value
        await self.session.delete(existing)
        await self.session.flush()
        return previous

    async def vote_of(self, answer_id: str, voter_id: int) -> Vote | None:
        """A person's vote on an answer, if any."""
        return await self.session.scalar(
            select(Vote).where(Vote.answer_id == answer_id, Vote.voter_id == voter_id)
        )

    async def add_correction(
        self, answer: Message, *, author_id: int, author_name: str, text: str, cleaned: bool
    ) -> str:
        """Store a person's better answer to `answer`'s prompt; its id.

        It is a sibling of the answer (same prompt, the same messages sent and stored
        inputs), of kind "correction", so it can be trained on and preferred over the
        original, and a forgotten person's words take it with them.
        """
        correction_id = new_id()
        row: dict[str, Any] = dict.fromkeys(MESSAGE_COLUMNS)
        row.update(
            id=correction_id,
            conversation_id=answer.conversation_id,
            parent_id=answer.parent_id,
            role="assistant",
            kind="correction",
            content=text,
            cleaned=cleaned,
            author_id=author_id,
            author_name=author_name,
            guild_id=answer.guild_id,
            channel_id=answer.channel_id,
            thread_id=answer.thread_id,
            created_at=utcnow(),
            system_prompt=answer.system_prompt,
            request_messages=answer.request_messages,
            source_ids=answer.source_ids,
            alternative_to=answer.id,
            status="ok",
        )
        inputs = await ConversationRepository(self.session).inputs_of(answer.id)
        await ConversationRepository(self.session).insert_rows(
            [row],
            [
                {"answer_id": correction_id, "position": position, "input_id": input_id}
                for position, input_id in enumerate(inputs)
            ],
        )
        return correction_id

    async def stats(
        self,
        *,
        guild_id: int | None,
        channel_id: int | None = None,
        model_name: str | None = None,
        since: datetime | None = None,
    ) -> list[ModelVotes]:
        """Per model: answers, 👍, 👎, corrections and 👎 reasons in a server (or channel)."""
        where: list[ColumnElement[bool]] = [
            Message.kind.in_(VOTABLE_KINDS),
            Message.model_name.is_not(None),
        ]
        if guild_id is not None:
            where.append(Message.guild_id == guild_id)
        if channel_id is not None:
            where.append(Message.channel_id == channel_id)
        if model_name is not None:
            where.append(Message.model_name == model_name)
        if since is not None:
            where.append(Message.created_at >= since)
        answers = dict(
            (await self.session.execute(
                select(Message.model_name, func.count()).where(*where).group_by(Message.model_name)
            )).tuples().all()
        )  # fmt: skip
        votes = (
            (
                await self.session.execute(
                    select(Message.model_name, Vote.value, Vote.reason, func.count())
                    .join(Vote, Vote.answer_id == Message.id)
                    .where(*where)
                    .group_by(Message.model_name, Vote.value, Vote.reason)
                )
            )
            .tuples()
            .all()
        )
        corrected = aliased(Message)
        corrections = dict(
            (await self.session.execute(
                select(Message.model_name, func.count())
                .join(corrected, corrected.alternative_to == Message.id)
                .where(*where, corrected.kind == "correction")
                .group_by(Message.model_name)
            )).tuples().all()
        )  # fmt: skip
        rows: dict[str, dict[str, Any]] = {
            str(name): {"up": 0, "down": 0, "reasons": {}} for name in answers
        }
        for name, value, reason, count in votes:
            row = rows.setdefault(str(name), {"up": 0, "down": 0, "reasons": {}})
            row["up" if value > 0 else "down"] += count
            if value < 0 and reason:
                row["reasons"][reason] = row["reasons"].get(reason, 0) + count
        return [
            ModelVotes(
                model_name=name,
                answers=int(answers.get(name, 0)),
                up=row["up"],
                down=row["down"],
                corrections=int(corrections.get(name, 0)),
                reasons=row["reasons"],
            )
            for name, row in sorted(rows.items())
        ]


class ArenaRepository:
    """Blind battles and their votes, and the answer people preferred in a comparison."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_battle(self, row: Mapping[str, Any]) -> None:
        """Store a battle (its exchange is stored first); storing it twice is harmless."""
        await self.session.execute(
            _insert_ignoring_conflicts(self.session, table_of(Battle)), [dict(row)]
        )

    async def battle(self, battle_id: str) -> Battle | None:
        """One battle by id."""
        return await self.session.get(Battle, battle_id)

    async def vote_of(self, battle_id: str, voter_id: int) -> BattleVote | None:
        """A person's vote on a battle, if any."""
        return await self.session.scalar(
            select(BattleVote).where(
                BattleVote.battle_id == battle_id, BattleVote.voter_id == voter_id
            )
        )

    async def votes_since(self, voter_id: int, since: datetime) -> int:
        """How many battle votes a person cast from `since` on."""
        count = await self.session.scalar(
            select(func.count())
            .select_from(BattleVote)
            .where(BattleVote.voter_id == voter_id, BattleVote.created_at >= since)
        )
        return int(count or 0)

    async def add_vote(
        self, battle_id: str, voter_id: int, outcome: str, reason: str | None
    ) -> None:
        """Record a person's verdict on a battle (a second one breaks the unique key)."""
        self.session.add(
            BattleVote(
                id=new_id(),
                battle_id=battle_id,
                voter_id=voter_id,
                outcome=outcome,
                reason=reason,
                created_at=utcnow(),
            )
        )
        await self.session.flush()

    async def comparison_answers(self, prompt_id: str) -> list[Message]:
        """The answers a side-by-side comparison gave to `prompt_id`, in the order stored."""
        rows = await self.session.scalars(
            select(Message)
            .where(Message.parent_id == prompt_id, Message.kind == "comparison")
            .order_by(Message.created_at, Message.id)
        )
        return list(rows.all())

    async def prefer(self, prompt_id: str, chosen_id: str, voter_id: int) -> str | None:
        """Record which answer a person found best (replacing theirs); the one it replaced."""
        existing = await self.session.scalar(
            select(Preference)
            .where(Preference.prompt_id == prompt_id, Preference.voter_id == voter_id)
            .with_for_update()
        )
        if existing is None:
            self.session.add(
                Preference(
                    id=new_id(),
                    prompt_id=prompt_id,
                    chosen_id=chosen_id,
                    voter_id=voter_id,
                    created_at=utcnow(),
                )
            )
            await self.session.flush()
            return None
        previous = existing.chosen_id
        existing.chosen_id = chosen_id
        await self.session.flush()
        return previous


# Battle verdicts that compare the two answers; "bad" (both bad) says nothing about which is better.
COUNTED_OUTCOMES: tuple[str, ...] = ("a", "b", "tie")
# Answers whose latency and cost say what a model is like to use: it answered.
_ANSWERED: tuple[str, ...] = ("ok", "fallback")


@dataclass(frozen=True, slots=True)
class CountedVerdict:
    """One person's counted verdict on a valid battle: "a", "b" or "tie"."""

    battle_id: str
    model_a: str
    model_b: str
    outcome: str


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What using one model was like in a place: how many answers, how fast, what they cost."""

    model_name: str
    answers: int
    median_latency_ms: float | None
    mean_cost_usd: float | None  # over the answers whose cost is known


class LeaderboardRepository:
    """What the leaderboard is made of: battle verdicts, and each model's speed and cost.

    A place is a server (`guild_id`) and, within it, a channel (`channel_id`, a thread
    counting as its channel); None means any. The terminal's made-up channel ids repeat
    across servers, so a channel is asked for with its server.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def battle_verdicts(
        self, *, guild_id: int | None = None, channel_id: int | None = None
    ) -> list[CountedVerdict]:
        """The verdicts of valid battles (oldest first): A better, B better, or a tie.

        A battle marked invalid (an answer gave its model away, or failed) counts for
        nothing; a "both bad" verdict compares nothing, so it is left out too.
        """
        query = (
            select(Battle.id, Battle.model_a, Battle.model_b, BattleVote.outcome)
            .join(BattleVote, BattleVote.battle_id == Battle.id)
            .where(Battle.invalid.is_(None), BattleVote.outcome.in_(COUNTED_OUTCOMES))
            .order_by(Battle.created_at, Battle.id, BattleVote.created_at, BattleVote.id)
        )
        if guild_id is not None:
            query = query.where(Battle.guild_id == guild_id)
        if channel_id is not None:
            query = query.where(Battle.channel_id == channel_id)
        rows = (await self.session.execute(query)).tuples().all()
        return [CountedVerdict(str(b), str(ma), str(mb), str(o)) for b, ma, mb, o in rows]

    async def model_usage(
        self, *, guild_id: int | None = None, channel_id: int | None = None
    ) -> list[ModelUsage]:
        """Per model (by name): its answers, their median latency and mean cost."""
        where: list[ColumnElement[bool]] = [
            Message.kind.in_(VOTABLE_KINDS),
            Message.model_name.is_not(None),
            Message.status.in_(_ANSWERED),
        ]
        if guild_id is not None:
            where.append(Message.guild_id == guild_id)
        if channel_id is not None:
            where.append(Message.channel_id == channel_id)
        totals = (
            (
                await self.session.execute(
                    select(
                        Message.model_name,
                        func.count(),
                        func.avg(Message.cost_usd),
                        func.count(Message.latency_ms),
                    )
                    .where(*where)
                    .group_by(Message.model_name)
                    .order_by(Message.model_name)
                )
            )
            .tuples()
            .all()
        )
        medians = await self._median_latencies(where, {str(n): int(k) for n, _, _, k in totals})
        return [
            ModelUsage(
                model_name=str(name),
                answers=int(answers),
                median_latency_ms=medians.get(str(name)),
                mean_cost_usd=float(cost) if cost is not None else None,
            )
            for name, answers, cost, _ in totals
        ]

    async def _median_latencies(
        self, where: list[ColumnElement[bool]], timed: dict[str, int]
    ) -> dict[str, float]:
        """The median latency per model, for the models with `timed[model]` timed answers."""
        timed = {name: count for name, count in timed.items() if count}
        if not timed:
            return {}
        latency = Message.latency_ms
        if self.session.get_bind().dialect.name == "postgresql":
            rows = await self.session.execute(
                select(Message.model_name, func.percentile_cont(0.5).within_group(latency))
                .where(*where, latency.is_not(None))
                .group_by(Message.model_name)
            )
            return {str(name): float(value) for name, value in rows.tuples()}
        # SQLite has no percentile: the middle one or two values, found by their position.
        medians: dict[str, float] = {}
        for name, count in timed.items():
            middle = await self.session.scalars(
                select(latency)
                .where(*where, latency.is_not(None), Message.model_name == name)
                .order_by(latency)
                .offset((count - 1) // 2)
                .limit(2 - count % 2)
            )
            values = [float(v) for v in middle.all() if v is not None]
            if values:
                medians[name] = sum(values) / len(values)
        return medians


def _upsert(
    session: AsyncSession,
    table: Any,
    keys: Sequence[str],
    updates: Callable[[Any], Mapping[str, Any]],
) -> Insert:
    """INSERT that updates the row with the same `keys` instead (SQLite and PostgreSQL).

    `updates(excluded)` says what to set, given the row that was about to be inserted.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg = pg_insert(table)
        return pg.on_conflict_do_update(index_elements=list(keys), set_=updates(pg.excluded))
    if dialect == "sqlite":
        lite = sqlite_insert(table)
        return lite.on_conflict_do_update(index_elements=list(keys), set_=updates(lite.excluded))
    raise NotImplementedError(f"no upsert for {dialect}")


class PeopleRepository:
    """What each person chose about their data (opted out or not)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def opted_out(self, user_ids: Iterable[int]) -> set[int]:
        """Which of these people have opted out; one query per 5,000 ids."""
        ids = sorted(set(user_ids))
        found: set[int] = set()
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            rows = await self.session.scalars(
                select(Person.user_id).where(Person.user_id.in_(chunk), Person.opted_out.is_(True))
            )
            found.update(rows.all())
        return found

    async def get(self, user_id: int) -> Person | None:
        """One person's row, if they ever chose anything."""
        return await self.session.get(Person, user_id)

    async def set_opted_out(self, user_id: int, opted_out: bool) -> None:
        """Record the person's choice (one statement, so two processes cannot both insert)."""
        now = utcnow()
        await self.session.execute(
            _upsert(
                self.session,
                table_of(Person),
                ["user_id"],
                lambda new: {"opted_out": new.opted_out, "changed_at": new.changed_at},
            ).values(user_id=user_id, opted_out=opted_out, changed_at=now)
        )


@dataclass(frozen=True, slots=True)
class AnonymousCountRow:
    """An exchange answered but not stored, as it is counted: when, where, which model, usage."""

    day: date
    guild_id: int  # 0: DMs
    model_name: str
    exchanges: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class AnonymousCountRepository:
    """Counts of exchanges that were answered but not stored, per day, server and model."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, rows: Iterable[AnonymousCountRow]) -> None:
        """Add these counts to the stored ones (one upsert per row)."""
        table = table_of(AnonymousCount)
        statement = _upsert(
            self.session,
            table,
            ["day", "guild_id", "model_name"],
            lambda new: {
                "exchanges": table.c.exchanges + new.exchanges,
                "prompt_tokens": table.c.prompt_tokens + new.prompt_tokens,
                "completion_tokens": table.c.completion_tokens + new.completion_tokens,
                "cost_usd": table.c.cost_usd + new.cost_usd,
            },
        )
        for row in rows:
            await self.session.execute(statement.values(id=new_id(), **dataclasses.asdict(row)))

    async def totals(self, guild_id: int | None = None) -> list[AnonymousCountRow]:
        """The stored counts (of one server, when given), oldest day first."""
        query = select(AnonymousCount).order_by(
            AnonymousCount.day, AnonymousCount.guild_id, AnonymousCount.model_name
        )
        if guild_id is not None:
            query = query.where(AnonymousCount.guild_id == guild_id)
        return [
            AnonymousCountRow(
                day=row.day,
                guild_id=row.guild_id,
                model_name=row.model_name,
                exchanges=row.exchanges,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                cost_usd=row.cost_usd,
            )
            for row in (await self.session.scalars(query)).all()
        ]


@dataclass(frozen=True, slots=True)
class SpendingRow:
    """Dollars one person's answers cost in one server on one day (UTC)."""

    day: date
    guild_id: int  # 0: DMs
    person_id: int  # 0: people who were forgotten
    cost_usd: float


class SpendingRepository:
    """The budgets' running totals: what each person spent, per server and day."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, rows: Iterable[SpendingRow]) -> None:
        """Add these amounts to the stored ones (one upsert per row)."""
        table = table_of(Spending)
        statement = _upsert(
            self.session,
            table,
            ["day", "guild_id", "person_id"],
            lambda new: {"cost_usd": table.c.cost_usd + new.cost_usd},
        )
        for row in rows:
            await self.session.execute(statement.values(id=new_id(), **dataclasses.asdict(row)))

    async def totals(
        self, day: date, person_ids: Iterable[int], guild_ids: Iterable[int]
    ) -> tuple[dict[int, float], dict[int, float]]:
        """What each of these people spent on `day` (in every server and DM), and what
        everyone spent in each of these servers; one query each per 5,000 ids."""
        people = await self._sums(day, Spending.person_id, person_ids)
        return people, await self._sums(day, Spending.guild_id, guild_ids)

    async def _sums(self, day: date, column: Any, keys: Iterable[int]) -> dict[int, float]:
        wanted = sorted(set(keys))
        sums = dict.fromkeys(wanted, 0.0)
        for start in range(0, len(wanted), _IDS_PER_QUERY):
            rows = await self.session.execute(
                select(column, func.sum(Spending.cost_usd))
                .where(Spending.day == day, column.in_(wanted[start : start + _IDS_PER_QUERY]))
                .group_by(column)
            )
            sums.update((key, float(total or 0.0)) for key, total in rows.all())
        return sums

    async def of_day(self, day: date) -> list[SpendingRow]:
        """Every total of `day` (the caller adds them up per server and person)."""
        rows = await self.session.scalars(select(Spending).where(Spending.day == day))
        return [SpendingRow(r.day, r.guild_id, r.person_id, r.cost_usd) for r in rows.all()]

    async def forget(self, person_id: int) -> None:
        """Pass a forgotten person's totals to person 0, so each server's total stays."""
        if person_id == 0:
            return
        theirs = (
            await self.session.scalars(select(Spending).where(Spending.person_id == person_id))
        ).all()
        await self.add(SpendingRow(row.day, row.guild_id, 0, row.cost_usd) for row in theirs)
        await self.session.execute(delete(Spending).where(Spending.person_id == person_id))

    async def delete_before(self, day: date) -> int:
        """Delete the totals of the days before `day`; how many rows went."""
        return _rowcount(await self.session.execute(delete(Spending).where(Spending.day < day)))


# What a forgotten person's name becomes where a record must keep a name (settings history).
FORGOTTEN_NAME = "(forgotten)"


@dataclass(slots=True)
class Removal:
    """What a privacy deletion removed (or, in a dry run, would remove)."""

    kinds: dict[str, int] = field(default_factory=dict)  # messages removed, by kind
    conversations: int = 0  # conversations left empty, removed with them
    detached: int = 0  # other people's prompts that now start a line of their own
    message_ids: set[str] = field(default_factory=set)
    conversation_ids: set[str] = field(default_factory=set)  # those removed
    touched: dict[str, int] = field(default_factory=dict)  # conversation id -> messages removed

    @property
    def messages(self) -> int:
        return sum(self.kinds.values())

    def add(self, other: Removal) -> None:
        for kind, count in other.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + count
        self.conversations += other.conversations
        self.detached += other.detached
        self.message_ids |= other.message_ids
        self.conversation_ids |= other.conversation_ids
        for conversation_id, count in other.touched.items():
            self.touched[conversation_id] = self.touched.get(conversation_id, 0) + count


@dataclass(frozen=True, slots=True)
class PersonForgotten:
    """What forgetting a person did to the database."""

    removed: Removal
    votes: int  # their votes, battle verdicts and preferences (others' went with the answers)
    setting_changes: int  # changes in the settings history now without their name


class PrivacyRepository:
    """The SQL behind forgetting a person, honouring deleted messages, and retention.

    Deleting a message deletes what derives from it: the answers to it (every kind), the
    answers whose input links name it, and the line built on them, newest first
    (`ConversationRepository.delete_messages`). The walk down the line stops at a prompt
    that is not being deleted itself: that prompt (someone else's, or a later one of the
    same person when only one message goes) stays and starts a line of its own
    (`parent_id` NULL), so one person's deletion never takes other people's words with it.
    Conversations left empty go too.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.conversations = ConversationRepository(session)

    async def missing_messages(self, message_ids: Iterable[str]) -> set[str]:
        """Of `message_ids`, those no longer stored (asked in chunks: a snapshot names many)."""
        wanted = list(dict.fromkeys(message_ids))
        missing: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            found = await self.session.scalars(select(Message.id).where(Message.id.in_(chunk)))
            missing.update(set(chunk) - set(found))
        return missing

    async def stored_about(self, user_id: int) -> tuple[int, int]:
        """(messages they wrote, votes they gave) that are stored now."""
        messages = await self.session.scalar(
            select(func.count()).select_from(Message).where(Message.author_id == user_id)
        )
        votes = await self.session.scalar(
            select(func.count()).select_from(Vote).where(Vote.voter_id == user_id)
        )
        return int(messages or 0), int(votes or 0)

    async def forget_person(self, user_id: int) -> PersonForgotten:
        """Delete everything stored about a person, in the caller's transaction.

        Their messages (prompts and corrections) and what derives from them (battles and
        comparisons of their prompts too), their votes, battle verdicts and preferences,
        their id and name in the settings history and on conversations and settings rows.
        Whether they opted out stays (it is what keeps them out of the log); a person who
        never opted out has no row left.
        """
        theirs = list(
            (await self.session.scalars(select(Message.id).where(Message.author_id == user_id)))
            .unique()
            .all()
        )
        others_prompt = and_(
            Message.kind == "prompt",
            or_(Message.author_id.is_(None), Message.author_id != user_id),
        )
        started = set(
            (
                await self.session.scalars(
                    select(Conversation.id).where(Conversation.started_by == user_id)
                )
            ).all()
        )
        # Their votes first: some are on answers that go below, and would go uncounted.
        votes = _rowcount(await self.session.execute(delete(Vote).where(Vote.voter_id == user_id)))
        # Their verdicts in blind battles and side-by-side comparisons are votes too.
        for verdicts in (BattleVote, Preference):
            votes += _rowcount(
                await self.session.execute(delete(verdicts).where(verdicts.voter_id == user_id))
            )
        removed = await self._remove(theirs, stop_at=others_prompt, extra_conversations=started)
        changes = await self.session.execute(
            update(SettingChange)
            .where(SettingChange.actor_id == user_id)
            .values(actor_id=0, actor_name=FORGOTTEN_NAME)
        )
        await self.session.execute(
            update(ChannelSetting)
            .where(ChannelSetting.updated_by == user_id)
            .values(updated_by=None)
        )
        await self.session.execute(
            update(Conversation).where(Conversation.started_by == user_id).values(started_by=None)
        )
        await self.session.execute(
            update(Battle).where(Battle.asked_by == user_id).values(asked_by=None)
        )
        # Fine-tuning jobs, gate steps and registered models name who did them "name (id)".
        named = f"% ({user_id})"
        for column in (TuneJob.started_by, ModelGateEvent.actor, RegisteredModel.created_by):
            await self.session.execute(
                update(column.class_).where(column.like(named)).values({column: FORGOTTEN_NAME})
            )
        # Their budget totals pass to nobody in particular: the servers' totals stay.
        await SpendingRepository(self.session).forget(user_id)
        await self.session.execute(
            delete(Person).where(Person.user_id == user_id, Person.opted_out.is_(False))
        )
        return PersonForgotten(
            removed=removed,
            votes=votes,
            setting_changes=_rowcount(changes),
        )

    async def delete_discord_message(self, discord_message_id: int) -> Removal:
        """A person deleted their Discord message: delete its prompt and what derives from it."""
        prompts = list(
            (
                await self.session.scalars(
                    select(Message.id).where(
                        Message.discord_message_id == discord_message_id,
                        Message.kind == "prompt",
                    )
                )
            ).all()
        )
        if not prompts:
            return Removal()
        return await self._remove(prompts, stop_at=Message.kind == "prompt")

    async def expired_prompts(
        self,
        cutoffs: Mapping[int, datetime | None],
        default: datetime | None,
        *,
        after: tuple[datetime, str] | None = None,
        limit: int = 1000,
    ) -> list[tuple[datetime, str]]:
        """Prompts older than their server's cutoff, oldest first: (created_at, id), `limit` at most.

        `cutoffs` holds the servers with a retention of their own (None: keep forever);
        every other place (DMs too) uses `default` (None: keep forever). `after` continues
        from the last prompt of the batch before (keyset pagination).
        """
        conditions = [
            and_(Message.guild_id == guild_id, Message.created_at < cutoff)
            for guild_id, cutoff in cutoffs.items()
            if cutoff is not None
        ]
        if default is not None:
            others = Message.created_at < default
            if cutoffs:
                others = and_(
                    others,
                    or_(Message.guild_id.is_(None), Message.guild_id.not_in(sorted(cutoffs))),
                )
            conditions.append(others)
        if not conditions:
            return []
        query = select(Message.created_at, Message.id).where(
            Message.kind == "prompt", or_(*conditions)
        )
        if after is not None:
            query = query.where(
                or_(
                    Message.created_at > after[0],
                    and_(Message.created_at == after[0], Message.id > after[1]),
                )
            )
        rows = await self.session.execute(
            query.order_by(Message.created_at, Message.id).limit(limit)
        )
        return [(row.created_at, row.id) for row in rows]

    async def expire(self, prompt_ids: Sequence[str], *, dry_run: bool = False) -> Removal:
        """Delete expired prompts with their answers; later prompts stay, starting a line.

        Answers that used them as history stay (they expire in their own time). A dry run
        counts what would go and changes nothing (`would_empty` tells the conversations).
        """
        return await self._remove(
            prompt_ids, stop_at=Message.kind == "prompt", follow_inputs=False, dry_run=dry_run
        )

    async def would_empty(self, touched: Mapping[str, int]) -> set[str]:
        """The conversations that removing this many of their messages would leave empty."""
        emptied: set[str] = set()
        for chunk in _chunks(sorted(touched)):
            counted = await self.session.execute(
                select(Message.conversation_id, func.count())
                .where(Message.conversation_id.in_(chunk))
                .group_by(Message.conversation_id)
            )
            sizes: dict[str, int] = {c: int(n) for c, n in counted.tuples()}
            emptied |= {c for c in chunk if sizes.get(c, 0) <= touched[c]}
        return emptied

    async def retention_overrides(self) -> dict[int, int]:
        """The servers with a retention of their own: guild id -> days (0: keep forever)."""
        rows = await self.session.execute(
            select(ChannelSetting.scope_id, ChannelSetting.retention_days).where(
                ChannelSetting.scope == "guild", ChannelSetting.retention_days.is_not(None)
            )
        )
        return {int(row.scope_id): int(row.retention_days) for row in rows}

    async def _remove(
        self,
        roots: Sequence[str],
        *,
        stop_at: ColumnElement[bool],
        follow_inputs: bool = True,
        extra_conversations: Iterable[str] = (),
        dry_run: bool = False,
    ) -> Removal:
        """Delete `roots` and what derives from them, except the prompts `stop_at` keeps."""
        doomed = await self._line(roots, stop_at)
        if follow_inputs:
            used = set(await self.conversations.answers_using(doomed)) - doomed
            doomed |= await self._line(sorted(used), stop_at)
        removal = Removal(message_ids=doomed)
        ids = sorted(doomed)
        touched: dict[str, int] = {}
        for chunk in _chunks(ids):
            rows = await self.session.execute(
                select(Message.kind, Message.conversation_id, func.count())
                .where(Message.id.in_(chunk))
                .group_by(Message.kind, Message.conversation_id)
            )
            for kind, conversation_id, count in rows.tuples():
                removal.kinds[kind] = removal.kinds.get(kind, 0) + int(count)
                touched[conversation_id] = touched.get(conversation_id, 0) + int(count)
        kept: set[str] = set()
        for chunk in _chunks(ids):
            children = await self.session.scalars(
                select(Message.id).where(Message.parent_id.in_(chunk))
            )
            kept.update(child for child in children.all() if child not in doomed)
        removal.detached = len(kept)
        removal.touched = touched
        if dry_run:
            return removal
        for chunk in _chunks(sorted(kept)):
            await self.session.execute(
                update(Message).where(Message.id.in_(chunk)).values(parent_id=None)
            )
        await self.conversations.delete_messages(ids)
        for chunk in _chunks(sorted(set(touched) | set(extra_conversations))):
            has_messages = select(Message.id).where(Message.conversation_id == Conversation.id)
            gone = set(
                (
                    await self.session.scalars(
                        select(Conversation.id).where(
                            Conversation.id.in_(chunk), ~has_messages.exists()
                        )
                    )
                ).all()
            )
            if gone:
                await self.session.execute(delete(Conversation).where(Conversation.id.in_(gone)))
            removal.conversation_ids |= gone
        removal.conversations = len(removal.conversation_ids)
        return removal

    async def _line(self, roots: Sequence[str], stop_at: ColumnElement[bool]) -> set[str]:
        """`roots` that exist and their descendants, not walking into the prompts `stop_at` keeps."""
        found: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(roots))):
            line = select(Message.id).where(Message.id.in_(chunk)).cte("line", recursive=True)
            line = line.union(
                select(Message.id).join(line, Message.parent_id == line.c.id).where(~stop_at)
            )
            found.update((await self.session.scalars(select(line.c.id))).all())
        return found


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    """`ids` in slices small enough for one IN (...) list."""
    for start in range(0, len(ids), _IDS_PER_QUERY):
        yield ids[start : start + _IDS_PER_QUERY]


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)
