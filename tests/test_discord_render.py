"""The pure rendering rules: splitting, fence repair, footers and the edit throttle."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord.render import (
    BLANK,
    MESSAGE_LIMIT,
    WRITING_MARKER,
    StreamingReply,
    footer_lines,
    layout,
    split_text,
)
from core.messages import FallbackUsed, Source

# Text made of the characters that matter to the splitter: fences, breaks, words.
pieces = st.sampled_from(
    ["```", "```python\n", "`", "\n", " ", "\n\n", "word", "x" * 300, "é", "🙂", "\t"]
)
texts = st.lists(pieces, max_size=120).map("".join) | st.text(max_size=5000)


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(min_value=64, max_value=MESSAGE_LIMIT))
def test_split_keeps_limit_text_and_balanced_fences(text: str, limit: int) -> None:
    chunks = split_text(text, limit)
    assert "".join(chunk.body for chunk in chunks) == text
    for chunk in chunks:
        assert len(chunk.content) <= limit
        assert chunk.content.count("```") % 2 == 0
        assert chunk.body  # no empty parts


def test_short_text_is_one_part() -> None:
    assert [c.content for c in split_text("hello")] == ["hello"]
    assert split_text("") == []


def test_split_prefers_line_breaks_and_never_breaks_words() -> None:
    words = " ".join(f"word{i}" for i in range(1000))  # about 6,900 characters, no newlines
    chunks = split_text(words)
    assert len(chunks) == 4
    for chunk in chunks[:-1]:
        assert chunk.body.endswith(" ")  # cut after a space, not inside a word
    lines = "\n".join("line " + "y" * 70 for _ in range(60))
    assert all(chunk.body.endswith("\n") for chunk in split_text(lines)[:-1])


def test_split_closes_and_reopens_code_block_with_its_language() -> None:
    code = (
        "Here is code:\n```python\n" + "".join(f"print({i})\n" for i in range(400)) + "```\nDone."
    )
    chunks = split_text(code)
    assert len(chunks) >= 2
    assert chunks[0].content.endswith("```")
    assert chunks[1].content.startswith("```python\n")
    assert chunks[-1].content.endswith("Done.")
    assert all(c.content.count("```") % 2 == 0 for c in chunks)


def test_a_single_huge_word_is_cut_hard() -> None:
    chunks = split_text("a" * 4500)
    assert [len(c.content) for c in chunks] == [1996, 1996, 508]


def test_layout_marks_writing_and_adds_footer_at_the_end() -> None:
    assert layout("Hi", writing=True) == ["Hi" + WRITING_MARKER]
    assert layout("Hi", footer="-# answered by b") == ["Hi\n-# answered by b"]
    assert layout("") == [BLANK]
    long = "z" * 1994  # one part, but no room left for the footer
    parts = layout(long, footer="-# note")
    assert parts[-1] == "-# note" and len(parts) == 2


@settings(max_examples=100, deadline=None)
@given(texts, st.integers(min_value=0, max_value=5000))
def test_streaming_layout_is_prefix_stable(text: str, cut: int) -> None:
    """Earlier parts never change cut as the text grows, so streaming only appends parts."""
    early = layout(text[:cut], writing=True) if text[:cut] else []
    late = layout(text, writing=True)
    assert len(early) <= len(late)
    for before, after in zip(early[:-1], late, strict=False):
        assert before == after


def test_footer_names_the_standin_and_lists_sources() -> None:
    footer = footer_lines(
        model="smollm2",
        fallbacks=[FallbackUsed("gpt-4o-mini", "smollm2", "Rate limited.")],
        sources=[Source("c1", "handbook.pdf", "page 3", 0.9), Source("c2", "faq.md", None, 0.5)],
    )
    assert footer.splitlines() == [
        "-# answered by smollm2 (gpt-4o-mini was unavailable: Rate limited)",
        "-# Sources:",
        "-# 1. handbook.pdf, page 3",
        "-# 2. faq.md",
    ]
    assert footer_lines(model=None, error="No model could answer.") == "⚠️ No model could answer."


@dataclass
class FakeClock:
    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class ListSink:
    """Records every send and edit with the clock's time."""

    clock: FakeClock
    contents: dict[int, str] = field(default_factory=dict)
    writes: list[tuple[int, float, str]] = field(default_factory=list)
    lasts: list[int] = field(default_factory=list)  # the parts written as the finished last part

    async def send(self, content: str, after: int | None, *, last: bool = False) -> int:
        number = len(self.contents)
        assert after == (number - 1 if number else None)
        self.contents[number] = content
        self.writes.append((number, self.clock.now, content))
        if last:
            self.lasts.append(number)
        return number

    async def edit(self, message: int, content: str, *, last: bool = False) -> None:
        self.contents[message] = content
        self.writes.append((message, self.clock.now, content))
        if last:
            self.lasts.append(message)


