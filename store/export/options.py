"""What an export is asked for: the format, the filters, the split, redaction on or off.

Both adapters (`switchboard export`, `/export`) build one `ExportOptions` from what a
person typed; a bad value is a `UserError` with one line saying what to write instead.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from core.errors import UserError

Format = Literal["openai-chat", "openai-dpo", "sft", "dpo", "kto"]
FORMATS: tuple[Format, ...] = ("openai-chat", "openai-dpo", "sft", "dpo", "kto")
# What each format is for, in a few words (help texts, README).
FORMAT_HELP: dict[Format, str] = {
    "openai-chat": "OpenAI chat fine-tuning: {messages} with weight 0 on earlier turns",
    "openai-dpo": "OpenAI preference fine-tuning: {input, preferred_output, non_preferred_output}",
    "sft": "TRL SFTTrainer, conversational: {messages}",
    "dpo": "TRL DPOTrainer, conversational: {prompt, chosen, rejected}",
    "kto": "TRL KTOTrainer, conversational: {prompt, completion, label}",
}
# Formats made of pairs of answers to one prompt.
PAIRED: frozenset[Format] = frozenset({"openai-dpo", "dpo"})


def parse_format(text: str) -> Format:
    """The format named `text`, or a UserError listing the five."""
    name = text.strip().lower()
    if name in FORMATS:
        return name  # narrowed by the check above
    close = difflib.get_close_matches(name, FORMATS, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise UserError(f"Unknown format '{text}'.{hint} Choose one of: {', '.join(FORMATS)}.")


def parse_when(text: str, option: str, *, end: bool = False) -> datetime:
    """An ISO date or date-time as a UTC datetime; `option` names it in the error.

    A time without a zone is UTC. A bare date means its midnight; with `end` (for
    --until) the midnight after it, so `--until 2024-05-31` keeps all of May 31.
    """
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(
            f"{option} '{text}' is not an ISO date: write it like 2024-05-01 or 2024-05-01T14:30."
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """One export: its format and filters. Checked when made (a bad value is a UserError)."""

    format: Format
    # A training target needs at least this net rating (likes minus dislikes); a
    # correction always qualifies; a disliked answer never does.
    min_rating: int = 1
    model: str | None = None
    guild_id: int | None = None
    channel_id: int | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    # Also answers nobody rated (as training targets; in pairs, as the rejected side).
    include_unrated: bool = False
    # Keep the knowledge-base passages the model was sent; else the question is the
    # person's own text.
    with_context: bool = False
    split: float | None = None  # the share of conversations that go to the train file
    redact: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            parse_format(str(self.format))
        if self.min_rating < 1:
            raise UserError(
                "--min-rating must be 1 or more: a training target must be liked (add "
                "--include-unrated to keep answers nobody rated; a disliked one never is)."
            )
        if self.split is not None and not 0 < self.split < 1:
            raise UserError(
                f"--split {self.split:g} is not a share between 0 and 1: write it like 0.9 "
                "(90% of the conversations for training, 10% for validation)."
            )
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise UserError(
                f"--since {self.since:%Y-%m-%d %H:%M} is not before --until "
                f"{self.until:%Y-%m-%d %H:%M}: nothing can match."
            )

    @property
    def paired(self) -> bool:
        """Whether examples are pairs of answers to one prompt (the DPO formats)."""
        return self.format in PAIRED

    def as_json(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        data = asdict(self)
        for name in ("since", "until"):
            if data[name] is not None:
                data[name] = data[name].isoformat()
        return data
