"""Privacy through the real chat service (real SQLite, real migrations, fake model server):
opting out, places that log nothing, forgetting, deleted messages, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from bot.app import App, open_app
from bot.present import forget_line, privacy_line, purge_line
from core.errors import NotFound, UserError
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from store.models import AnonymousCount, Conversation, Message, Person
from store.repositories import AnonymousCountRepository
from tests.fakes.openai_server import FakeOpenAI
from tests.scan import find_text

GUILD, CHANNEL, QUIET, THREAD = 10, 20, 21, 30
ALICE, BOB, MOD = Author(1, "alice"), Author(2, "bob"), Author(3, "mod")
HERE = Place(GUILD, CHANNEL, THREAD)  # a thread: one running conversation


def said(
    text: str, author: Author = ALICE, place: Place = HERE, discord_id: int | None = None
) -> ChatRequest:
    return ChatRequest(place, author, text, discord_message_id=discord_id)


async def stored_texts(app: App) -> list[str]:
    await app.writer.drain()
    async with app.sessions() as session:
        rows = await session.scalars(select(Message.content).order_by(Message.created_at))
        return list(rows.all())


def history_sent(fake: FakeOpenAI) -> list[str]:
    """What the model was last sent, besides the system prompt."""
    return [m["content"] for m in fake.chat_requests[-1].messages if m["role"] != "system"]


# --- opting out -----------------------------------------------------------------------------


async def test_an_opted_out_person_is_answered_but_nothing_is_stored(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    service = chat_app.service
    status = await service.opt_out(ALICE)
    assert status.opted_out and "opted out" in privacy_line(status)

    first = await service.answer(said("my secret plan"))
    second = await service.answer(said("and what next?"))
    assert first.reply == "Echo: my secret plan" and not first.stored and not second.stored
    # The conversation goes on from memory.
    assert history_sent(fake_openai) == ["my secret plan", "Echo: my secret plan", "and what next?"]

    assert await stored_texts(chat_app) == []
    async with chat_app.sessions() as session:
        [count] = await AnonymousCountRepository(session).totals()
        assert await session.scalar(select(func.count()).select_from(Conversation)) == 0
    assert (count.guild_id, count.model_name, count.exchanges) == (GUILD, "main", 2)
    assert count.prompt_tokens > 0 and count.completion_tokens > 0 and count.cost_usd > 0

    # Votes and retries have nothing stored to act on.
    with pytest.raises(NotFound):
        await service.vote(first.message_id or "", BOB, 1, source="button")

    status = await service.opt_in(ALICE)
    assert not status.opted_out and status.messages == 0
    # Here, what she said while opted out is still in the history: still not stored.
    assert not (await service.answer(said("in the same thread"))).stored
    third = await service.answer(said("now store this", place=Place(GUILD, CHANNEL, THREAD + 1)))
    assert third.stored
    assert await stored_texts(chat_app) == ["now store this", "Echo: now store this"]
    assert (await service.privacy_status(ALICE)).messages == 1


async def test_others_answers_built_on_an_opted_out_persons_words_are_not_stored(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    service = chat_app.service
    await service.answer(said("bob starts", BOB))
    await service.opt_out(ALICE)
    await service.answer(said("alice private words"))
    reply = await service.answer(said("bob replies", BOB))
    assert "alice private words" in history_sent(fake_openai)
    assert not reply.stored  # its request holds Alice's words
    assert await find_text(chat_app.sessions, "alice private") == []
    assert await stored_texts(chat_app) == ["bob starts", "Echo: bob starts"]


async def test_an_opt_out_made_elsewhere_applies_within_the_ttl(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    service = chat_app.service
    now = [0.0]
    service.privacy.clock = lambda: now[0]
    assert (await service.answer(said("stored"))).stored
    async with chat_app.sessions() as session, session.begin():  # another process records it
        session.add(Person(user_id=ALICE.id, opted_out=True, changed_at=datetime.now(UTC)))
    assert (await service.answer(said("still cached"))).stored
    now[0] += service.privacy.ttl + 1
    assert not (await service.answer(said("now read again"))).stored


async def test_a_burst_of_new_people_reads_their_choices_in_one_query(chat_app: App) -> None:
    import asyncio

    statements: list[str] = []
    from sqlalchemy import event

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "FROM people" in statement:
            statements.append(statement)

    event.listen(chat_app.engine.sync_engine, "before_cursor_execute", record)
    try:
        results = await asyncio.gather(
            *(
                chat_app.service.answer(
                    said(f"q{i}", Author(100 + i, f"p{i}"), Place(GUILD, 40 + i))
                )
                for i in range(20)
            )
        )
    finally:
        event.remove(chat_app.engine.sync_engine, "before_cursor_execute", record)
    assert all(r.stored for r in results)
    assert len(statements) == 1


# --- places that log nothing ------------------------------------------------------------------


async def test_a_channel_that_logs_nothing(chat_app: App, fake_openai: FakeOpenAI) -> None:
    service = chat_app.service
    quiet = Place(GUILD, QUIET)
    change = await service.set_logging(quiet, "channel", False, MOD)
    assert "off" in change_line_of(change)
    settings = await service.effective_settings(Place(GUILD, QUIET, THREAD))
    assert (settings.logging.value, settings.logging.source) == (False, "channel")  # its threads

    result = await service.answer(said("nobody keeps this", place=quiet))
    assert result.reply == "Echo: nobody keeps this" and not result.stored
    assert await service.answer(said("elsewhere", place=Place(GUILD, CHANNEL)))
    assert await stored_texts(chat_app) == ["elsewhere", "Echo: elsewhere"]

    await service.set_logging(quiet, "channel", None, MOD)  # inherit: on again
    assert (await service.answer(said("kept now", place=quiet))).stored
    async with chat_app.sessions() as session:
        assert await session.scalar(select(func.sum(AnonymousCount.exchanges))) == 1


def change_line_of(change: object) -> str:
    from bot.present import change_line

    return change_line(change)  # type: ignore[arg-type]


async def test_retention_is_a_server_setting(chat_app: App) -> None:
    service = chat_app.service
    with pytest.raises(UserError, match="server"):
        await service.set_retention(Place(None, 5), 30, ALICE)
    with pytest.raises(UserError, match="0 to keep"):
        await service.set_retention(HERE, -1, MOD)
    change = await service.set_retention(HERE, 30, MOD)
    assert change_line_of(change) == "Retention for this server: **30 days** (server default)."
    settings = await service.effective_settings(Place(GUILD, 99))
    assert (settings.retention.value, settings.retention.source) == (30, "guild")
    change = await service.set_retention(HERE, None, MOD)
    assert "kept forever** (bot default)" in change_line_of(change)


# --- forgetting ------------------------------------------------------------------------------


async def test_forgetting_a_person_through_the_service(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    service = chat_app.service
    await service.answer(said("alice first words"))
    bobs = await service.answer(said("bob joins in", BOB))
    await service.answer(said("alice again"))
    other = await service.answer(said("bob elsewhere", BOB, Place(GUILD, 77)))
    await service.vote(bobs.message_id or "", ALICE, 1, source="button")
    await service.set_model(Place(GUILD, 77), "channel", "solo", ALICE)
    await chat_app.writer.drain()

    report = await service.forget(ALICE)
    assert (report.messages, report.votes, report.setting_changes) == (2, 1, 1)
    assert report.answers == 3  # hers, and Bob's answer that had her words in it
    assert forget_line(report).startswith("Deleted 2 messages you wrote, 3 answers")
    for needle in ("alice first", "alice again", "alice"):
        assert await find_text(chat_app.sessions, needle) == [], needle
    texts = await stored_texts(chat_app)
    assert "bob joins in" in texts and "bob elsewhere" in texts and other.stored

    # The thread goes on without her turns: memory forgot them too.
    await service.answer(said("bob continues", BOB))
    assert not any("alice" in text for text in history_sent(fake_openai))
    status = await service.privacy_status(ALICE)
    assert (status.messages, status.votes) == (0, 0)
    again = await service.forget(ALICE)
    assert again.nothing and forget_line(again).startswith("Nothing was stored")


async def test_an_answer_being_written_while_its_author_is_forgotten_is_not_stored(
    chat_app: App,
) -> None:
    service = chat_app.service
    events = service.stream(said("written during the forget"))
    async for _event in events:
        report = await service.forget(ALICE)  # while the model is still writing
        assert report.nothing
        break
    async for _ in events:
        pass
    assert await stored_texts(chat_app) == []


async def test_forget_refuses_while_the_log_cannot_be_written(chat_app: App) -> None:
    chat_app.writer.problem = "disk full"
    with pytest.raises(UserError, match="Nothing was deleted"):
        await chat_app.service.forget(ALICE)


# --- a deleted Discord message ------------------------------------------------------------------


async def test_a_deleted_message_takes_its_answer_with_it(chat_app: App) -> None:
    service = chat_app.service
    await service.answer(said("keep me", discord_id=601))
    await service.answer(said("delete me", discord_id=602))
    await service.message_deleted(602)
    await service.message_deleted(999)  # not one we know: nothing happens
    assert await stored_texts(chat_app) == ["keep me", "Echo: keep me"]
    # The next message continues from what is left.
    after = await service.answer(said("next one", discord_id=603))
    assert after.stored
    assert await stored_texts(chat_app) == [
        "keep me",
        "Echo: keep me",
        "next one",
        "Echo: next one",
    ]


async def test_a_message_deleted_while_it_is_answered_is_not_stored(chat_app: App) -> None:
    service = chat_app.service
    events = service.stream(said("gone before the answer ends", discord_id=700))
    async for _ in events:
        await service.message_deleted(700)
        break
    async for _ in events:
        pass
    assert await stored_texts(chat_app) == []


# --- retention --------------------------------------------------------------------------------


async def age(app: App, text_: str, days: int) -> None:
    """Make the messages of the exchange whose prompt is `text_` `days` old."""
    await app.writer.drain()
    when = datetime.now(UTC) - timedelta(days=days)
    async with app.sessions() as session, session.begin():
        prompt = await session.scalar(select(Message).where(Message.content == text_))
        assert prompt is not None
        await session.execute(
            update(Message)
            .where((Message.id == prompt.id) | (Message.parent_id == prompt.id))
            .values(created_at=when)
        )


async def test_purge_applies_the_retention(service_settings: Settings) -> None:
    settings = service_settings.model_copy(update={"retention_days": 30})
    async with open_app(settings, knowledge=False) as app:
        service = app.service
        await service.answer(said("very old", place=Place(GUILD, 1, 1)))
        await service.answer(said("recent", place=Place(GUILD, 1, 1)))
        await service.answer(said("old elsewhere", place=Place(GUILD + 1, 2, 2)))
        await service.answer(said("old in a dm", place=Place(None, 3)))
        await age(app, "very old", 40)
        await age(app, "old elsewhere", 40)
        await age(app, "old in a dm", 40)
        await service.set_retention(Place(GUILD + 1, 2), 0, MOD)  # that server keeps forever

        dry = await service.purge(dry_run=True)
        assert (dry.prompts, dry.answers, dry.conversations) == (2, 2, 1)
        assert purge_line(dry) == (
            "Would delete 2 prompts with 2 answers, 1 conversation left empty; nothing was "
            f"changed (retention 30 days (server {GUILD + 1}: forever))."
        )
        assert len(await stored_texts(app)) == 8

        done = await service.purge()
        assert (done.prompts, done.answers, done.conversations) == (2, 2, 1)
        assert sorted(await stored_texts(app)) == sorted(
            ["recent", "Echo: recent", "old elsewhere", "Echo: old elsewhere"]
        )
        again = await service.purge()
        assert again.messages == 0
        # The thread goes on from what is left.
        assert (await service.answer(said("go on", place=Place(GUILD, 1, 1)))).stored


async def test_without_a_retention_purge_deletes_nothing(chat_app: App) -> None:
    await chat_app.service.answer(said("kept"))
    await age(chat_app, "kept", 4000)
    report = await chat_app.service.purge()
    assert report.messages == 0 and "everything is kept" in purge_line(report)


async def test_while_opt_outs_cannot_be_read_unknown_people_are_not_stored(
    chat_app: App,
) -> None:
    service = chat_app.service
    service.privacy.ttl = 0  # every message reads again
    await service.opt_out(BOB)
    assert (await service.answer(said("alice is known", place=Place(GUILD, 1)))).stored
    async with chat_app.engine.begin() as connection:  # the table cannot be read any more
        await connection.exec_driver_sql("ALTER TABLE people RENAME TO people_away")
    carol = Author(9, "carol")
    assert not (await service.answer(said("carol is unknown", carol, Place(GUILD, 2)))).stored
    assert not (await service.answer(said("bob opted out", BOB, Place(GUILD, 3)))).stored
    assert (await service.answer(said("alice still known", place=Place(GUILD, 1)))).stored
    texts = await stored_texts(chat_app)
    assert "carol is unknown" not in texts and "alice still known" in texts
