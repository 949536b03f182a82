"""User-facing errors: the one exception type whose message a person may see.

Core code raises these with a message a person can act on; the adapters (Discord,
terminal) show the message as it is. Anything else is a bug: it is logged with its
traceback and the user gets a short apology with an error id.
"""

from __future__ import annotations

import logging
import secrets


class UserError(Exception):
    """An error whose message is meant for the person who caused it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(UserError):
    """The configuration (TOML file or environment) is wrong or incomplete."""


class PermissionDenied(UserError):
    """The person may not do this here."""


class StorageUnavailable(UserError):
    """The database cannot be written (or read) right now; nothing was changed."""


class NotFound(UserError):
    """A named thing (model, document, conversation) does not exist.

    `detail` says what is missing; `listing` names the list to look in ("model list"),
    so each adapter can point to its own command for it. `message` points to the slash
    command (`/model list`), which Discord and the terminal chat both have.
    """

    def __init__(self, detail: str, listing: str | None = None) -> None:
        super().__init__(f"{detail} See /{listing}." if listing else detail)
        self.detail = detail
        self.listing = listing

    def pointing_to(self, command: str) -> str:
        """The message with `command` (e.g. "`switchboard models list`") as the place to look."""
        return f"{self.detail} See {command}."


class Unavailable(UserError):
    """Something the bot relies on (an embeddings endpoint) fails for now; later may work."""


def report_unexpected(logger: logging.Logger, exc: BaseException, what: str) -> str:
    """Log an unexpected error with its traceback; return the short id to show a user."""
    error_id = secrets.token_hex(4)
    logger.error("unexpected error %s while %s", error_id, what, exc_info=exc)
    return error_id


def apology(error_id: str) -> str:
    """The message a user sees for an unexpected error."""
    return f"Sorry, something went wrong on our side (error id `{error_id}`). The people running the bot can look it up in the logs."
