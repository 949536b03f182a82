"""Running an export: candidates in, examples decided, built, redacted, checked, written.

    exporter = Exporter(sessions, TokenCounter(), targets=lambda: {...}, default_model=...)
    summary = await exporter.run(ExportOptions("openai-chat", split=0.9), Path("out.jsonl"))

The candidates stream from one query (`select`), batch by batch, so memory stays flat
however large the log is. Each becomes an example or is left out for one counted reason:
it failed, someone in it opted out, a correction supersedes it, its rating, no pair,
nothing known of what was sent, the format's rules, personal data still found after
redaction, too long for the target model, an exact duplicate. Examples go to temporary
files beside the output (train and validation by a hash of the conversation, so no
conversation is in both); then every line is read back and checked against the
format's rules, and only then are the files renamed into place, with the manifest.

Asked for `sources` (a fine-tune's snapshot is), each data file gets a sidecar
(`<file>.sources`) line-aligned with it: for each example, the ids of the logged
messages it was built from (the target, the other side of a pair, the prompt, every
history message: `message_inputs`) and its tokens; ids only, no text. Forgetting a
person or retention later removes the lines built on what they delete (`prune`). An
ordinary export does not look the ids up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import UserError
from store.export import formats, select
from store.export.manifest import kto_weights, write_manifest
from store.export.options import ExportOptions, Format
from store.export.redact import MIN_NAME_CHARS, PHONE_REGION, PLACEHOLDER_KINDS, PersonalData

MIN_EXAMPLES = 10  # OpenAI refuses fewer; TRL trains on them, but little is learned
# Texts redacted and counted, kept while they come back (a conversation's history comes
# back in each later answer of it): about 20 MB of chat text at most.
_CACHE_ENTRIES = 20_000
# Why a candidate was left out, in the order they are decided (the manifest's "removed").
REASONS: tuple[str, ...] = (
    *select.FILTERS,
    "failed",
    "opted_out",
    "logging_off",
    "superseded",
    "unrated",
    "rating",
    "no_pair",
    "no_context",
    "invalid",
    "redaction",
    "too_long",
    "duplicate",
)
_OK_STATUSES = frozenset({"ok", "fallback", None})
_CONTESTS = frozenset({"battle", "comparison"})  # answers people pick the better of
SOURCES_SUFFIX = ".sources"  # the provenance sidecar beside a data file

Progress = Callable[[int, int], None]  # (candidates done, candidates in all)
T = TypeVar("T")


class MessageCounter(Protocol):
    """Counts the tokens one chat message costs (chains.tokens.TokenCounter is one)."""

    def count_message(self, message: Mapping[str, Any]) -> int: ...


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """What the export needs of a model it trains: its window, and its training price."""

    name: str
    context_window: int
    training_price: float | None = None  # USD per million training tokens


@dataclass(frozen=True, slots=True)
class SourcesFile:
    """A data file's provenance sidecar: one line per example, the ids it was built from."""

    path: Path
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One file written: all examples, or the train or validation share."""

    path: Path
    split: str  # "all", "train" or "validation"
    examples: int
    tokens: int
    bytes: int
    sha256: str
    sources: SourcesFile | None = None  # asked for with `sources`


def sources_path(data: Path) -> Path:
    """The provenance sidecar of the data file `data`."""
    return data.with_name(data.name + SOURCES_SUFFIX)


def sources_line(message_ids: Iterable[str], tokens: int) -> bytes:
    """One sidecar line: an example's tokens and the sorted ids it was built from."""
    return (json.dumps({"tokens": tokens, "sources": sorted(set(message_ids))}) + "\n").encode()


