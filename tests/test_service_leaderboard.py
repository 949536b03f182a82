"""The leaderboard through the service: battles in the log become ratings beside 👍, speed and cost."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import App, open_app
from bot.charts import leaderboard_chart
from bot.service.leaderboard import Leaderboard
from core.messages import Author, Place
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI, FakeRequest, echo_reply
from tests.fixtures.battles import add_answers, add_battle

GUILD, CHANNEL, OTHER_CHANNEL = 70, 71, 72
# The config's models (tests/fixtures/service.py): main has a price, the others are free.
STRONG, MIDDLE, WEAK = "main", "backup", "solo"


async def fill(app: App, battles: list[tuple[str, str, str, int]]) -> None:
    """Battles (model A, model B, outcome, channel), one vote each."""
    async with app.sessions() as session, session.begin():
        for model_a, model_b, outcome, channel in battles:
            await add_battle(
                session, model_a, model_b, [outcome], guild_id=GUILD, channel_id=channel
            )


def tournament(rounds: int, channel: int = CHANNEL) -> list[tuple[str, str, str, int]]:
    """main beats backup beats solo, mostly; some ties; `rounds` of each pairing."""
    rng = np.random.default_rng(3)
    games: list[tuple[str, str, str, int]] = []
    for _ in range(rounds):
        for a, b, p_a in ((STRONG, MIDDLE, 0.7), (MIDDLE, WEAK, 0.7), (STRONG, WEAK, 0.85)):
            draw = rng.random()
            outcome = "tie" if draw > 0.9 else ("a" if draw < p_a * 0.9 else "b")
            # Sides swap, as the arena draws them.
            games.append(
                (a, b, outcome, channel)
                if rng.random() < 0.5
                else (b, a, {"a": "b", "b": "a"}.get(outcome, outcome), channel)
            )
    return games


@pytest.fixture
async def board_app(service_settings: Settings) -> App:
    settings = service_settings.model_copy(update={"leaderboard_min_battles": 10})
    async with open_app(settings, knowledge=False) as app:
        yield app  # type: ignore[misc]


async def test_a_server_leaderboard_rates_ranks_and_describes_each_model(board_app: App) -> None:
    await fill(board_app, tournament(40))
    # A newcomer with too few battles, and a model that only answered (no battles).
    await fill(board_app, [("tiny", WEAK, "a", CHANNEL)] * 3)
    async with board_app.sessions() as session, session.begin():
        await add_answers(
            session,
            STRONG,
            [100.0, 300.0, 200.0],
            guild_id=GUILD,
            channel_id=CHANNEL,
            cost_usd=0.002,
            votes=[1, 1, 1, -1],
        )
        await add_answers(session, "tiny-then-big", [50.0], guild_id=GUILD, channel_id=CHANNEL)

    board = await board_app.service.leaderboard("server", guild_id=GUILD)

    assert [e.model for e in board.entries] == [STRONG, MIDDLE, WEAK, "tiny", "tiny-then-big"]
    strong = board.get(STRONG)
    assert strong is not None and strong.rating is not None
    assert strong.rank == 1 and strong.battles == 80
    assert board.get(WEAK).rank == 3  # type: ignore[union-attr]
    tiny = board.get("tiny")
    assert tiny is not None and tiny.rank is None and tiny.battles == 3  # unranked (3 battles)
    only_answered = board.get("tiny-then-big")
    assert only_answered is not None and only_answered.rating is None
    assert only_answered.answers == 1 and only_answered.median_latency_ms == 50.0
    # Beside the rating: 👍 share, median latency, cost per 1,000 answers, price per 1M.
    assert (strong.up, strong.down, strong.share_up) == (3, 1, 0.75)
    assert strong.median_latency_ms == 200.0
    assert strong.cost_per_1k_answers == pytest.approx(2.0)
    assert strong.price is not None and strong.price.blended == pytest.approx(0.75 * 1 + 0.25 * 2)
    assert board.get(MIDDLE).price.free  # type: ignore[union-attr]
    assert board.min_battles == 10 and board.battles == 123
    assert "Davidson" in board.method and "1,000 bootstrap" in board.method


async def test_scopes_and_what_they_need(board_app: App) -> None:
    await fill(board_app, tournament(10) + tournament(5, channel=OTHER_CHANNEL))
    service = board_app.service
    channel = await service.leaderboard("channel", guild_id=GUILD, channel_id=CHANNEL)
    server = await service.leaderboard("server", guild_id=GUILD)
    everywhere = await service.leaderboard("global")
    assert (channel.battles, server.battles, everywhere.battles) == (30, 45, 45)
    assert channel.channel_id == CHANNEL and server.channel_id is None
    elsewhere = await service.leaderboard("server", guild_id=GUILD + 1)
    assert elsewhere.entries == () and elsewhere.battles == 0
    with pytest.raises(ValueError, match="channel"):
        await service.leaderboard("channel", guild_id=GUILD)
    with pytest.raises(ValueError, match="server"):
        await service.leaderboard("server")


async def test_a_fit_is_remembered_until_a_vote_changes_it(board_app: App) -> None:
    await fill(board_app, tournament(8))
    first = await board_app.service.leaderboard("server", guild_id=GUILD)
    again = await board_app.service.leaderboard("server", guild_id=GUILD)
    assert again.fit is first.fit  # the same verdicts: not fitted again
    await fill(board_app, [(WEAK, STRONG, "a", CHANNEL)])
    changed = await board_app.service.leaderboard("server", guild_id=GUILD)
    assert changed.fit is not first.fit and changed.battles == first.battles + 1


async def test_arena_votes_are_what_the_leaderboard_fits(
    board_app: App, fake_openai: FakeOpenAI
) -> None:
    """Battles and votes through the arena: a, b and tie count; both-bad and invalid do not."""
    service = board_app.service
    place, moderator = Place(GUILD, CHANNEL), Author(900, "mod")
    await service.set_arena_pool(place, "channel", [STRONG, WEAK], moderator)
    for number in range(15):
        battle = await service.battle(place, Author(number, f"p{number}"), f"question {number}")
        # The first voter finds both bad (which reveals the models, and compares nothing).
        seen = await service.battle_vote(battle.id, Author(100 + number, "v"), "bad")
        assert seen.counted
        if number == 14:
            continue  # a battle with only a both-bad verdict
        strong_side, weak_side = ("a", "b") if seen.model_a == STRONG else ("b", "a")
        outcome = {0: "tie", 1: weak_side}.get(number, strong_side)
        await service.battle_vote(battle.id, Author(200 + number, "w"), outcome)

    def leaky(request: FakeRequest) -> str:
        return ("Solo here. " if request.model == "fake-solo" else "") + echo_reply(request)

    fake_openai.reply = leaky
    leaked = await service.battle(place, Author(99, "p"), "who are you?")
    assert not (await service.battle_vote(leaked.id, Author(300, "v"), "a")).counted
    await board_app.writer.drain()

    board = await service.leaderboard("channel", guild_id=GUILD, channel_id=CHANNEL)
    strong, weak = board.get(STRONG), board.get(WEAK)
    assert strong is not None and weak is not None
    assert strong.rating is not None and weak.rating is not None
    # 14 battles with a counted verdict each; the both-bad ones and the invalid one left out.
    assert (board.battles, board.fit.comparisons) == (14, 14)
    assert (strong.rating.wins, strong.rating.losses, strong.rating.ties) == (12, 1, 1)
    assert (weak.rating.wins, weak.rating.losses, weak.rating.ties) == (1, 12, 1)
    assert strong.rank == 1 and weak.rank == 2 and strong.rating.rating > weak.rating.rating
    # Battle answers are answers: their latency is on the board.
    assert strong.answers == 16 and strong.median_latency_ms is not None


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_the_leaderboard_chart_is_a_real_png(board_app: App, tmp_path: Path) -> None:
    await fill(board_app, tournament(20))
    async with board_app.sessions() as session, session.begin():
        await add_answers(session, STRONG, [1.0], guild_id=GUILD, channel_id=CHANNEL, votes=[1])
    board = await board_app.service.leaderboard("server", guild_id=GUILD)
    image = png(leaderboard_chart(board))
    assert image.format == "PNG" and image.width >= 1000 and image.height >= 300
    # The rating points are drawn in blurple: the chart is not blank.
    colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert any(rgb == (0x58, 0x65, 0xF2) for _, rgb in colours)
    (tmp_path / "leaderboard.png").write_bytes(leaderboard_chart(board))


async def test_without_battles_the_chart_shows_the_thumbs_and_with_nothing_it_says_so(
    board_app: App,
) -> None:
    async with board_app.sessions() as session, session.begin():
        await add_answers(session, STRONG, [1.0], guild_id=GUILD, channel_id=CHANNEL, votes=[1, -1])
    liked = await board_app.service.leaderboard("server", guild_id=GUILD)
    assert png(leaderboard_chart(liked)).format == "PNG"
    nothing = await board_app.service.leaderboard("server", guild_id=GUILD + 5)
    assert isinstance(nothing, Leaderboard)
    with pytest.raises(ValueError, match="nothing|no model"):
        leaderboard_chart(nothing)
