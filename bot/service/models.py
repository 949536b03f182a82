"""The models that can be chosen: the registry, kept in step with the database.

Models come from the TOML file (or the built-in SmolLM2) and from the database, where a
CLI run, another shard or a finished fine-tune may register one at any time. The catalog
re-reads the registered models at most every `REFRESH_S` seconds, in the background, so a
model registered anywhere is selectable everywhere within seconds without any answer
waiting on it; asking for a name it does not know makes it look at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chains.registry import Lineage, ModelRegistry, ModelSpec
from core.errors import ConfigError, NotFound, StorageUnavailable
from store.db import failure_reason, is_outage
from store.repositories import ModelRepository

log = logging.getLogger(__name__)

# How stale another process's registrations may look here.
REFRESH_S = 5.0


class NameTaken(ConfigError):
    """A model name already in use; `replaceable` when a registered model holds it.

    A configured or built-in model is never replaced at run time: its file says what it is.
    """

    def __init__(self, message: str, *, replaceable: bool) -> None:
        super().__init__(message)
        self.replaceable = replaceable


class ModelCatalog:
    """The registry plus the models registered at run time, refreshed as they change."""

    def __init__(
        self,
        registry: ModelRegistry,
        sessions: async_sessionmaker[AsyncSession],
        *,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.refresh_s = refresh_s
        self.clock = clock
        self._fresh_until = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read the registered models now and make the registry match them."""
        async with self.sessions() as session:
            rows = await ModelRepository(session).list()
        specs: list[ModelSpec] = []
        for row in rows:
            try:
                specs.append(ModelSpec(**{**row.spec, "name": row.name, "origin": "database"}))
            except (ValidationError, TypeError) as exc:
                log.warning("skipping registered model %s: %s", row.name, exc)
        for name, why in self.registry.sync_registered(specs).items():
            log.warning("skipping registered model %s: %s", name, why)
        self._fresh_until = self.clock() + self.refresh_s

    def keep_fresh(self) -> None:
        """Start a background refresh if the last one is older than `refresh_s` (never waits)."""
        if self.clock() < self._fresh_until or (
            self._refreshing is not None and not self._refreshing.done()
        ):
            return
        self._fresh_until = self.clock() + self.refresh_s  # one refresh at a time, even if it fails
        self._refreshing = asyncio.create_task(
            self._refresh_quietly(), name="switchboard-model-refresh"
        )

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the registry as it is still answers; the next refresh tries again
            log.warning("could not refresh the registered models", exc_info=True)

    async def get(self, name: str) -> ModelSpec:
        """The model called `name`; one registered elsewhere moments ago is found too."""
        self.keep_fresh()
        if name not in self.registry:
            try:
                await self.refresh()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning("could not look for newly registered models (%s)", failure_reason(exc))
        return self.registry.get(name)

    def all(self) -> list[ModelSpec]:
        """Every model that can be chosen, in definition order."""
        self.keep_fresh()
        return self.registry.all()

    def ensure_name_free(self, name: str, *, replace: bool = False) -> None:
        """Refuse a name the config (or the built-in registry) uses, or a registered one unless `replace`."""
        if name not in self.registry:
            return
        if self.registry.get(name).origin != "database":
            raise NameTaken(
                f"`{name}` is already a model in {self.registry.source}; choose another name.",
                replaceable=False,
            )
        if not replace:
            raise NameTaken(
                f"`{name}` is already a registered model; choose another name, or replace it.",
                replaceable=True,
            )

    async def register(
        self, spec: ModelSpec, created_by: str, *, replace: bool = False
    ) -> ModelSpec:
        """Register a run-time model for every process; `replace` lets it replace a registered one."""
        await self.refresh()
        self.ensure_name_free(spec.name, replace=replace)
        previous = self.registry.get(spec.name) if spec.name in self.registry else None
        if spec.lineage is None or spec.lineage.created_by is None:
            lineage = spec.lineage or Lineage()
            spec = spec.model_copy(
                update={"lineage": lineage.model_copy(update={"created_by": created_by})}
            )
        spec = self.registry.add(spec)  # checks its fallback before anything is stored
        stored = spec.model_dump(mode="json", exclude={"name", "origin"}, exclude_none=True)
        try:
            async with self.sessions() as session, session.begin():
                await ModelRepository(session).add(spec.name, stored, created_by=created_by)
        except BaseException as exc:
            # Not stored: this process must not offer it either.
            if previous is None:
                self.registry.remove(spec.name)
            else:
                self.registry.add(previous)
            if isinstance(exc, Exception) and is_outage(exc):
                raise StorageUnavailable(
                    f"`{spec.name}` could not be registered: the database cannot be written right now "
                    f"({failure_reason(exc)}). Try again in a moment."
                ) from exc
            raise
        return spec

    async def unregister(self, name: str) -> None:
        """Remove a run-time model everywhere; config and built-in models stay."""
        await self.refresh()
        self.registry.remove(name)  # refuses config models, the default, and fallbacks in use
        async with self.sessions() as session, session.begin():
            if not await ModelRepository(session).remove(name):
                raise NotFound(f"No registered model named '{name}'.")

    async def aclose(self) -> None:
        """Stop a refresh in flight."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            try:
                await self._refreshing
            except (asyncio.CancelledError, Exception):
                pass
