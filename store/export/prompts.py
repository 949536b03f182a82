"""Prompts from the log, for trying models on real traffic (`switchboard eval --from-log`).

The export's own selection: the same candidates query with the same place, model and date
filters (`select.candidates_query`), the people who opted out left out, the conversation
before each answer rebuilt as the export rebuilds it (`formats.context`, without the
retrieved passages), and personal data redacted as the export redacts it (fail closed: a
prompt whose redaction cannot be checked is left out). Each logged prompt comes once,
however many answers it had (retries, comparisons, battles); ratings do not matter here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from store.export import formats, select
from store.export.options import ExportOptions
from store.export.redact import PersonalData

_ROLES = frozenset({"user", "assistant"})


@dataclass(frozen=True, slots=True)
class LoggedPrompt:
    """One logged question with the conversation before it."""

    id: str  # the question's message id
    system: str | None  # the system prompt it was answered with (no passages); None: none
    history: tuple[tuple[str, str], ...]  # earlier (role, text) turns
    prompt: str
    model: str | None  # the model that answered it first


@dataclass(frozen=True, slots=True)
class LoggedPrompts:
    """The newest `limit` prompts that pass the filters, oldest first, and how many passed."""

    prompts: tuple[LoggedPrompt, ...]
    found: int
    left_out: int  # opted out, or personal data left after redaction


def _prompt_of(row: Row[Any]) -> LoggedPrompt | None:
    """The question of a candidate and what came before it; None when it is not known."""
    sent = row.request_messages or row.original_request_messages
    messages = formats.context(
        sent, system_prompt=row.system_prompt, question=row.prompt_text, with_context=False
    )
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    history = tuple(
        (str(m["role"]), str(m["content"])) for m in messages[:-1] if m["role"] in _ROLES
    )
    return LoggedPrompt(row.parent_id, system, history, messages[-1]["content"], row.model_name)


def _redacted(prompt: LoggedPrompt, scrub: PersonalData) -> LoggedPrompt | None:
    def clean(text: str) -> str | None:
        try:
            cleaned, kinds = scrub.scrub(text)
            if kinds and scrub.find(cleaned) is not None:
                return None
        except Exception:  # fail closed, as the export does
            return None
        return cleaned

    texts = [clean(prompt.prompt), *(clean(t) for _, t in prompt.history)]
    system = clean(prompt.system) if prompt.system is not None else None
    if any(t is None for t in texts) or (prompt.system is not None and system is None):
        return None
    history = tuple((role, t or "") for (role, _), t in zip(prompt.history, texts[1:], strict=True))
    return LoggedPrompt(prompt.id, system, history, texts[0] or "", prompt.model)


async def logged_prompts(
    session: AsyncSession, options: ExportOptions, *, limit: int
) -> LoggedPrompts:
    """The newest `limit` distinct prompts the export's filters keep (see the module)."""
    people = await select.opted_out(session)
    names = await select.member_names(session, options) if options.redact else {}
    seen: set[str] = set()
    newest: deque[tuple[int | None, LoggedPrompt]] = deque(maxlen=limit)
    found = left_out = 0
    async for batch in select.stream_candidates(session, options):
        for row in batch:
            if row.parent_id is None or row.parent_id in seen:
                continue
            if people.touches(row):
                seen.add(row.parent_id)
                left_out += 1
                continue
            prompt = _prompt_of(row)
            if prompt is None:
                continue  # a failed first answer may lack what was sent: a later one may not
            seen.add(row.parent_id)
            found += 1
            newest.append((row.guild_id, prompt))
    kept: list[LoggedPrompt] = []
    scrubbers: dict[int | None, PersonalData] = {}
    for guild_id, prompt in newest:
        if options.redact:
            scrub = scrubbers.get(guild_id)
            if scrub is None:
                scrub = scrubbers[guild_id] = PersonalData(names.get(guild_id, ()))
            redacted = _redacted(prompt, scrub)
            if redacted is None:
                left_out += 1
                continue
            prompt = redacted
        kept.append(prompt)
    return LoggedPrompts(tuple(kept), found, left_out)
