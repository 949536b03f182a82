"""The export honours privacy: people forgotten, people who opted out, places that log
nothing (the real service and privacy part; SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import UserError
from core.messages import ChatRequest, Place
from store.export import FORMATS, ExportOptions
from tests.fixtures.export import ALICE, BOB, CAROL, GUILD, OTHER_CHANNEL, PLACE, Log
from tests.scan import find_text


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


async def export_all(log: Log, out: Path, run: str = "first") -> dict[str, str]:
    """Every format, everything that may be exported, unredacted, into files of their own
    (named after `run`): what each file holds ("" when there was nothing to export)."""
    written: dict[str, str] = {}
    for fmt in FORMATS:
        target = out.with_name(f"{run}-{fmt}.jsonl")
        try:
            await log.app.exporter.run(
                ExportOptions(fmt, include_unrated=True, redact=False), target
            )
        except UserError as nothing:
            assert nothing.message.startswith("Nothing to export"), nothing.message
            assert not target.exists()
            written[fmt] = ""
        else:
            written[fmt] = read(target)
    return written


async def test_after_forget_no_table_and_no_export_holds_their_text(log: Log, out: Path) -> None:
    # Alice's conversation, which Bob continues; Bob's own; votes, a correction, a retry.
    alice = await log.converse(["alice asks about apricots"])
    follow = await log.app.service.answer(
        ChatRequest(PLACE, BOB, "bob follows up", conversation_id=alice[0].conversation_id)
    )
    await log.converse(["bob asks about bananas"], author=BOB)
    await log.app.writer.drain()
    await log.vote(alice[0], BOB, 1)
    await log.vote("bob asks about bananas", ALICE, -1, reason="wrong")
    await log.vote("bob asks about bananas", CAROL, 1)
    await log.correct("bob asks about bananas", ALICE, "alice corrects with avocados")
    await log.retry("bob asks about bananas", BOB)
    await log.vote(follow, CAROL, 1)
    before = await export_all(log, out)
    assert any("apricots" in written for written in before.values())
    assert any("avocados" in written for written in before.values())

    report = await log.app.service.forget(ALICE)
    assert report.messages == 1 and report.corrections == 1 and report.votes == 1

    after = await export_all(log, out, "after")
    for fmt, written in after.items():
        for word in ("apricots", "avocados", "alice"):
            assert word not in written, (fmt, word)
    for word in ("apricots", "avocados", "alice asks", "alice corrects"):
        assert await find_text(log.app.sessions, word) == [], word
    # Bob's own exchange, answered and voted on by others, is exported still.
    assert "bananas" in after["sft"] and "bananas" in after["kto"]
    # Bob's follow-up was built on Alice's words: it went with them.
    assert "bob follows up" not in after["sft"]


async def test_the_export_of_an_opted_out_persons_exchanges_is_empty(log: Log, out: Path) -> None:
    await log.converse(["stored before opting out"], place=Place(GUILD, OTHER_CHANNEL))
    await log.converse(["bob is exported"], author=BOB)
    await log.app.service.opt_out(ALICE)
    unstored = await log.app.service.answer(
        ChatRequest(Place(GUILD, OTHER_CHANNEL), ALICE, "said while opted out")
    )
    assert unstored.reply == "Echo: said while opted out" and not unstored.stored
    await log.app.writer.drain()
    assert await find_text(log.app.sessions, "said while opted out") == []

    where = ExportOptions("sft", include_unrated=True, channel_id=OTHER_CHANNEL)
    with pytest.raises(UserError) as nothing:
        await log.app.exporter.run(where, out)
    assert "1 by or for people who opted out" in nothing.value.message
    everything = await export_all(log, out)
    assert all("opting out" not in written for written in everything.values())
    assert "bob is exported" in everything["sft"]

    # Opting in again consents again: what is stored of hers may be exported; what she
    # said while opted out was never stored.
    await log.app.service.opt_in(ALICE)
    await log.converse(["stored after opting in"], place=Place(GUILD, OTHER_CHANNEL))
    summary = await log.app.exporter.run(where, out)
    written = read(out)
    assert summary.examples == 2 and "stored after opting in" in written
    assert "stored before opting out" in written and "while opted out" not in written


async def test_a_place_that_logs_nothing_is_not_exported(log: Log, out: Path) -> None:
    quiet, thread = Place(GUILD, OTHER_CHANNEL), Place(GUILD, OTHER_CHANNEL, 555)
    await log.converse(["said before logging was off"], place=quiet)
    await log.converse(["said in its thread"], place=thread)
    await log.converse(["said in the main channel"])
    mod = BOB
    await log.app.service.set_logging(quiet, "channel", False, mod)
    await log.app.service.set_logging(thread, "thread", True, mod)  # the thread keeps logging
    unstored = await log.app.service.answer(ChatRequest(quiet, ALICE, "said while it was off"))
    assert not unstored.stored
    await log.app.writer.drain()

    summary = await log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)
    written = read(out)
    assert "said in the main channel" in written and "said in its thread" in written
    assert "logging was off" not in written and "while it was off" not in written
    assert summary.removed["logging_off"] == 1 and summary.examples == 2

    await log.app.service.set_logging(quiet, "channel", None, mod)  # inherit: on again
    again = await log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)
    assert again.examples == 3 and again.removed["logging_off"] == 0
