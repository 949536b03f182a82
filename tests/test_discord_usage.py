"""Budgets in Discord: a message over the budget is told why, and `/usage` says where one stands.

The real bot and service in simcord, on the fake model server; `main` (the default) is
priced so that an answer costs about two cents, with a $0.03 daily budget per person
and $1 per server.
"""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.discord import World
from tests.test_budgets import priced
from tests.test_discord_chat import bot_messages


@pytest.fixture
def service_settings(service_settings: Settings) -> Settings:
    return priced(service_settings, person_daily_budget_usd=0.03, server_daily_budget_usd=1.0)


async def test_over_the_budget_a_message_is_told_why_and_usage_shows_the_totals(
    world: World, fake_openai: FakeOpenAI
) -> None:
    usage = await world.bob.slash(world.channel, "usage")
    assert usage.ephemeral and usage.response.content.startswith(
        "Today (UTC), on paid models, you spent $0.00 of your $0.03 and this server spent "
        "$0.00 of its $1.00 daily budget. Budgets renew at 00:00 UTC (in "
    )
    me = world.bot.user.mention
    for n in range(2):
        await world.alice.send(world.channel, f"{me} question {n}")
    asked = len(fake_openai.chat_requests)
    await world.alice.send(world.channel, f"{me} one more question")
    assert len(fake_openai.chat_requests) == asked  # the model was not asked
    refused = bot_messages(world)[-1]
    assert refused.content.startswith("⚠️ You have spent $0.0")
    assert "of your $0.03 daily budget for paid models; it renews at 00:00 UTC (in " in (
        refused.content
    )
    assert refused.content.endswith("Models without a price, like the local ones, still answer.")
    assert not refused.components  # nothing to rate

    # Bob has his own budget; the server's total holds both.
    await world.bob.send(world.channel, f"{me} my question")
    assert not bot_messages(world)[-1].content.startswith("⚠️")
    shown = (await world.alice.slash(world.channel, "usage")).response.content
    assert shown.startswith("Today (UTC), on paid models, you spent $0.0")
    assert "of your $0.03 and this server spent $0.0" in shown and "of its $1.00" in shown
