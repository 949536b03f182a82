"""What applies where: each place's model, system prompt, knowledge and logging switches,
arena pool and its server's retention, with their sources.

A setting is made on a scope (a thread, a channel, a server) and inherited below it: a
thread takes its channel's, a channel its server's, and what nobody set comes from the
bot's global defaults. Reads are cached for `SETTINGS_TTL_S`, because another process (a
second shard, the terminal) may change settings; concurrent messages in one place share
one read, and the places that miss in the same loop turn (a burst after start-up) are read
in one query. Each change is written with its change record in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chains.chat import DEFAULT_SYSTEM_PROMPT
from chains.registry import ModelRegistry
from core.cache import LRU
from core.errors import StorageUnavailable, UserError
from core.messages import Author, Place, Scope, scope_word
from store.db import failure_reason, is_outage
from store.repositories import SettingsRepository

log = logging.getLogger(__name__)

# Settings changed by another process (a second shard, the terminal) show up within this.
SETTINGS_TTL_S = 30.0
CACHED_PLACES = 10_000


@dataclass(frozen=True, slots=True)
class Setting:
    """A setting's value and where it comes from."""

    value: Any
    source: Scope


SettingName = Literal["model", "system_prompt", "knowledge", "arena_pool", "logging", "retention"]
# The column each setting is stored in.
_COLUMNS: dict[SettingName, str] = {
    "model": "model",
    "system_prompt": "system_prompt",
    "knowledge": "knowledge_enabled",
    "logging": "log_enabled",
    "retention": "retention_days",
    "arena_pool": "arena_pool",
}


@dataclass(frozen=True, slots=True)
class SettingChange:
    """What a settings command did: which setting, where, from what to what, and what applies now.

    The adapters phrase it (`bot.present.change_line`); `new` None means the scope inherits again.
    """

    name: SettingName
    scope: Scope
    old: Any
    new: Any
    now: Setting  # the value in force at the place afterwards, with its source


@dataclass(frozen=True, slots=True)
class EffectiveSettings:
    """What applies in a place: each value with the scope that set it."""

    model: Setting
    system_prompt: Setting
    knowledge: Setting
    # False: nothing said here is stored, only counted (`ChatService.stream`).
    logging: Setting
    # The server's (else the bot's) retention in days; None or 0: kept forever.
    retention: Setting
    # The models blind battles draw from here (a list of names); None: every model.
    arena_pool: Setting


