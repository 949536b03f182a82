"""Repositories on real migrated databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.models import ChannelSetting, DiscordMessage, Message, MessageInput, new_id
from store.repositories import ConversationRepository, ModelRepository, SettingsRepository

Sessions = async_sessionmaker[AsyncSession]
GUILD, CHANNEL, THREAD, DM = 1000, 2000, 3000, 4000
ALICE, BOB = 11, 22


async def set_field(
    session: AsyncSession, scope: str, scope_id: int, field: str, value: Any
) -> Any:
    """Set one setting as Alice would."""
    return await SettingsRepository(session).set_field(
        scope=scope,
        scope_id=scope_id,
        guild_id=GUILD,
        field=field,
        value=value,
        actor_id=ALICE,
        actor_name="alice",
    )


# --- settings -------------------------------------------------------------------------


async def test_settings_upsert_inherit_and_reset(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        assert await set_field(session, "guild", GUILD, "model", "gpt-4o-mini") is None
        assert await set_field(session, "channel", CHANNEL, "model", "smollm2") is None
        assert await set_field(session, "channel", CHANNEL, "system_prompt", "Be brief.") is None
        await session.commit()

    async with any_session_factory() as session:
        rows = await SettingsRepository(session).rows_for(GUILD, CHANNEL, THREAD)
        assert set(rows) == {"guild", "channel"}
        assert rows["guild"].model == "gpt-4o-mini"
        assert rows["guild"].system_prompt is None  # not set there: inherits
        assert rows["channel"].model == "smollm2"
        assert rows["channel"].system_prompt == "Be brief."
        assert rows["channel"].updated_by == ALICE
        assert rows["channel"].updated_at.tzinfo is not None

        # Overwrite returns the old value; reset (None) returns it too.
        assert await set_field(session, "channel", CHANNEL, "model", "gpt-4o") == "smollm2"
        assert await set_field(session, "channel", CHANNEL, "model", None) == "gpt-4o"
        await session.commit()

    async with any_session_factory() as session:
        rows = await SettingsRepository(session).rows_for(GUILD, CHANNEL, THREAD)
        assert rows["channel"].model is None
        assert rows["channel"].system_prompt == "Be brief."

        # Resetting the last field set removes the row: nothing is overridden there any more.
        assert await set_field(session, "channel", CHANNEL, "system_prompt", None) == "Be brief."
        await session.commit()
        rows = await SettingsRepository(session).rows_for(GUILD, CHANNEL, THREAD)
        assert set(rows) == {"guild"}


async def test_settings_changes_are_recorded_newest_first(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        await set_field(session, "channel", CHANNEL, "model", "a")
        await set_field(session, "channel", CHANNEL, "model", "b")
        await set_field(session, "channel", CHANNEL, "knowledge_enabled", False)
        await set_field(session, "channel", CHANNEL, "model", None)
        await set_field(session, "channel", CHANNEL + 1, "model", "elsewhere")
        await session.commit()

    async with any_session_factory() as session:
        changes = await SettingsRepository(session).changes("channel", CHANNEL, GUILD)
        assert [(c.field, c.old_value, c.new_value) for c in changes] == [
            ("model", "b", None),
            ("knowledge_enabled", None, "false"),
            ("model", "a", "b"),
            ("model", None, "a"),
        ]
        assert {(c.actor_id, c.actor_name, c.guild_id) for c in changes} == {
            (ALICE, "alice", GUILD)
        }
        assert all(c.changed_at.tzinfo is not None for c in changes)
        assert (
            len(await SettingsRepository(session).changes("channel", CHANNEL, GUILD, limit=2)) == 2
        )


async def test_setting_the_same_value_records_nothing(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        await set_field(session, "thread", THREAD, "model", "a")
        assert await set_field(session, "thread", THREAD, "model", "a") == "a"
        assert await set_field(session, "thread", THREAD, "system_prompt", None) is None
        await session.commit()
        assert len(await SettingsRepository(session).changes("thread", THREAD, GUILD)) == 1


async def test_false_is_a_setting_not_inherit(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        await set_field(session, "guild", GUILD, "knowledge_enabled", True)
        await set_field(session, "thread", THREAD, "knowledge_enabled", False)
        await session.commit()

    async with any_session_factory() as session:
        rows = await SettingsRepository(session).rows_for(GUILD, CHANNEL, THREAD)
        assert rows["thread"].knowledge_enabled is False
        assert rows["guild"].knowledge_enabled is True


async def test_rows_for_a_dm_and_for_one_query(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        await SettingsRepository(session).set_field(
            scope="channel", scope_id=DM, guild_id=None, field="model", value="dm-model",
            actor_id=BOB, actor_name="bob",
        )  # fmt: skip
        await set_field(session, "guild", GUILD, "model", "guild-model")
        await session.commit()

    statements: list[str] = []
    engine = any_session_factory.kw["bind"]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with any_session_factory() as session:
            rows = await SettingsRepository(session).rows_for(None, DM, None)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert {scope: row.model for scope, row in rows.items()} == {"channel": "dm-model"}
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1


async def test_the_same_channel_id_in_two_servers_is_two_channels(
    any_session_factory: Sessions,
) -> None:
    """The terminal makes ids up: channel 5 of server 1 is not channel 5 of server 2, nor a DM."""
    async with any_session_factory() as session:
        repo = SettingsRepository(session)
        for guild_id, model in ((1, "one"), (2, "two"), (None, "dm")):
            await repo.set_field(
                scope="channel", scope_id=5, guild_id=guild_id, field="model", value=model,
                actor_id=ALICE, actor_name="alice",
            )  # fmt: skip
        await repo.set_field(
            scope="thread", scope_id=7, guild_id=1, field="knowledge_enabled", value=True,
            actor_id=ALICE, actor_name="alice",
        )  # fmt: skip
        await session.commit()

    async with any_session_factory() as session:
        repo = SettingsRepository(session)
        one = await repo.rows_for(1, 5, 7)
        assert {k: r.model for k, r in one.items() if r.model} == {"channel": "one"}
        assert one["thread"].knowledge_enabled is True
        assert {k: r.model for k, r in (await repo.rows_for(2, 5, 7)).items()} == {"channel": "two"}
        assert {k: r.model for k, r in (await repo.rows_for(None, 5, 7)).items()} == {
            "channel": "dm"
        }
        assert [c.new_value for c in await repo.changes("channel", 5, 2)] == ["two"]
        assert [c.new_value for c in await repo.changes("channel", 5, None)] == ["dm"]
        assert (await repo.get("channel", 5, 1)).model == "one"  # type: ignore[union-attr]
        assert await repo.get("thread", 7, 2) is None


async def test_concurrent_first_writes_to_a_dm_land_in_one_row(
    any_session_factory: Sessions,
) -> None:
    """A DM has no server: its own unique index keeps first writes from racing into two rows."""

    async def change(field: str, value: Any) -> None:
        async with any_session_factory() as session, session.begin():
            await SettingsRepository(session).set_field(
                scope="channel", scope_id=DM, guild_id=None, field=field, value=value,
                actor_id=BOB, actor_name="bob",
            )  # fmt: skip

    await asyncio.gather(change("model", "m"), change("system_prompt", "p"))
    async with any_session_factory() as session:
        rows = (await session.scalars(select(ChannelSetting))).all()
        assert [(r.model, r.system_prompt) for r in rows] == [("m", "p")]


async def test_concurrent_first_writes_to_one_scope_all_land(any_session_factory: Sessions) -> None:
    """Several moderators changing a channel that has no row yet: no duplicate-key errors."""
    values = {"model": "m", "system_prompt": "p", "knowledge_enabled": True}

    async def change(field: str, value: Any) -> None:
        async with any_session_factory() as session, session.begin():
            await set_field(session, "channel", CHANNEL, field, value)

    await asyncio.gather(*(change(field, value) for field, value in values.items()))

    async with any_session_factory() as session:
        row = (await SettingsRepository(session).rows_for(GUILD, CHANNEL, None))["channel"]
        assert {field: row.get(field) for field in values} == values
        assert len(await SettingsRepository(session).changes("channel", CHANNEL, GUILD)) == 3


async def test_set_field_rejects_unknown_fields_and_wrong_types(
    any_session_factory: Sessions,
) -> None:
    async with any_session_factory() as session:
        with pytest.raises(ValueError, match="field"):
            await set_field(session, "channel", CHANNEL, "temperature", "0.3")
        with pytest.raises(ValueError, match="scope"):
            await set_field(session, "server", CHANNEL, "model", "a")
        with pytest.raises(TypeError):
            await set_field(session, "channel", CHANNEL, "knowledge_enabled", "yes")
        assert (await session.scalars(select(ChannelSetting))).all() == []


# --- conversations --------------------------------------------------------------------


async def two_answers_and_a_reply(session: AsyncSession) -> dict[str, str]:
    """u1 → a1 and a1b (a retry); u2 replies to the older a1; a2 answers u2."""
    conversations = ConversationRepository(session)
    conversation = await conversations.create(
        id=None, guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD, started_by=ALICE,
        origin="discord",
    )  # fmt: skip
    place = {"conversation_id": conversation.id, "guild_id": GUILD, "channel_id": CHANNEL,
             "thread_id": THREAD}  # fmt: skip
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # The service picks the ids itself, so one call can log a prompt and its answer.
    u1, a1 = new_id(), new_id()
    assert await conversations.add_messages(
        [
            {**place, "id": u1, "role": "user", "content": "What is 2+2?", "author_id": ALICE,
             "author_name": "alice", "discord_message_id": 500, "created_at": t0},
            {**place, "id": a1, "parent_id": u1, "role": "assistant", "content": "4",
             "model_name": "smollm2", "created_at": t0 + timedelta(seconds=1)},
        ]
    ) == [u1, a1]  # fmt: skip
    a1b = conversations.add_message(
        **place, role="assistant", content="Four.", parent_id=u1, model_name="gpt-4o",
        created_at=t0 + timedelta(seconds=2),
    )  # fmt: skip
    await session.flush()
    (u2,) = await conversations.add_messages(
        [{**place, "role": "user", "content": "And times 3?", "parent_id": a1,
          "author_id": BOB, "author_name": "bob", "created_at": t0 + timedelta(seconds=3)}]
    )  # fmt: skip
    (a2,) = await conversations.add_messages(
        [{**place, "role": "assistant", "content": "12", "parent_id": u2,
          "request_messages": [{"role": "user", "content": "What is 2+2?"}],
          "source_ids": ["doc-1:0", "doc-1:3"], "prompt_tokens": 12, "completion_tokens": 1,
          "latency_ms": 80.5, "ttft_ms": 20.0, "cost_usd": 0.0001, "status": "ok",
          "created_at": t0 + timedelta(seconds=4)}]
    )  # fmt: skip
    return {"conversation": conversation.id, "u1": u1, "a1": a1, "a1b": a1b.id, "u2": u2, "a2": a2}


async def test_lineage_follows_the_branch_it_is_asked_about(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        ids = await two_answers_and_a_reply(session)
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        by_id = {v: k for k, v in ids.items()}

        async def walk(start: str, limit: int = 50) -> list[str]:
            return [by_id[m.id] for m in await repo.lineage(ids[start], limit)]

        assert await walk("a2") == ["u1", "a1", "u2", "a2"]  # the reply went to the older answer
        assert await walk("a1b") == ["u1", "a1b"]  # the other answer is its own branch
        assert await walk("u2") == ["u1", "a1", "u2"]
        assert await walk("a2", limit=2) == ["u2", "a2"]  # the newest ones, oldest first
        assert await walk("u1") == ["u1"]
        assert await repo.lineage(ids["a2"], 0) == []
        assert await repo.lineage("f" * 32, 10) == []

        # Everything in the conversation, in time order, includes both answers.
        assert [by_id[m.id] for m in await repo.messages(ids["conversation"])] == [
            "u1", "a1", "a1b", "u2", "a2",
        ]  # fmt: skip


async def test_message_fields_round_trip(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        ids = await two_answers_and_a_reply(session)
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        a2 = await repo.get_message(ids["a2"])
        assert a2 is not None
        assert a2.request_messages == [{"role": "user", "content": "What is 2+2?"}]
        assert a2.source_ids == ["doc-1:0", "doc-1:3"]
        assert (a2.prompt_tokens, a2.completion_tokens, a2.status) == (12, 1, "ok")
        assert a2.latency_ms == pytest.approx(80.5)
        assert a2.created_at == datetime(2026, 1, 1, 12, 0, 4, tzinfo=UTC)
        # JSON None is stored as SQL NULL, so the exporter can filter on it.
        no_sources = await session.scalars(select(Message.id).where(Message.source_ids.is_(None)))
        assert set(no_sources.all()) == {ids["u1"], ids["a1"], ids["a1b"], ids["u2"]}
        assert await repo.count_messages() == 5


async def test_add_messages_fills_ids_and_keeps_order(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        conversation = await repo.create(
            guild_id=None, channel_id=None, thread_id=None, started_by=None, origin="terminal"
        )
        ids = await repo.add_messages(
            [{"conversation_id": conversation.id, "role": "user", "content": str(i)}
             for i in range(5)]
        )  # fmt: skip
        await session.commit()
        assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)
        assert [m.content for m in await repo.messages(conversation.id)] == list("01234")
        with pytest.raises(ValueError, match="unknown"):
            await repo.add_messages([{"conversation_id": conversation.id, "rating": 5}])


async def test_find_by_discord_message(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        ids = await two_answers_and_a_reply(session)
        repo = ConversationRepository(session)
        await repo.link_discord_messages(ids["a1"], ids["conversation"], [900, 901])
        await repo.link_discord_messages(ids["a1"], ids["conversation"], [901])  # again: harmless
        await repo.link_discord_messages(ids["a2"], ids["conversation"], [902])
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.find_by_discord_message(901) == (ids["conversation"], ids["a1"])
        assert await repo.find_by_discord_message(902) == (ids["conversation"], ids["a2"])
        # Only what the bot sent: a person's prompt (Discord id 500) is not an answer to continue.
        assert await repo.find_by_discord_message(500) is None
        assert await repo.find_by_discord_message(12345) is None
        assert await repo.discord_messages_for(ids["a1"]) == [900, 901]


async def test_latest_for_thread(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        first = await repo.create(guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD,
                                  started_by=ALICE, origin="discord")  # fmt: skip
        first.created_at = datetime(2026, 1, 1, tzinfo=UTC)
        second = await repo.create(guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD,
                                   started_by=BOB, origin="discord")  # fmt: skip
        await repo.create(guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD + 1,
                          started_by=BOB, origin="discord")  # fmt: skip
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        latest = await repo.latest_for_thread(THREAD)
        assert latest is not None and latest.id == second.id
        assert await repo.latest_for_thread(THREAD + 2) is None
        fetched = await repo.get(first.id)
        assert fetched is not None and fetched.started_by == ALICE
        assert fetched.created_at == datetime(2026, 1, 1, tzinfo=UTC)


async def test_deleting_a_conversation_cascades(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        doomed = await two_answers_and_a_reply(session)
        kept = await two_answers_and_a_reply(session)
        repo = ConversationRepository(session)
        await repo.link_discord_messages(doomed["a2"], doomed["conversation"], [700, 701])
        await repo.link_discord_messages(kept["a2"], kept["conversation"], [800])
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.delete(doomed["conversation"]) is True
        await session.commit()
        assert await repo.delete(doomed["conversation"]) is False

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.get(doomed["conversation"]) is None
        assert await repo.messages(doomed["conversation"]) == []
        assert await repo.find_by_discord_message(700) is None
        assert await repo.count_messages() == 5
        assert await repo.find_by_discord_message(800) == (kept["conversation"], kept["a2"])
        remaining = await session.scalars(select(DiscordMessage.discord_message_id))
        assert remaining.all() == [800]


async def test_kinds_default_from_the_role_and_are_checked(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        ids = await two_answers_and_a_reply(session)
        repo = ConversationRepository(session)
        (attempt,) = await repo.add_messages(
            [{"conversation_id": ids["conversation"], "parent_id": ids["u2"], "role": "assistant",
              "kind": "attempt", "content": ""}]
        )  # fmt: skip
        await session.commit()
        kinds = dict((await session.execute(select(Message.id, Message.kind))).tuples().all())
        by_name = {name: kinds[id] for name, id in ids.items() if id in kinds}
        assert by_name == {
            "u1": "prompt",
            "a1": "answer",
            "a1b": "answer",
            "u2": "prompt",
            "a2": "answer",
        }
        assert kinds[attempt] == "attempt"

    async with any_session_factory() as session:
        with pytest.raises(IntegrityError):
            await ConversationRepository(session).add_messages(
                [{"conversation_id": ids["conversation"], "role": "assistant", "kind": "guess",
                  "content": "?"}]
            )  # fmt: skip


async def link_inputs(session: AsyncSession, inputs: dict[str, list[str]]) -> None:
    """Record which stored messages went into each answer."""
    await ConversationRepository(session).insert_rows(
        [],
        [{"answer_id": answer, "position": position, "input_id": input_id}
         for answer, used in inputs.items() for position, input_id in enumerate(used)],
    )  # fmt: skip


async def test_answers_using_and_delete_messages(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session:
        ids = await two_answers_and_a_reply(session)
        kept = await two_answers_and_a_reply(session)
        for line in (ids, kept):
            await link_inputs(session, {line["a1"]: [line["u1"]], line["a1b"]: [line["u1"]],
                                        line["a2"]: [line["u1"], line["a1"], line["u2"]]})  # fmt: skip
        repo = ConversationRepository(session)
        await repo.link_discord_messages(ids["a2"], ids["conversation"], [700])
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.answers_using([ids["u1"]]) == [ids["a1"], ids["a1b"], ids["a2"]]
        assert await repo.answers_using([ids["u2"], ids["a1"], ids["u2"]]) == [ids["a2"]]
        assert await repo.answers_using([ids["a2"], "f" * 32]) == []
        assert await repo.answers_using([]) == []
        assert await repo.inputs_of(ids["a2"]) == [ids["u1"], ids["a1"], ids["u2"]]

        # Bob's reply goes, and the answer built on it with its links and Discord message.
        assert await repo.delete_messages([ids["u2"]]) == 2
        await session.commit()
        assert await repo.get_message(ids["a2"]) is None
        assert await repo.inputs_of(ids["a2"]) == []
        assert await repo.find_by_discord_message(700) is None
        assert await repo.answers_using([ids["u1"]]) == [ids["a1"], ids["a1b"]]

        # Alice's prompt takes both its answers with it; asking twice is harmless.
        assert await repo.delete_messages([ids["u1"], ids["a1"], ids["u1"]]) == 3
        assert await repo.delete_messages([ids["u1"], "f" * 32]) == 0
        assert await repo.delete_messages([]) == 0
        await session.commit()
        assert await repo.messages(ids["conversation"]) == []
        assert await repo.get(ids["conversation"]) is not None

        # The other conversation is untouched.
        assert len(await repo.messages(kept["conversation"])) == 5
        assert await repo.answers_using([kept["u1"]]) == [kept["a1"], kept["a1b"], kept["a2"]]
        links = await session.scalar(select(func.count()).select_from(MessageInput))
        assert links == 5


async def long_line(session: AsyncSession, length: int) -> tuple[str, list[str]]:
    """A conversation that is one line of `length` messages, each replying to the last."""
    repo = ConversationRepository(session)
    conversation = await repo.create(guild_id=GUILD, channel_id=CHANNEL, thread_id=THREAD,
                                     started_by=ALICE)  # fmt: skip
    ids = [new_id() for _ in range(length)]
    await repo.add_messages(
        [{"id": id, "conversation_id": conversation.id, "parent_id": ids[i - 1] if i else None,
          "role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
         for i, id in enumerate(ids)]
    )  # fmt: skip
    return conversation.id, ids


async def test_a_line_longer_than_sqlite_cascades_deletes(any_session_factory: Sessions) -> None:
    """SQLite refuses a cascade over 1,000 levels deep; the repository deletes newest first."""
    async with any_session_factory() as session:
        _, first = await long_line(session, 2_400)
        second, _ = await long_line(session, 2_400)
        _, kept = await long_line(session, 10)
        await session.commit()

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.delete_messages([first[1]]) == 2_399
        assert await repo.delete(second) is True
        await session.commit()
        assert await repo.count_messages() == 1 + 10
        assert await repo.get_message(first[0]) is not None
        assert await repo.get_message(kept[-1]) is not None


# --- registered models ----------------------------------------------------------------


async def test_registered_models(any_session_factory: Sessions) -> None:
    spec = {"provider": "openai-compatible", "model": "tuned", "context_window": 8192}
    async with any_session_factory() as session:
        repo = ModelRepository(session)
        await repo.add("tuned", spec, created_by="alice")
        await repo.add("a-gguf", {"provider": "local", "path": "/m.gguf"}, created_by=None)
        await repo.add("tuned", {**spec, "context_window": 4096}, created_by="bob")  # replaces
        await session.commit()

    async with any_session_factory() as session:
        repo = ModelRepository(session)
        models = await repo.list()
        assert [m.name for m in models] == ["a-gguf", "tuned"]
        assert models[1].spec["context_window"] == 4096
        assert models[1].created_by == "bob"
        assert models[1].created_at.tzinfo is not None
        assert await repo.remove("tuned") is True
        assert await repo.remove("tuned") is False
        await session.commit()
        assert [m.name for m in await repo.list()] == ["a-gguf"]
        with pytest.raises(ValueError, match="api_key_env"):
            await repo.add("leaky", {"provider": "openai", "api_key": "sk-x"}, created_by=None)
