"""Showing answers in Discord: split at the message limit, repair code fences, throttle edits.

Everything here is Discord-free. `split_text` is pure; `StreamingReply` drives two small
callables (send a part, edit a part) and an injectable clock, so the streaming rules are
tested without a gateway and, under simcord, follow its virtual clock.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from core.messages import FallbackUsed, Source

MESSAGE_LIMIT = 2000
# Discord allows about five edits per five seconds per channel; once a second per message
# keeps a streaming answer well inside that and still looks live.
EDIT_INTERVAL = 1.0
WRITING_MARKER = " ⏳"
# How many times the final edit is tried when it fails for a passing reason (see finish).
FINISH_ATTEMPTS = 3
# A message must have visible content; a zero-width space stands in for blank parts.
BLANK = "\u200b"

_FENCE = "```"
# The language tag right after an opening fence: one short word ending the line.
_LANG = re.compile(r"[A-Za-z0-9_+\-.#]{1,20}\n")
# The longest closing repair ("\n```"); every part keeps room for it.
_CLOSE_ROOM = 4


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message's worth of the text: a slice of it plus the fence repairs around it."""

    body: str
    reopen: str = ""  # "```lang\n" when the part starts inside a code block
    close: str = ""  # "```" or "\n```" when the part ends inside one

    @property
    def content(self) -> str:
        return self.reopen + self.body + self.close


def fence_starts(text: str) -> list[int]:
    """Where each ``` occurs, scanning left to right without overlaps (as `str.count` does)."""
    found = []
    index = text.find(_FENCE)
    while index != -1:
        found.append(index)
        index = text.find(_FENCE, index + len(_FENCE))
    return found


def split_text(text: str, limit: int = MESSAGE_LIMIT) -> list[Chunk]:
    """Split `text` into parts of at most `limit` characters, at line or word breaks when it can.

    A part that ends inside a code block closes it, and the next part reopens it with the
    same language, so every part renders on its own. The bodies joined give back `text`.
    """
    if limit < 64:
        raise ValueError("limit must leave room for fence repairs (at least 64)")
    if not text:
        return []
    fences = fence_starts(text)
    chunks: list[Chunk] = []
    start = 0
    while start < len(text):
        lang = _open_fence_lang(text, fences, start)
        reopen = "" if lang is None else f"{_FENCE}{lang}\n"
        room = limit - len(reopen) - _CLOSE_ROOM
        end = len(text) if len(text) - start <= room else _cut(text, start, start + room, fences)
        body = text[start:end]
        close = ""
        if _open_fence_lang(text, fences, end) is not None:
            close = _FENCE if body.endswith("\n") else "\n" + _FENCE
        chunks.append(Chunk(body, reopen, close))
        start = end
    return chunks


def _open_fence_lang(text: str, fences: Sequence[int], position: int) -> str | None:
    """The language of the code block open at `position` ("" if untagged); None outside one."""
    before = [s for s in fences if s + len(_FENCE) <= position]
    if len(before) % 2 == 0:
        return None
    match = _LANG.match(text, before[-1] + len(_FENCE))
    return match.group()[:-1] if match else ""


def _cut(text: str, start: int, stop: int, fences: Sequence[int]) -> int:
    """Where to end a part that must end by `stop`: a line break, else a space, else `stop`."""
    window = text[start:stop]
    cut = stop
    newline = window.rfind("\n")
    if newline + 1 >= len(window) // 2:
        cut = start + newline + 1
    else:
        for index in range(len(window) - 1, 0, -1):
            if window[index].isspace():
                cut = start + index + 1
                break
    # Never cut through a ``` itself: that would unbalance both halves.
    for fence in fences:
        if fence < cut < fence + len(_FENCE):
            cut = fence if fence > start else fence + len(_FENCE)
            break
    return cut


def layout(
    text: str, *, footer: str = "", writing: bool = False, limit: int = MESSAGE_LIMIT
) -> list[str]:
    """The contents of the messages that show `text`, with the marker or the footer.

    The text is always split with room for the marker, so a part's cut never moves once
    later parts exist: streaming only ever edits the last part and appends new ones.
    """
    parts = [chunk.content for chunk in split_text(text, limit - len(WRITING_MARKER))]
    if writing:
        return [*parts[:-1], (parts[-1] if parts else "") + WRITING_MARKER]
    if footer:
        if parts and len(parts[-1].rstrip()) + 1 + len(footer) <= limit:
            parts[-1] = parts[-1].rstrip() + "\n" + footer
        else:
            parts.extend(chunk.content for chunk in split_text(footer, limit))
    return parts or [BLANK]


def displayable(content: str) -> str:
    """Discord refuses blank messages; show a zero-width space instead."""
    return content if content.strip() else BLANK


