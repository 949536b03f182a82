"""export: `switchboard export --format openai-chat` over 1,000,000 logged messages.

The log is made fast (plain sqlite3 bulk inserts into a migrated SQLite file in a
temporary folder): 100,000 conversations of 5 turns, each answer stored with the exact
messages it was sent (system prompt and the history so far, as the service logs them),
in 40 channels of one server with 2,000 members; 60% of the answers liked, 15% disliked,
the rest unrated; 1% of the prompts carry an e-mail address or a phone number, 1% a
mention; 20 people opted out. The export runs with --include-unrated (the most work:
nearly every answer becomes an example) and redaction on.

The baseline is a bare SELECT of the same 1,000,000 rows through the same engine
(SQLAlchemy, aiosqlite, the JSON column decoded), plus one json.dumps per row. Both
read every logged message once (the export reads each prompt through its answer's join),
so the ratio compares the rates at which they get through the same log:
(messages per second exporting) / (rows per second for SELECT + json.dumps), which is the
baseline's time over the export's. Each side runs in its own process, so its peak memory
(the maximum resident set size) is its own; the export also runs on the first 10% of the
log, to show that its memory does not grow with the log.

Last line: `export: ratio X (goal >= 0.5)`; also printed: the peak memory (goal: flat,
under 300 MB).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench._corpus import WORDS
from bench._support import REPO

CONVERSATIONS = int(
    os.environ.get("BENCH_EXPORT_CONVERSATIONS", "100000")
)  # smaller for a quick look
TURNS = 5
MESSAGES = CONVERSATIONS * TURNS * 2
MEMBERS = 2_000
CHANNELS = 40
OPTED_OUT = 20
GUILD = 1
GOAL = 0.5
MEMORY_GOAL_MB = 300
SYSTEM = (
    "You are Switchboard, a helpful assistant in a Discord server. Answer clearly and keep it "
    "concise: a few sentences or a short list unless asked for more."
)
START = datetime(2024, 1, 1, tzinfo=UTC)


def _sentences(rng: random.Random, count: int, low: int, high: int) -> list[str]:
    return [
        " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."
        for _ in range(count)
    ]


def seed(path: Path) -> None:
    """Fill the migrated SQLite file at `path` with the log described above."""
    rng = random.Random(13)
    questions = _sentences(rng, 20_000, 6, 30)
    replies = _sentences(rng, 20_000, 15, 70)
    extras = [
        " Write to me at {name}@example.com.",
        " My number is +1 650-253-{n:04d}.",
        " Ask <@{id}> about it.",
    ]
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    # Bulk loading is quicker without the indexes: drop them, put them back afterwards
    # exactly as the migrations made them.
    indexes = [
        sql
        for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name "
            "IN ('messages', 'message_inputs', 'votes', 'conversations')"
        )
    ]
    for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name "
        "IN ('messages', 'message_inputs', 'votes', 'conversations')"
    ).fetchall():
        db.execute(f'DROP INDEX "{name}"')
    columns = (
        "id, conversation_id, parent_id, role, kind, content, author_id, author_name, guild_id, "
        "channel_id, created_at, model_name, provider, provider_model, system_prompt, "
        "request_messages, status, source_ids"
    )
    insert_message = f"INSERT INTO messages ({columns}) VALUES ({', '.join('?' * 18)})"
    insert_input = "INSERT INTO message_inputs (answer_id, position, input_id) VALUES (?, ?, ?)"
    insert_vote = (
        "INSERT INTO votes (id, answer_id, voter_id, voter_name, value, source, guild_id, "
        "channel_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'button', ?, ?, ?, ?)"
    )
    system_json = json.dumps({"role": "system", "content": SYSTEM})
    counter = 0

    def next_id() -> str:
        nonlocal counter
        counter += 1
        return f"{counter:032x}"

    conversations, messages, inputs, votes = [], [], [], []
    tick = 0
    for c in range(CONVERSATIONS):
        cid = next_id()
        channel = 100 + c % CHANNELS
        author = 1000 + rng.randrange(MEMBERS)
        name = f"member{author}"
        when = (START + timedelta(seconds=tick)).strftime("%Y-%m-%d %H:%M:%S.%f")
        conversations.append((cid, GUILD, channel, None, author, "discord", when))
        sent = [system_json]  # the request so far, as JSON texts of its messages
        history: list[str] = []  # ids of the history turns
        parent = None
        for _ in range(TURNS):
            question = rng.choice(questions)
            if rng.random() < 0.03:
                question += rng.choice(extras).format(
                    name=name, n=rng.randrange(10_000), id=10**17 + rng.randrange(10**17)
                )
            reply = rng.choice(replies)
            prompt_id, answer_id = next_id(), next_id()
            at = START + timedelta(seconds=tick)
            tick += 7
            stamp = at.strftime("%Y-%m-%d %H:%M:%S.%f")
            later = (at + timedelta(microseconds=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
            messages.append(
                (prompt_id, cid, parent, "user", "prompt", question, author, name, GUILD, channel,
                 stamp, None, None, None, None, None, None, None)
            )  # fmt: skip
            sent.append(json.dumps({"role": "user", "content": question}))
            messages.append(
                (answer_id, cid, prompt_id, "assistant", "answer", reply, None, None, GUILD,
                 channel, later, "fake", "openai-compatible", "fake-model", SYSTEM,
                 "[" + ", ".join(sent) + "]", "ok", "[]")
            )  # fmt: skip
            inputs.extend(
                (answer_id, position, input_id)
                for position, input_id in enumerate([*history, prompt_id])
            )
            roll = rng.random()
            if roll < 0.75:
                voter = 1000 + rng.randrange(MEMBERS)
                votes.append(
                    (next_id(), answer_id, voter, f"member{voter}", 1 if roll < 0.6 else -1,
                     GUILD, channel, later, later)
                )  # fmt: skip
            sent.append(json.dumps({"role": "assistant", "content": reply}))
            history += [prompt_id, answer_id]
            parent = answer_id
        if len(messages) >= 50_000:
            _flush(
                db,
                conversations,
                messages,
                inputs,
                votes,
                insert_message,
                insert_input,
                insert_vote,
            )
            conversations, messages, inputs, votes = [], [], [], []
    _flush(db, conversations, messages, inputs, votes, insert_message, insert_input, insert_vote)
    db.executemany(
        "INSERT INTO people (user_id, opted_out, changed_at) VALUES (?, 1, ?)",
        [
            (1000 + i * (MEMBERS // OPTED_OUT), "2024-06-01 00:00:00.000000")
            for i in range(OPTED_OUT)
        ],
    )
    for sql in indexes:
        db.execute(sql)
    db.commit()
    db.execute("ANALYZE")
    db.close()


def _flush(
    db, conversations, messages, inputs, votes, insert_message, insert_input, insert_vote
) -> None:  # noqa: ANN001
    db.executemany(
        "INSERT INTO conversations (id, guild_id, channel_id, thread_id, started_by, origin, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        conversations,
    )
    db.executemany(insert_message, messages)
    db.executemany(insert_input, inputs)
    db.executemany(insert_vote, votes)
    db.commit()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _baseline(url: str) -> dict[str, float]:
    from sqlalchemy import select

    from store.db import create_engine
    from store.models import Message, table_of

    engine = create_engine(url)
    rows = 0
    started = time.perf_counter()
    async with engine.connect() as connection:
        result = await connection.stream(select(table_of(Message)).execution_options(yield_per=500))
        async for batch in result.partitions(500):
            for row in batch:
                json.dumps(row._asdict(), default=str)
                rows += 1
    seconds = time.perf_counter() - started
    await engine.dispose()
    return {"rows": rows, "seconds": seconds, "peak_mb": _peak_mb()}


async def _export(url: str, folder: Path, until: str | None) -> dict[str, float]:
    from bench._support import bench_settings
    from bot.app import open_app
    from store.export import ExportOptions

    with bench_settings("http://127.0.0.1:9/v1", database_url=url) as settings:
        async with open_app(settings, knowledge=False, migrate=False) as sb:
            options = ExportOptions(
                "openai-chat",
                include_unrated=True,
                until=datetime.fromisoformat(until) if until else None,
            )
            started = time.perf_counter()
            summary = await sb.exporter.run(options, folder / "bench.jsonl")
            seconds = time.perf_counter() - started
    return {
        "examples": summary.examples,
        "candidates": summary.candidates,
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "bytes": summary.files[0].bytes,
        "removed": {k: v for k, v in summary.removed.items() if v},  # type: ignore[dict-item]
    }


def _child(phase: str, url: str, folder: Path, until: str | None = None) -> dict[str, float]:
    """Run one phase in its own process: its peak memory is its own."""
    command = [sys.executable, "-m", "bench.export", phase, url, str(folder), until or ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 2:  # a phase, in a child process
        phase, url, folder, until = sys.argv[1:5]
        if phase == "baseline":
            result = asyncio.run(_baseline(url))
        else:
            result = asyncio.run(_export(url, Path(folder), until or None))
        print(json.dumps(result))
        return 0

    from migrations import upgrade_database

    with tempfile.TemporaryDirectory(prefix="switchboard-bench-export-") as tmp:
        folder = Path(tmp)
        path = folder / "log.db"
        url = f"sqlite+aiosqlite:///{path}"
        asyncio.run(upgrade_database(url))
        started = time.perf_counter()
        seed(path)
        print(
            f"logged {MESSAGES:,} messages in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 2**20:.0f} MB)"
        )
        base = _child("baseline", url, folder)
        tenth = (START + timedelta(seconds=7 * CONVERSATIONS * TURNS // 10)).isoformat()
        small = _child("export", url, folder, tenth)
        full = _child("export", url, folder)
        base_rate = base["rows"] / base["seconds"]
        export_rate = MESSAGES / full["seconds"]
        print(
            f"baseline: SELECT + json.dumps of {base['rows']:,} rows in {base['seconds']:.1f} s "
            f"({base_rate:,.0f} rows/s), peak memory {base['peak_mb']:.0f} MB"
        )
        print(
            f"export (first 10%): {small['examples']:,} examples from {small['candidates']:,} "
            f"answers in {small['seconds']:.1f} s, peak memory {small['peak_mb']:.0f} MB"
        )
        print(
            f"export: {full['examples']:,} examples ({full['bytes'] / 2**20:.0f} MB) from "
            f"{MESSAGES:,} messages in {full['seconds']:.1f} s ({full['examples'] / full['seconds']:,.0f} "
            f"examples/s, {export_rate:,.0f} messages/s), peak memory {full['peak_mb']:.0f} MB "
            f"(goal: flat, under {MEMORY_GOAL_MB} MB); left out: {full['removed']}"
        )
    print(f"export: ratio {export_rate / base_rate:.2f} (goal >= {GOAL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