def sources_problem(line: bytes) -> str | None:
    """What is wrong with one sidecar line, or None."""
    try:
        entry = json.loads(line)
    except ValueError as exc:
        return str(exc)
    if (
        not isinstance(entry, dict)
        or type(entry.get("tokens")) is not int
        or not isinstance(entry.get("sources"), list)
        or not all(isinstance(i, str) for i in entry["sources"])
    ):
        return "not {tokens, sources}"
    return None


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote and what it left out."""

    format: Format
    options: ExportOptions
    files: tuple[ExportFile, ...]
    manifest: Path
    candidates: int
    examples: int
    tokens: int
    removed: dict[str, int]
    placeholders: dict[str, int]
    redacted: bool
    cost_usd: float | None  # one epoch at the target models' training prices
    priced_examples: int
    warnings: tuple[str, ...]
    kto: dict[str, float] | None = None


class InvalidExport(RuntimeError):
    """A file failed its check after it was written: a bug, so nothing was kept."""


@dataclass
class _Output:
    """A file being written: a temporary file beside the final one, hashed as it grows."""

    final: Path
    split: str
    with_sources: bool = False
    temp: Path = field(init=False)
    sidecar: _Output | None = field(init=False, default=None)
    examples: int = 0
    tokens: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        self.temp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._file = open(self.temp, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in close)
        self._hash = hashlib.sha256()
        if self.with_sources:
            self.sidecar = _Output(sources_path(self.final), self.split)

    def write(self, line: bytes, tokens: int, sources: Iterable[str] = ()) -> None:
        self._file.write(line)
        self._hash.update(line)
        self.examples += 1
        self.tokens += tokens
        self.size += len(line)
        if self.sidecar is not None:
            self.sidecar.write(sources_line(sources, tokens), 0)

    def close(self) -> None:
        self._file.close()
        if self.sidecar is not None:
            self.sidecar.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.temp.unlink(missing_ok=True)
        if self.sidecar is not None:
            self.sidecar.discard()


class _Seen:
    """The examples written so far, by an 8-byte hash, in a SQLite file: memory stays flat."""

    def __init__(self, folder: Path) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=".switchboard-export-", dir=folder)
        self._db = sqlite3.connect(Path(self._dir.name) / "seen.db", check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-8192"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE seen (hash INTEGER PRIMARY KEY)")
        self._add = self._db.cursor()

    def add(self, line: bytes) -> bool:
        """Remember `line`; False when it was seen before."""
        key = int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "big", signed=True)
        self._add.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key,))
        return self._add.rowcount == 1

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


def _train_share(conversation_id: str) -> float:
    """Where a conversation falls in [0, 1): the same every time, spread evenly."""
    digest = hashlib.blake2b(conversation_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def output_paths(out: Path, split: float | None) -> dict[str, Path]:
    """The data files of an export to `out`: one, or the train and validation files."""
    if split is None:
        return {"all": out}
    return {
        "train": out.with_name(f"{out.stem}.train{out.suffix}"),
        "validation": out.with_name(f"{out.stem}.validation{out.suffix}"),
    }


def manifest_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.manifest.json")


def check_writable(out: Path) -> Path:
    """`out` made absolute; a UserError unless files can be written there."""
    out = out.expanduser().absolute()
    folder = out.parent
    reason = None
    if out.is_dir():
        reason = "it is a folder"
    elif not folder.is_dir():
        reason = f"there is no folder {folder}"
    elif not os.access(folder, os.W_OK | os.X_OK):
        reason = f"the folder {folder} is not writable"
    if reason:
        raise UserError(f"Cannot write the export to {out}: {reason}. Choose another --output.")
    return out


class Exporter:
    """Exports the log as fine-tuning datasets (see the module's docstring)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        counter: MessageCounter,
        *,
        targets: Callable[[], Mapping[str, ModelTarget]],
        default_model: Callable[[], str],
    ) -> None:
        self.sessions = sessions
        self.counter = counter
        self.targets = targets
        self.default_model = default_model

    async def run(
        self,
        options: ExportOptions,
        out: Path,
        progress: Progress | None = None,
        *,
        sources: bool = False,
    ) -> ExportSummary:
        """Export to `out` (with a split, to its .train and .validation siblings); with
        `sources`, each data file with its provenance sidecar (see the module)."""
        out = check_writable(out)
        targets = dict(self.targets())
        async with self.sessions() as session:
            if options.model is not None and options.model not in targets:
                if not await select.model_logged(session, options.model):
                    raise UserError(await _unknown_model(session, options.model, list(targets)))
            revision = await select.database_revision(session)
            counts = await select.filter_counts(session, options)
            people = await select.opted_out(session)
            unlogged = await select.unlogged(session)
            corrected = await select.corrected_answers(session, options)
            names = await select.member_names(session, options) if options.redact else {}
        run = _Run(self, options, out, targets, names, counts, corrected, people, unlogged, sources)
        try:
            if counts.kept:
                async with (
                    self.sessions() as session,
                    contextlib.aclosing(
                        _ahead(select.stream_candidates(session, options, sources=sources))
                    ) as batches,
                ):
                    async for batch in batches:
                        run.take(batch)
                        if progress is not None:
                            progress(run.done, counts.kept)
                run.flush_group()
            return await run.finish(revision)
        finally:
            run.abandon()


