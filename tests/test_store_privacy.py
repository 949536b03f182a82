"""The privacy SQL on real migrated databases (SQLite always, PostgreSQL when configured):
opt-outs, anonymous counts, forgetting a person, deleted Discord messages, retention."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.models import (
    Battle,
    BattleVote,
    ChannelSetting,
    Conversation,
    Message,
    MessageInput,
    Person,
    Preference,
    SettingChange,
    Vote,
    new_id,
)
from store.repositories import (
    FORGOTTEN_NAME,
    AnonymousCountRepository,
    AnonymousCountRow,
    ConversationRepository,
    PeopleRepository,
    PrivacyRepository,
    SettingsRepository,
)
from tests.scan import find_text, text_columns

Sessions = async_sessionmaker[AsyncSession]
GUILD, OTHER_GUILD, CHANNEL, THREAD = 1000, 1001, 2000, 3000
ALICE, BOB = 11, 22
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Log:
    """Writes exchanges the way the exchange log does: prompt, answer, input links."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.repo = ConversationRepository(session)
        self.texts: dict[str, str] = {}  # text -> the id of the message that holds it

    async def conversation(self, guild_id: int | None = GUILD, by: int = ALICE) -> str:
        conversation = await self.repo.create(
            guild_id=guild_id, channel_id=CHANNEL, thread_id=THREAD, started_by=by
        )
        return conversation.id

    async def exchange(
        self,
        conversation_id: str,
        author: int,
        text: str,
        *,
        after: str | None = None,
        history: tuple[str, ...] = (),
        at: datetime | None = None,
        discord_id: int | None = None,
        guild_id: int | None = GUILD,
    ) -> tuple[str, str]:
        """One prompt and its answer, the answer built from `history` and the prompt."""
        at = at or NOW
        prompt, answer = new_id(), new_id()
        sent = " | ".join([*history, text])  # what the model was sent, as the request holds it
        await self.repo.add_messages(
            [
                {
                    "id": prompt,
                    "conversation_id": conversation_id,
                    "parent_id": after,
                    "role": "user",
                    "content": text,
                    "author_id": author,
                    "author_name": f"user{author}",
                    "guild_id": guild_id,
                    "discord_message_id": discord_id,
                    "created_at": at,
                },
                {
                    "id": answer,
                    "conversation_id": conversation_id,
                    "parent_id": prompt,
                    "role": "assistant",
                    "content": f"Echo: {text}",
                    "request_messages": [{"role": "user", "content": sent}],
                    "guild_id": guild_id,
                    "created_at": at + timedelta(microseconds=1),
                },
            ]
        )
        inputs = [self.texts[earlier] for earlier in history] + [prompt]
        self.session.add_all(
            MessageInput(answer_id=answer, position=n, input_id=input_id)
            for n, input_id in enumerate(inputs)
        )
        self.texts.update({text: prompt, f"Echo: {text}": answer})
        await self.session.flush()
        return prompt, answer


async def count(session: AsyncSession, model: type) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


# --- opt-outs and anonymous counts ------------------------------------------------------


