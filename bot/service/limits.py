"""How often one person may address the bot: the rule every adapter obeys.

Each person gets `per_minute` messages in a window that opens with their first message
and lasts a minute, counted across every channel and server (it protects the model
budget from one person's flood, wherever it comes from). Over the limit, the first
refused message is told how long to wait; the rest of that window is skipped quietly.
Budgets from token costs will be decided here too, beside it.

The terminal chat is exempt: its user is the person running the bot.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.cache import LRU
from core.messages import ChatRequest

WINDOW_S = 60.0
# People tracked at once; the least recently seen are forgotten first (their window is over).
TRACKED_PEOPLE = 10_000


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a message may be answered; if not, how long to wait and whether to say so."""

    allowed: bool
    retry_after: float = 0.0  # seconds until the window ends
    notify: bool = False  # the first refusal of a window tells the person
    per_minute: int = 0  # the limit that applies


ADMITTED = Admission(True)


@dataclass(slots=True)
class _Window:
    opened_at: float
    used: int
    told: bool = False


class PersonLimit:
    """A fixed window per person: `per_minute` messages a minute (0: no limit)."""

    def __init__(self, per_minute: int) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self.per_minute = per_minute
        self._windows: LRU[int, _Window] = LRU(TRACKED_PEOPLE)

    def admit(self, request: ChatRequest) -> Admission:
        """Count `request` against its author's window, timed by the message's own time."""
        if self.per_minute == 0 or request.sent_at is None or request.discord_message_id is None:
            return ADMITTED  # no limit, or the terminal (its requests carry no Discord message)
        now = request.sent_at
        window = self._windows.get(request.author.id)
        if window is None or now >= window.opened_at + WINDOW_S:
            self._windows.put(request.author.id, _Window(opened_at=now, used=1))
            return ADMITTED
        if window.used < self.per_minute:
            window.used += 1
            return ADMITTED
        notify = not window.told
        window.told = True
        return Admission(
            False,
            retry_after=window.opened_at + WINDOW_S - now,
            notify=notify,
            per_minute=self.per_minute,
        )