async def _ahead(batches: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The batches, each next one fetched while the caller works on the one before.

    The database's side (SQLite's stepping, in aiosqlite's thread; PostgreSQL's server)
    then overlaps with the Python work on the rows.
    """
    pending: asyncio.Future[T | None] = asyncio.ensure_future(anext(batches, None))
    try:
        while (batch := await pending) is not None:
            pending = asyncio.ensure_future(anext(batches, None))
            await asyncio.sleep(0)  # let the next fetch begin before the caller works
            yield batch
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()


async def _unknown_model(session: AsyncSession, name: str, known: list[str]) -> str:
    import difflib

    names = sorted({*known, *await select.logged_models(session)})
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"No model named '{name}' is in the registry or has answered anything.{hint} "
        f"Known: {', '.join(names) or 'none'}."
    )


_Cached = tuple[
    str | None, int, dict[str, int] | None
]  # (clean text or None, tokens, placeholders)


class _Run:
    """One export's state: the files, the counts, the caches."""

    def __init__(
        self,
        exporter: Exporter,
        options: ExportOptions,
        out: Path,
        targets: Mapping[str, ModelTarget],
        names: Mapping[int | None, set[str]],
        counts: select.FilterCounts,
        corrected: set[str],
        people: select.OptedOut,
        unlogged: select.Unlogged,
        sources: bool = False,
    ) -> None:
        self.options = options
        self.sources = sources
        self.fmt: Format = options.format
        self.out = out
        self.targets = targets
        default = exporter.default_model()
        self.default_target = targets.get(default) or ModelTarget(default, 8192)
        self.counter = exporter.counter
        self.names = names
        self.counts = counts
        self.corrected = corrected
        self.people = people
        self.unlogged = unlogged
        self.removed: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.removed.update(counts.removed)
        self.placeholders: dict[str, int] = dict.fromkeys(PLACEHOLDER_KINDS, 0)
        self.done = 0
        self.unknown_targets = 0
        self.cost = 0.0
        self.priced = 0
        self.labels = {True: 0, False: 0}
        self._scrubbers: dict[int | None, PersonalData] = {}
        # (server, role, text) → what it becomes: a conversation's history comes back in
        # every later answer of it. Emptied when full (cheaper than keeping an order).
        self._cache: dict[tuple[int | None, str, str], _Cached] = {}
        self._group: list[Row[Any]] = []
        self.outputs = {
            split: _Output(path, split, sources)
            for split, path in output_paths(out, options.split).items()
        }
        self.seen = _Seen(out.parent)
        self._finished = False

    # -------------------------------------------------------------- deciding

    def take(self, batch: Sequence[Row[Any]]) -> None:
        """Decide on a batch of candidates and write the examples they make."""
        if self.options.paired:
            group = self._group
            for row in batch:
                if group and row.parent_id != group[0].parent_id:
                    self.flush_group()
                    group = self._group
                group.append(row)
        else:
            for row in batch:
                self.done += 1
                self._single(row)

    def _usable(self, row: Row[Any]) -> bool:
        """Whether the row can be an example at all; counts why not."""
        if row.error is not None or row.status not in _OK_STATUSES or not row.content.strip():
            self.removed["failed"] += 1
            return False
        if self.people.touches(row):
            self.removed["opted_out"] += 1
            return False
        if self.unlogged.touches(row):
            self.removed["logging_off"] += 1
            return False
        return True

    def _single(self, row: Row[Any]) -> None:
        """An openai-chat, sft or kto example from one candidate, or a counted reason."""
        if not self._usable(row):
            return
        options = self.options
        correction = row.kind == "correction"
        rating, votes = self.people.rating(row)
        label = True
        if self.fmt == "kto":
            if correction:
                label = True
            elif not votes and row.contest_picks:
                # A battle or comparison: picked more often than passed over is desirable
                # (the chosen +, the others −); as often either way says nothing.
                passed_over = row.contest_picks - row.picks
                if row.picks == passed_over:
                    self.removed["unrated"] += 1
                    return
                label = row.picks > passed_over
            elif not votes:
                self.removed["unrated"] += 1
                return
            elif rating >= options.min_rating:
                label = True
            elif rating < 0:
                label = False
            else:
                self.removed["rating"] += 1
                return
        elif not correction:
            if row.id in self.corrected:
                self.removed["superseded"] += 1
                return
            if not votes:
                if not options.include_unrated:
                    self.removed["unrated"] += 1
                    return
            elif rating < options.min_rating:
                self.removed["rating"] += 1
                return
        built = self._prompt(row)
        if built is None:
            return
        prompt, tokens, found = built
        target = self._text(row.guild_id, "assistant", row.content, found)
        if target is None:
            return
        text, more = target
        if self.fmt == "kto":
            example = formats.kto_example(prompt, text, label)
        else:
            example = formats.chat_example(self.fmt, prompt, text)
        if self._write(example, row, tokens + more, found, (row,)):
            self.labels[label] += 1

    def flush_group(self) -> None:
        """Pairs from the answers to one prompt (the DPO formats): a correction over what it
        corrects, a liked answer over a disliked one, and in a battle or a comparison an
        answer people picked more often over one they picked less."""
        group, self._group = self._group, []
        if not group:
            return
        self.done += len(group)
        options = self.options
        usable = [row for row in group if self._usable(row)]
        by_id = {row.id: row for row in usable}
        pairs: list[tuple[Row[Any], Row[Any]]] = [
            (row, by_id[row.alternative_to])
            for row in usable
            if row.kind == "correction" and row.alternative_to in by_id
        ]
        liked: list[Row[Any]] = []
        rejected: list[Row[Any]] = []
        for row in usable:
            if row.kind == "correction":
                continue
            rating, votes = self.people.rating(row)
            if votes and rating >= options.min_rating:
                liked.append(row)
            elif (votes and rating < 0) or (options.include_unrated and not votes):
                rejected.append(row)
        pairs += [(good, bad) for good in liked for bad in rejected]
        # Battles and comparisons: an answer picked more often than another of its contest
        # (the same prompt's battle or comparison answers) is preferred over it.
        contest = [row for row in usable if row.kind in _CONTESTS and row.contest_picks]
        pairs += [
            (good, bad)
            for good in contest
            for bad in contest
            if good.kind == bad.kind and good.picks > bad.picks
        ]
        pairs = list({(good.id, bad.id): (good, bad) for good, bad in pairs}.values())
        paired = {row.id for pair in pairs for row in pair}
        self.removed["no_pair"] += len(usable) - len(paired)
        for chosen, other in pairs:
            built = self._prompt(chosen)
            if built is None:
                continue
            prompt, tokens, found = built
            good = self._text(chosen.guild_id, "assistant", chosen.content, found)
            bad = self._text(other.guild_id, "assistant", other.content, found) if good else None
            if good is None or bad is None:
                continue
            example = formats.pair_example(self.fmt, prompt, good[0], bad[0])
            self._write(example, chosen, tokens + good[1] + bad[1], found, (chosen, other))

    # -------------------------------------------------------------- building

    def _prompt(self, row: Row[Any]) -> tuple[formats.Messages, int, list[dict[str, int]]] | None:
        """The conversation before the answer, redacted, with its tokens and placeholders;
        None (counted) when it cannot be had."""
        sent = row.request_messages or row.original_request_messages
        messages = formats.context(
            sent,
            system_prompt=row.system_prompt,
            question=row.prompt_text,
            with_context=self.options.with_context,
        )
        if messages is None:
            self.removed["no_context"] += 1
            return None
        tokens = 0
        found: list[dict[str, int]] = []
        guild_id = row.guild_id
        for message in messages:
            done = self._text(guild_id, message["role"], message["content"], found)
            if done is None:
                return None
            message["content"] = done[0]
            tokens += done[1]
        return messages, tokens, found

    def _text(
        self, guild_id: int | None, role: str, text: str, found: list[dict[str, int]]
    ) -> tuple[str, int] | None:
        """A message's text redacted and its tokens (cached); None (counted) when personal
        data is still found in it. The placeholders written go to `found`."""
        key = (guild_id, role, text)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._work(guild_id, role, text)
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = hit
        cleaned, tokens, kinds = hit
        if cleaned is None:
            self.removed["redaction"] += 1
            return None
        if kinds:
            found.append(kinds)
        return cleaned, tokens

    def _work(self, guild_id: int | None, role: str, text: str) -> _Cached:
        """Redact one text and count its tokens (what `_text` caches)."""
        kinds: dict[str, int] | None = None
        if self.options.redact:
            scrub = self._scrubbers.get(guild_id)
            if scrub is None:
                scrub = self._scrubbers[guild_id] = PersonalData(self.names.get(guild_id, ()))
            try:
                cleaned, kinds = scrub.scrub(text)
                if kinds and scrub.find(cleaned) is not None:
                    return None, 0, None
            except Exception:  # fail closed: a text that cannot be checked is not exported
                return None, 0, None
            text = cleaned
        return text, self.counter.count_message({"role": role, "content": text}), kinds or None

    def _target(self, row: Row[Any]) -> ModelTarget:
        name = self.options.model or row.model_name
        target = self.targets.get(name) if name else None
        if target is None:
            self.unknown_targets += 1
            return self.default_target
        return target

    def _write(
        self,
        example: dict[str, Any],
        row: Row[Any],
        tokens: int,
        found: list[dict[str, int]],
        made_of: Sequence[Row[Any]],
    ) -> bool:
        """Check and write one example (made of the candidates `made_of`); False (counted)
        when it is left out."""
        if formats.problem(example, self.fmt) is not None:
            self.removed["invalid"] += 1
            return False
        target = self._target(row)
        if tokens > target.context_window:
            self.removed["too_long"] += 1
            return False
        line = (json.dumps(example, ensure_ascii=False, allow_nan=False) + "\n").encode()
        if not self.seen.add(line):
            self.removed["duplicate"] += 1
            return False
        split = self.options.split
        if split is None:
            output = self.outputs["all"]
        elif _train_share(row.conversation_id) < split:
            output = self.outputs["train"]
        else:
            output = self.outputs["validation"]
        output.write(line, tokens, _message_ids(made_of) if self.sources else ())
        for kinds in found:
            for kind, n in kinds.items():
                self.placeholders[kind] += n
        if target.training_price is not None:
            self.cost += tokens * target.training_price / 1_000_000
            self.priced += 1
        return True

    # -------------------------------------------------------------- finishing

    @property
    def examples(self) -> int:
        return sum(output.examples for output in self.outputs.values())

    async def finish(self, revision: str | None) -> ExportSummary:
        """Check the files, put them in place with the manifest; or say why nothing was."""
        for output in self.outputs.values():
            output.close()
        self.seen.close()
        if not self.examples:
            raise UserError(nothing_to_export(self.counts.candidates, self.removed, self.options))
        await asyncio.to_thread(self._verify)
        for output in self.outputs.values():
            if output.sidecar is not None:  # first: a data file is never without its sources
                os.replace(output.sidecar.temp, output.sidecar.final)
            os.replace(output.temp, output.final)
        self._finished = True
        files = tuple(
            ExportFile(
                o.final,
                o.split,
                o.examples,
                o.tokens,
                o.size,
                o.sha256,
                SourcesFile(o.sidecar.final, o.sidecar.size, o.sidecar.sha256)
                if o.sidecar is not None
                else None,
            )
            for o in self.outputs.values()
        )
        kto = kto_weights(self.labels[True], self.labels[False]) if self.fmt == "kto" else None
        summary = ExportSummary(
            format=self.fmt,
            options=self.options,
            files=files,
            manifest=manifest_path(self.out),
            candidates=self.counts.candidates,
            examples=self.examples,
            tokens=sum(f.tokens for f in files),
            removed=dict(self.removed),
            placeholders=dict(self.placeholders),
            redacted=self.options.redact,
            cost_usd=self.cost if self.priced else None,
            priced_examples=self.priced,
            warnings=tuple(self._warnings(kto)),
            kto=kto,
        )
        write_manifest(
            summary,
            self.options,
            revision=revision,
            created_at=datetime.now(UTC),
            redaction={
                "enabled": self.options.redact,
                "fail_closed": True,
                "kinds": list(PLACEHOLDER_KINDS),
                "phone_region": PHONE_REGION,
                "min_name_chars": MIN_NAME_CHARS,
                "names_known": sum(len(v) for v in self.names.values()),
            },
        )
        return summary

    def _verify(self) -> None:
        """Read every file back: each line parses and keeps the format's rules (a sidecar's,
        its own), the counts and the hashes are those written."""
        for output in self.outputs.values():
            _read_back(output, self._problem)
            if output.sidecar is not None:
                if output.sidecar.examples != output.examples:
                    raise InvalidExport(f"{output.sidecar.final.name} does not line up")
                _read_back(output.sidecar, sources_problem)

    def _problem(self, line: bytes) -> str | None:
        try:
            example = json.loads(line)
        except ValueError as exc:
            return str(exc)
        return formats.problem(example, self.fmt)

    def _warnings(self, kto: Mapping[str, float] | None) -> Iterable[str]:
        examples = self.examples
        if examples < MIN_EXAMPLES:
            yield (
                f"Only {examples} example{'s' if examples != 1 else ''}: fine-tuning needs at "
                f"least {MIN_EXAMPLES} (OpenAI refuses fewer)."
            )
        for output in self.outputs.values():
            if output.split != "all" and not output.examples:
                yield f"The {output.split} file is empty: too few conversations to split."
        if self.unknown_targets:
            yield (
                f"{self.unknown_targets} examples are by models no longer in the registry: their "
                f"length was checked against {self.default_target.name}'s window "
                f"({self.default_target.context_window:,} tokens)."
            )
        if kto is not None and (not self.labels[True] or not self.labels[False]):
            kind = "undesirable" if self.labels[True] else "desirable"
            yield f"No {kind} examples: KTO learns best from both kinds."

    def abandon(self) -> None:
        """Remove the temporary files unless they were put in place."""
        if self._finished:
            return
        for output in self.outputs.values():
            output.discard()
        with contextlib.suppress(Exception):
            self.seen.close()