async def test_opting_out_and_back_in(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session, session.begin():
        people = PeopleRepository(session)
        assert await people.opted_out([ALICE, BOB]) == set()
        await people.set_opted_out(ALICE, True)
        await people.set_opted_out(BOB, True)
        await people.set_opted_out(BOB, False)  # an upsert: no second row
    async with any_session_factory() as session:
        people = PeopleRepository(session)
        assert await people.opted_out([ALICE, BOB, 99]) == {ALICE}
        person = await people.get(BOB)
        assert person is not None and person.opted_out is False
        assert await count(session, Person) == 2


async def test_anonymous_counts_add_up_per_day_server_and_model(
    any_session_factory: Sessions,
) -> None:
    day = date(2026, 12, 1)
    row = AnonymousCountRow(day, GUILD, "main", 1, 10, 5, 0.25)
    async with any_session_factory() as session, session.begin():
        repo = AnonymousCountRepository(session)
        await repo.add([row, row])
        await repo.add([AnonymousCountRow(day, 0, "main", 2, 1, 1, 0.0)])
        await repo.add([AnonymousCountRow(day + timedelta(days=1), GUILD, "main", 1, 0, 0, 0.0)])
    async with any_session_factory() as session:
        totals = await AnonymousCountRepository(session).totals(GUILD)
        assert totals == [
            AnonymousCountRow(day, GUILD, "main", 2, 20, 10, 0.5),
            AnonymousCountRow(day + timedelta(days=1), GUILD, "main", 1, 0, 0, 0.0),
        ]
        assert len(await AnonymousCountRepository(session).totals()) == 3


# --- forgetting a person ----------------------------------------------------------------


async def test_forgetting_a_person_leaves_nothing_of_their_words(
    any_session_factory: Sessions,
) -> None:
    """Alice talks alone and in a thread with Bob; Bob also talks alone. After Alice is
    forgotten, no text column anywhere holds her words; Bob keeps all he wrote, and loses
    only the answers that were built on her words."""
    async with any_session_factory() as session, session.begin():
        log = Log(session)
        alone = await log.conversation()
        a1, r1 = await log.exchange(alone, ALICE, "alice secret one")
        await log.exchange(alone, ALICE, "alice secret two", after=r1,
                           history=("alice secret one", "Echo: alice secret one"))  # fmt: skip

        shared = await log.conversation()
        s1, t1 = await log.exchange(shared, ALICE, "alice shared words")
        b1, u1 = await log.exchange(shared, BOB, "bob in the thread", after=t1,
                                    history=("alice shared words", "Echo: alice shared words"))  # fmt: skip
        # Bob's next turn no longer had Alice's words in its window.
        b2, u2 = await log.exchange(shared, BOB, "bob again", after=u1,
                                    history=("bob in the thread", "Echo: bob in the thread"))  # fmt: skip

        bobs = await log.conversation(by=BOB)
        b3, u3 = await log.exchange(bobs, BOB, "bob alone")

        # Alice voted on Bob's answer and corrected it; Bob voted on Alice's answer.
        session.add_all(
            [
                Vote(answer_id=u3, voter_id=ALICE, voter_name="alice", value=1,
                     comment="alice comment", source="button", created_at=NOW, updated_at=NOW),
                Vote(answer_id=r1, voter_id=BOB, voter_name="bob", value=-1, source="button",
                     created_at=NOW, updated_at=NOW),
                # And preferred Bob's answer in a side-by-side comparison.
                Preference(prompt_id=b3, chosen_id=u3, voter_id=ALICE, created_at=NOW),
                # A blind battle on her prompt, which Bob judged; one on Bob's, which she did.
                Battle(id="hers", prompt_id=a1, answer_a=r1, answer_b=r1, model_a="m",
                       model_b="n", guild_id=GUILD, asked_by=ALICE, created_at=NOW),
                Battle(id="bobs", prompt_id=b3, answer_a=u3, answer_b=u3, model_a="m",
                       model_b="n", guild_id=GUILD, asked_by=BOB, created_at=NOW),
            ]
        )  # fmt: skip
        await session.flush()
        session.add_all(
            [
                BattleVote(battle_id="hers", voter_id=BOB, outcome="a",
                           reason="bob judges alice", created_at=NOW),
                BattleVote(battle_id="bobs", voter_id=ALICE, outcome="b",
                           reason="alice battle reason", created_at=NOW),
            ]
        )  # fmt: skip
        await ConversationRepository(session).add_messages(
            [{"conversation_id": bobs, "parent_id": b3, "role": "assistant", "kind": "correction",
              "content": "alice correction text", "author_id": ALICE, "author_name": "alice",
              "alternative_to": u3}]
        )  # fmt: skip
        settings = SettingsRepository(session)
        await settings.set_field(scope="channel", scope_id=CHANNEL, guild_id=GUILD,
                                 field="model", value="solo", actor_id=ALICE, actor_name="alice")  # fmt: skip
        await settings.set_field(scope="channel", scope_id=CHANNEL, guild_id=GUILD,
                                 field="system_prompt", value="Be brief.", actor_id=BOB,
                                 actor_name="bob")  # fmt: skip
        await PeopleRepository(session).set_opted_out(ALICE, False)

    async with any_session_factory() as session, session.begin():
        done = await PrivacyRepository(session).forget_person(ALICE)

    removed = done.removed
    assert removed.kinds == {"prompt": 3, "answer": 4, "correction": 1}  # u1 used her words
    assert removed.detached == 2  # Bob's two prompts in the thread now start lines
    assert removed.conversations == 1  # her conversation alone
    # Her vote, her preference and her battle verdict.
    assert done.votes == 3 and done.setting_changes == 1

    columns = await text_columns(any_session_factory)
    assert "reason" in columns["battle_votes"] and "invalid" in columns["battles"]
    for needle in ("alice secret", "alice shared", "alice comment", "alice correction", "user11",
                   "alice battle", "judges alice"):  # fmt: skip
        assert await find_text(any_session_factory, needle) == [], needle
    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        assert await repo.get(alone) is None
        kept = {m.id: m for m in await repo.messages(shared)}
        assert set(kept) == {b1, b2, u2}  # Bob's words stay; the answer built on Alice's went
        assert kept[b1].parent_id is None and kept[b2].parent_id is None
        assert await repo.inputs_of(u2) == [b1, b2]  # the link to the answer that went is gone
        assert {m.id for m in await repo.messages(bobs)} == {b3, u3}
        assert (await repo.get(shared)).started_by is None  # type: ignore[union-attr]
        votes = (await session.scalars(select(Vote))).all()
        assert votes == []  # hers, and Bob's on her answer (which went)
        assert await count(session, Preference) == 0
        # Her battle went with her prompt (and Bob's verdict on it); Bob's stays, without hers.
        assert [b.id for b in (await session.scalars(select(Battle))).all()] == ["bobs"]
        assert await count(session, BattleVote) == 0
        changes = (await session.scalars(select(SettingChange))).all()
        assert sorted((c.actor_id, c.actor_name) for c in changes) == [
            (0, FORGOTTEN_NAME),
            (BOB, "bob"),
        ]
        row = await session.scalar(select(ChannelSetting))
        assert row is not None and row.updated_by == BOB
        assert await count(session, Person) == 0  # she had not opted out: nothing left


async def test_forgetting_keeps_the_opt_out(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session, session.begin():
        await PeopleRepository(session).set_opted_out(ALICE, True)
    async with any_session_factory() as session, session.begin():
        done = await PrivacyRepository(session).forget_person(ALICE)
        assert done.removed.messages == 0
    async with any_session_factory() as session:
        assert await PeopleRepository(session).opted_out([ALICE]) == {ALICE}


# --- a deleted Discord message ----------------------------------------------------------


async def test_a_deleted_discord_message_takes_its_answers_and_the_answers_built_on_it(
    any_session_factory: Sessions,
) -> None:
    async with any_session_factory() as session, session.begin():
        log = Log(session)
        thread = await log.conversation()
        p1, r1 = await log.exchange(thread, ALICE, "first message", discord_id=501)
        p2, r2 = await log.exchange(thread, ALICE, "second message", after=r1, discord_id=502,
                                    history=("first message", "Echo: first message"))  # fmt: skip
        p3, r3 = await log.exchange(thread, BOB, "third message", after=r2, discord_id=503,
                                    history=("second message", "Echo: second message"))  # fmt: skip

    async with any_session_factory() as session, session.begin():
        repo = PrivacyRepository(session)
        assert (await repo.delete_discord_message(999)).messages == 0  # not ours
        removal = await repo.delete_discord_message(501)
    assert removal.message_ids == {p1, r1, r2}  # r2 was built on it
    assert removal.detached == 2
    async with any_session_factory() as session:
        kept = {m.id: m for m in await ConversationRepository(session).messages(thread)}
        assert set(kept) == {p2, p3, r3}
        assert kept[p2].parent_id is None  # her later message stays, starting the line
        assert kept[p3].parent_id is None  # its parent (r2) went
    assert await find_text(any_session_factory, "first message") == []


# --- retention ----------------------------------------------------------------------------


async def test_expired_prompts_follow_each_servers_retention(any_session_factory: Sessions) -> None:
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=5)
    async with any_session_factory() as session, session.begin():
        log = Log(session)
        here = await log.conversation()
        o1, a1 = await log.exchange(here, ALICE, "old here", at=old)
        n1, _ = await log.exchange(here, BOB, "new here", after=a1, at=recent)
        there = await log.conversation(OTHER_GUILD)
        o2, _ = await log.exchange(there, ALICE, "old there", at=old, guild_id=OTHER_GUILD)
        dm = await log.conversation(None)
        o3, _ = await log.exchange(dm, ALICE, "old dm", at=old, guild_id=None)
        await SettingsRepository(session).set_field(
            scope="guild", scope_id=OTHER_GUILD, guild_id=OTHER_GUILD, field="retention_days",
            value=0, actor_id=ALICE, actor_name="alice")  # fmt: skip

    cutoff = NOW - timedelta(days=30)
    async with any_session_factory() as session:
        repo = PrivacyRepository(session)
        overrides = await repo.retention_overrides()
        assert overrides == {OTHER_GUILD: 0}  # kept forever there
        expired = await repo.expired_prompts({OTHER_GUILD: None}, cutoff)
        assert {prompt for _, prompt in expired} == {o1, o3}
        assert await repo.expired_prompts({OTHER_GUILD: None}, None) == []  # retention off
        only_there = await repo.expired_prompts({OTHER_GUILD: cutoff}, None)
        assert [prompt for _, prompt in only_there] == [o2]
        # Paged: one at a time, each after the last.
        first = await repo.expired_prompts({OTHER_GUILD: None}, cutoff, limit=1)
        rest = await repo.expired_prompts({OTHER_GUILD: None}, cutoff, after=first[-1])
        assert [p for _, p in first + rest] == [p for _, p in expired]

        dry = await repo.expire([p for _, p in expired], dry_run=True)
        assert dry.kinds == {"prompt": 2, "answer": 2} and dry.detached == 1
        assert await repo.would_empty(dry.touched) == {dm}
        assert await count(session, Message) == 8  # a dry run changes nothing

    async with any_session_factory() as session, session.begin():
        done = await PrivacyRepository(session).expire([p for _, p in expired])
    assert done.conversations == 1
    async with any_session_factory() as session:
        left = {m.id for m in (await session.scalars(select(Message))).all()}
        assert n1 in left and o2 in left and o1 not in left and o3 not in left
        assert await count(session, Conversation) == 2
        assert await session.get(Message, n1) is not None
        assert (await session.get(Message, n1)).parent_id is None  # type: ignore[union-attr]


async def test_forgetting_a_long_line_on_sqlite_depth(any_session_factory: Sessions) -> None:
    """A line far deeper than SQLite's cascade limit goes whole (newest first)."""
    async with any_session_factory() as session, session.begin():
        log = Log(session)
        conversation = await log.conversation()
        after = None
        for n in range(600):  # 1,200 messages in one line, each later than the one before
            at = NOW + timedelta(milliseconds=n)
            _, after = await log.exchange(conversation, ALICE, f"line {n}", after=after, at=at)
    async with any_session_factory() as session, session.begin():
        done = await PrivacyRepository(session).forget_person(ALICE)
    assert done.removed.messages == 1200 and done.removed.conversations == 1
    async with any_session_factory() as session:
        assert await count(session, Message) == 0 and await count(session, MessageInput) == 0