async def test_streaming_reply_edits_at_most_once_per_second_per_message() -> None:
    clock = FakeClock()
    sink = ListSink(clock)
    reply = StreamingReply(sink, clock=clock, sleep=clock.sleep)
    text = ""
    for i in range(400):  # 400 tokens, 0.05 s apart: 20 seconds, about 2,800 characters
        text += f"tok{i:03d} "
        await reply.update(text)
        clock.now += 0.05
    messages = await reply.finish(text, footer="-# done")

    assert len(messages) == 2
    shown = [sink.contents[m] for m in messages]
    assert shown[-1].endswith("-# done")
    assert all(WRITING_MARKER not in content for content in shown)
    assert "".join(s.replace("\n-# done", "") for s in shown).split() == text.split()
    for message in messages:
        times = [t for m, t, _ in sink.writes if m == message]
        assert len(times) >= 3  # it really streamed
        assert all(b - a >= 1.0 for a, b in zip(times, times[1:], strict=False))


async def test_only_the_finished_last_part_is_written_as_last_and_with_no_extra_write() -> None:
    clock = FakeClock()
    sink = ListSink(clock)
    reply = StreamingReply(sink, clock=clock, sleep=clock.sleep)
    text = ""
    for i in range(400):
        text += f"tok{i:03d} "
        await reply.update(text)
        clock.now += 0.05
    streamed = len(sink.writes)
    messages = await reply.finish(text)
    assert len(messages) == 2 and sink.lasts == [messages[-1]]
    # The finish wrote only the last part (its marker went), and that write was marked last.
    assert [m for m, _, _ in sink.writes[streamed:]] == [messages[-1]]

    # A finish whose last part shows no new text still marks it, once.
    short = ListSink(clock)
    quiet = StreamingReply(short, clock=clock, sleep=clock.sleep)
    await quiet.finish("done")
    await quiet.finish("done")
    assert short.lasts == [0] and len(short.writes) == 1


async def test_finish_waits_out_the_throttle() -> None:
    clock = FakeClock()
    sink = ListSink(clock)
    reply = StreamingReply(sink, clock=clock, sleep=clock.sleep)
    await reply.update("Hel")
    clock.now += 0.25
    await reply.update("Hello")  # too soon: skipped
    await reply.finish("Hello")
    assert clock.sleeps == [0.75]
    assert [(m, t, c) for m, t, c in sink.writes] == [
        (0, 0.0, "Hel" + WRITING_MARKER),
        (0, 1.0, "Hello"),
    ]


@dataclass
class FlakySink(ListSink):
    """A ListSink whose writes raise `failure` while it is set (and are then not made).

    With `times`, only the next that many writes fail.
    """

    failure: Exception | None = None
    times: int | None = None
    attempts: list[float] = field(default_factory=list)

    def _attempt(self) -> None:
        self.attempts.append(self.clock.now)
        if self.failure is None or self.times == 0:
            return
        if self.times is not None:
            self.times -= 1
        raise self.failure

    async def send(self, content: str, after: int | None, *, last: bool = False) -> int:
        self._attempt()
        return await super().send(content, after, last=last)

    async def edit(self, message: int, content: str, *, last: bool = False) -> None:
        self._attempt()
        await super().edit(message, content, last=last)


class Outage(Exception):
    pass


async def test_a_passing_failure_skips_updates_for_an_interval_and_the_finish_shows_everything() -> (
    None
):
    clock = FakeClock()
    sink = FlakySink(clock)
    reply = StreamingReply(
        sink, clock=clock, sleep=clock.sleep, passing=lambda exc: isinstance(exc, Outage)
    )
    await reply.update("one")
    sink.failure = Outage()
    text = "one"
    for word in ["two", "three", "four", "five", "six", "seven", "eight", "nine"]:
        clock.now += 0.25
        text += " " + word
        await reply.update(text)  # fails, or is held back: never raises
    # Two seconds of failing edits, tried once per interval rather than once per word.
    assert sink.attempts == [0.0, 1.0, 2.0]
    sink.failure = None
    clock.now += 0.25  # 2.25: still held since the failure at 2.0
    await reply.finish(text, footer="-# done")
    assert clock.sleeps == [0.75]
    assert sink.contents == {0: "one two three four five six seven eight nine\n-# done"}


async def test_a_failure_that_is_not_passing_is_raised() -> None:
    clock = FakeClock()
    sink = FlakySink(clock)
    reply = StreamingReply(
        sink, clock=clock, sleep=clock.sleep, passing=lambda exc: isinstance(exc, Outage)
    )
    await reply.update("one")
    sink.failure = LookupError("message deleted")
    clock.now += 1
    with pytest.raises(LookupError):
        await reply.update("one two")
    failed_first = StreamingReply(
        FlakySink(clock, failure=Outage()), clock=clock, sleep=clock.sleep
    )
    with pytest.raises(Outage):  # without a `passing` rule every failure is final
        await failed_first.update("one")


async def test_the_finish_is_tried_again_after_a_passing_failure_then_given_up() -> None:
    clock = FakeClock()
    sink = FlakySink(clock)
    reply = StreamingReply(
        sink, clock=clock, sleep=clock.sleep, passing=lambda exc: isinstance(exc, Outage)
    )
    await reply.update("one")
    sink.failure, sink.times = Outage(), 2
    await reply.finish("one two")
    # Throttle (1 s), then one and two intervals after each failure.
    assert sink.attempts == [0.0, 1.0, 2.0, 4.0]
    assert sink.contents == {0: "one two"}

    sink.failure, sink.times = Outage(), None
    with pytest.raises(Outage):
        await reply.finish("one two three")
    assert len(sink.attempts) == 4 + 3