def _read_back(output: _Output, problem: Callable[[bytes], str | None]) -> None:
    """Every line of a written file keeps its rules; its count and hash are those written."""
    digest = hashlib.sha256()
    lines = 0
    with open(output.temp, "rb") as file:
        for number, line in enumerate(file, start=1):
            digest.update(line)
            lines += 1
            found = problem(line)
            if found is not None:
                raise InvalidExport(f"{output.final.name} line {number}: {found}")
    if lines != output.examples or digest.hexdigest() != output.sha256:
        raise InvalidExport(f"{output.final.name} is not what was written")


def _message_ids(rows: Sequence[Row[Any]]) -> set[str]:
    """The logged messages an example was built from: each candidate, what it corrects,
    its prompt, and every message it was sent (`input_ids`: the history and the prompt)."""
    ids: set[str] = set()
    for row in rows:
        ids.add(row.id)
        for one in (row.parent_id, row.alternative_to):
            if one is not None:
                ids.add(one)
        if row.input_ids:
            ids.update(row.input_ids.split())
    return ids


def reason_words(options: ExportOptions) -> dict[str, str]:
    """How each reason a candidate was left out is said, as in "12 unrated"."""
    return {
        "guild": "not in --guild",
        "channel": "not in --channel",
        "model": "not by --model",
        "since": "before --since",
        "until": "not before --until",
        "failed": "failed or empty",
        "opted_out": "by or for people who opted out",
        "logging_off": "said where logging is off",
        "superseded": "corrected (the correction is the target)",
        "unrated": "unrated (add --include-unrated)",
        "rating": f"rated below --min-rating {options.min_rating}",
        "no_pair": "without a preferred and a rejected answer to the same prompt",
        "no_context": "without the messages they were sent",
        "invalid": "breaking the format's rules",
        "redaction": "still holding personal data after redaction",
        "too_long": "too long for the model's window",
        "duplicate": "duplicates",
    }


def removed_text(removed: Mapping[str, int], options: ExportOptions) -> str:
    """ "12 unrated (add --include-unrated), 3 duplicates", or "" when nothing was left out."""
    words = reason_words(options)
    return ", ".join(f"{n:,} {words[reason]}" for reason, n in removed.items() if n)


def nothing_to_export(candidates: int, removed: Mapping[str, int], options: ExportOptions) -> str:
    """ "Nothing to export", with what each filter left out."""
    if not candidates:
        return "Nothing to export: the log holds no answers yet."
    left_out = removed_text(removed, options) or "none qualified"
    return f"Nothing to export: of {candidates:,} answers, {left_out}."