class PlaceSettings:
    """Reads (cached and batched) and changes the settings of places."""

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        registry: ModelRegistry,
        *,
        retention_days: int | None = None,
    ) -> None:
        self.sessions = session_factory
        self.registry = registry  # its default model is the global one, and may change at run time
        self.retention_days = retention_days or None  # the bot's default; 0 is "keep"
        self._cache: LRU[Place, tuple[float, EffectiveSettings]] = LRU(CACHED_PLACES)
        self._reads: dict[Place, asyncio.Future[EffectiveSettings]] = {}
        self._batch: list[tuple[Place, asyncio.Future[EffectiveSettings]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by every change, so reads begun before it are not cached

    async def effective(self, place: Place) -> EffectiveSettings:
        """The model, system prompt and knowledge switch in force at `place`, with their sources."""
        cached = self._cache.get(place)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._reads.get(place)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_future()
            self._reads[place] = pending
            if not self._batch:
                loop.call_soon(self._start_read)
            self._batch.append((place, pending))
        return await asyncio.shield(pending)

    async def change(
        self, place: Place, scope: Scope, name: SettingName, value: Any, actor: Author
    ) -> SettingChange:
        """Write one setting and its change record in one transaction; says what changed."""
        scope_id = {
            "thread": place.thread_id,
            "channel": place.channel_id,
            "guild": place.guild_id,
        }.get(scope)
        if scope_id is None:
            raise UserError(f"There is no {scope_word(scope)} here to change settings for.")
        if name == "retention" and scope != "guild":
            raise ValueError("retention is a server setting")
        try:
            async with self.sessions() as session, session.begin():
                old = await SettingsRepository(session).set_field(
                    scope=scope,
                    scope_id=scope_id,
                    guild_id=place.guild_id,
                    field=_COLUMNS[name],
                    value=value,
                    actor_id=actor.id,
                    actor_name=actor.name,
                )
        except Exception as exc:
            if is_outage(exc):
                raise StorageUnavailable(
                    f"The change could not be saved: the database cannot be written right now ({failure_reason(exc)}). "
                    "Nothing was changed; try again in a moment."
                ) from exc
            raise
        # Every cached place under this scope may have changed, and so may reads in flight.
        self._cache.clear()
        self._reads.clear()
        self._generation += 1
        now = await self.effective(place)
        return SettingChange(name=name, scope=scope, old=old, new=value, now=getattr(now, name))

    def _start_read(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.ensure_future(self._read(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: list[tuple[Place, asyncio.Future[EffectiveSettings]]]) -> None:
        generation = self._generation
        try:
            async with self.sessions() as session:
                rows = await SettingsRepository(session).rows_for_places(
                    [(place.guild_id, place.channel_id, place.thread_id) for place, _ in batch]
                )
        except Exception as exc:
            if not is_outage(exc):
                for place, future in batch:
                    self._settle(place, future, exc)
                return
            # The database is away: answer with what was last read here (else the bot's
            # defaults) rather than not at all; the next message reads again.
            log.warning("settings could not be read (%s); using the last ones read", exc)
            for place, future in batch:
                stale = self._cache.get(place)
                self._settle(place, future, stale[1] if stale else self._resolve(place, {}))
            return
        expires = time.monotonic() + SETTINGS_TTL_S
        for place, future in batch:
            effective = self._resolve(place, rows)
            if generation == self._generation:  # no change was made while we read
                self._cache.put(place, (expires, effective))
            self._settle(place, future, effective)

    def _settle(
        self,
        place: Place,
        future: asyncio.Future[EffectiveSettings],
        outcome: EffectiveSettings | Exception,
    ) -> None:
        if self._reads.get(place) is future:
            del self._reads[place]
        if future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
            future.exception()  # every waiter re-raises it; none waiting is no news
        else:
            future.set_result(outcome)

    def _resolve(
        self, place: Place, rows: dict[tuple[str, int | None, int], Any]
    ) -> EffectiveSettings:
        """Each setting from the nearest scope that sets it: thread, channel, server, else global."""
        scopes = [
            ("thread", place.thread_id),
            ("channel", place.channel_id),
            ("guild", place.guild_id),
        ]
        defaults = {
            "model": self.registry.default_model,
            "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "knowledge_enabled": False,
            "log_enabled": True,
            # The config's pool, else None: every model (registered ones too, as they come).
            "arena_pool": list(self.registry.arena_pool) or None,
        }
        resolved: dict[str, Setting] = {}
        for name, default in defaults.items():
            resolved[name] = Setting(default, "global")
            for scope, scope_id in scopes:
                # Keyed with the server: the terminal's made-up ids repeat across servers.
                row = rows.get((scope, place.guild_id, scope_id)) if scope_id is not None else None
                value = getattr(row, name) if row is not None else None
                if value is not None:
                    resolved[name] = Setting(value, scope)  # type: ignore[arg-type]
                    break
        # Retention is a server's alone: channels and threads never set it.
        guild_row = (
            rows.get(("guild", place.guild_id, place.guild_id))
            if place.guild_id is not None
            else None
        )
        days = guild_row.retention_days if guild_row is not None else None
        retention = (
            Setting(days, "guild") if days is not None else Setting(self.retention_days, "global")
        )
        return EffectiveSettings(
            model=resolved["model"],
            system_prompt=resolved["system_prompt"],
            knowledge=resolved["knowledge_enabled"],
            logging=resolved["log_enabled"],
            retention=retention,
            arena_pool=resolved["arena_pool"],
        )
