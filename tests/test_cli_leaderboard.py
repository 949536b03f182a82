"""`switchboard leaderboard`, run as a real subprocess on a database holding battles."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from migrations import upgrade_database
from store.db import create_engine, create_session_factory
from tests.fixtures.battles import add_answers, add_battle
from tests.test_cli import cli_env, fake_server, switchboard  # noqa: F401 (fixtures)

GUILD, CHANNEL = 5, 6


async def fill(data_dir: Path) -> None:
    """Battles in server 5 (channel 6 and 7) and a few 👍 on main."""
    url = f"sqlite+aiosqlite:///{data_dir / 'switchboard.db'}"
    await upgrade_database(url)
    engine = create_engine(url)
    rng = np.random.default_rng(1)
    try:
        async with create_session_factory(engine)() as session, session.begin():
            for number in range(90):
                a, b = [("main", "backup"), ("backup", "solo"), ("main", "solo")][number % 3]
                outcome = "a" if rng.random() < 0.75 else ("tie" if rng.random() < 0.3 else "b")
                channel = CHANNEL if number < 60 else 7
                await add_battle(session, a, b, [outcome], guild_id=GUILD, channel_id=channel)
            await add_battle(session, "tiny", "solo", ["a"], guild_id=GUILD, channel_id=CHANNEL)
            await add_answers(
                session,
                "main",
                [400.0, 800.0],
                guild_id=GUILD,
                channel_id=CHANNEL,
                cost_usd=0.001,
                votes=[1, 1, -1],
            )
    finally:
        await engine.dispose()


def test_leaderboard_json_table_and_chart(
    cli_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    data_dir = Path(cli_env["SWITCHBOARD_DATA_DIR"])
    data_dir.mkdir(parents=True)
    asyncio.run(fill(data_dir))

    proc = switchboard(cli_env, "leaderboard", "--guild", str(GUILD), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_model = {row["model"]: row for row in rows}
    assert [row["model"] for row in rows[:3]] == ["main", "backup", "solo"]
    main = by_model["main"]
    assert main["rank"] == 1 and main["ranked"] and main["battles"] == 60
    assert main["rating_low"] <= main["rating"] <= main["rating_high"]
    assert (main["up"], main["down"]) == (2, 1)
    assert main["median_latency_ms"] == 600.0
    assert main["cost_per_1k_answers_usd"] == 1.0
    assert main["blended_price_per_1m"] == 1.25  # 3:1 of $1 in and $2 out
    tiny = by_model["tiny"]
    assert tiny["rank"] is None and not tiny["ranked"] and tiny["battles"] == 1
    assert all(row["scope"] == "server" and row["min_battles"] == 20 for row in rows)

    channel = switchboard(
        cli_env, "leaderboard", "--guild", str(GUILD), "--channel", str(CHANNEL), "--json"
    )
    assert channel.returncode == 0, channel.stderr
    assert json.loads(channel.stdout.splitlines()[0])["battles"] == 40  # 60 of the 90 are here

    chart = tmp_path / "board.png"
    wide = {**cli_env, "COLUMNS": "160"}
    table = switchboard(wide, "leaderboard", "--guild", str(GUILD), "--out", str(chart))
    assert table.returncode == 0, table.stderr
    assert "Leaderboard" in table.stdout and "#1" in table.stdout
    assert "unranked (1 battle)" in table.stdout
    assert "Davidson" in table.stdout
    image = Image.open(io.BytesIO(chart.read_bytes()))
    assert image.format == "PNG" and image.width > 500


def test_an_empty_leaderboard_says_where_battles_come_from(
    cli_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    proc = switchboard(cli_env, "leaderboard")
    assert proc.returncode == 0, proc.stderr
    assert "/arena" in proc.stdout
    chart = switchboard(cli_env, "leaderboard", "--out", str(tmp_path / "x.png"))
    assert chart.returncode == 1
    assert chart.stderr.strip().splitlines() == [
        f"Nothing to chart yet (no battles and no votes here), so {tmp_path / 'x.png'} was not written."
    ]
