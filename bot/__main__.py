"""`python -m bot` is the `switchboard` command."""

from bot.cli import app

app()