def shorten(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` characters at a line or word break, ending in "…", and
    whether it was cut. A cut inside a code block closes the block, so it still renders."""
    if len(text) <= limit:
        return text, False
    if limit < 64:  # too little room to break nicely or repair fences
        return text[: max(limit - 1, 0)] + "…"[: max(limit, 0)], True
    kept = split_text(text, limit - 2)[0]  # room for "\n…" or " …"
    return (kept.content + "\n…" if kept.close else kept.content.rstrip() + " …"), True


def fair_shares(lengths: Sequence[int], room: int, cap: int) -> list[int]:
    """How many characters each of several texts may keep so that together they fit `room`
    and none exceeds `cap`: short texts keep all they have, long ones share the rest evenly.
    """
    shares = [0] * len(lengths)
    left = max(room, 0)
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    for done, index in enumerate(order):
        share = min(lengths[index], cap, left // (len(order) - done))
        shares[index] = share
        left -= share
    return shares


def footer_lines(
    *,
    model: str | None,
    fallbacks: Sequence[FallbackUsed] = (),
    sources: Sequence[Source] = (),
    error: str | None = None,
) -> str:
    """Small print under an answer: a failure, which model stood in, and the sources used."""
    lines: list[str] = []
    if error:
        lines.append(f"⚠️ {error}")
    if fallbacks and model:
        reasons = "; ".join(
            f"{f.failed_model} was unavailable: {_short(f.reason)}" for f in fallbacks
        )
        lines.append(f"-# answered by {model} ({reasons})")
    if sources:
        lines.append("-# Sources:")
        for number, source in enumerate(sources, 1):
            where = f", {source.location}" if source.location else ""
            lines.append(f"-# {number}. {source.document}{where}")
    return "\n".join(lines)


def _short(reason: str) -> str:
    reason = " ".join(reason.split())
    return (reason[:150] + "…") if len(reason) > 150 else reason.rstrip(".")


M = TypeVar("M")


class ReplySink(Protocol[M]):
    """Where a streaming reply's messages go (a Discord channel, or a list in tests).

    `last` marks the write that shows the finished reply's last part: a sink may put
    what belongs under a finished answer there (Discord's feedback buttons), in the same
    request, so finishing never costs an extra edit.
    """

    async def send(self, content: str, after: M | None, *, last: bool = False) -> M:
        """Post a new part; `after` is the previous part (None for the first)."""
        ...

    async def edit(self, message: M, content: str, *, last: bool = False) -> None:
        """Replace a posted part's content."""
        ...


def _monotonic() -> float:
    # Looked up at call time so a patched clock (simcord's virtual time) is honoured.
    return time.monotonic()


class StreamingReply(Generic[M]):
    """Shows a growing answer: edits each message at most once per `interval`, then finishes it."""

    def __init__(
        self,
        sink: ReplySink[M],
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        interval: float = EDIT_INTERVAL,
        limit: int = MESSAGE_LIMIT,
        passing: Callable[[Exception], bool] | None = None,
    ) -> None:
        self.sink = sink
        self.clock = clock or _monotonic
        self.sleep = sleep or asyncio.sleep
        self.interval = interval
        self.limit = limit
        # Which failures of the sink are passing (an outage, a dropped connection) rather
        # than final (the message is gone, the permission lost): see `update`.
        self.passing = passing or (lambda exc: False)
        self.messages: list[M] = []
        self._shown: list[str] = []
        self._written_at: list[float] = []
        self._held_until = -math.inf
        self._sealed: int | None = None  # the part last written with `last=True`

    @property
    def started(self) -> bool:
        return bool(self.messages)

    async def update(self, text: str) -> None:
        """Show `text` so far with the writing marker, skipping edits that come too soon.

        A passing failure only skips this update: what it would have shown is shown by a
        later update or the finish, tried no sooner than one interval later (so an outage
        is not hammered once per token). Other failures are raised.
        """
        if not text or self.clock() < self._held_until:
            return
        try:
            await self._render(layout(text, writing=True, limit=self.limit), final=False)
        except Exception as exc:
            if not self.passing(exc):
                raise
            self._held_until = self.clock() + self.interval

    async def finish(self, text: str, footer: str = "") -> list[M]:
        """Show the final `text` and `footer` without the marker; waits out the throttle.

        The finish is what the person reads, so a passing failure is tried again, one and
        then two intervals later, before it is raised.
        """
        contents = layout(text, footer=footer, limit=self.limit)
        for attempt in range(FINISH_ATTEMPTS):
            held = self._held_until - self.clock()
            if held > 0:
                await self.sleep(held)
            try:
                await self._render(contents, final=True)
                break
            except Exception as exc:
                if attempt == FINISH_ATTEMPTS - 1 or not self.passing(exc):
                    raise
                self._held_until = self.clock() + self.interval * 2**attempt
        return list(self.messages)

    async def _render(self, contents: list[str], *, final: bool) -> None:
        for index, content in enumerate(contents):
            last = final and index == len(contents) - 1
            if index == len(self.messages):
                previous = self.messages[-1] if self.messages else None
                message = await self.sink.send(displayable(content), previous, last=last)
                self.messages.append(message)
                self._shown.append(content)
                self._written_at.append(self.clock())
                if last:
                    self._sealed = index
                continue
            if self._shown[index] == content and not (last and self._sealed != index):
                continue
            wait = self._written_at[index] + self.interval - self.clock()
            if wait > 0:
                if not final:
                    continue  # a later update or the finish shows it
                await self.sleep(wait)
            await self.sink.edit(self.messages[index], displayable(content), last=last)
            self._shown[index] = content
            self._written_at[index] = self.clock()
            if last:
                self._sealed = index
