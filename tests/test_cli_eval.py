"""`switchboard eval`, run as a real subprocess: the report files, an interrupted run resumed,
and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes.openai_server import FakeOpenAI
from tests.test_cli import REPO, cli_env, fake_server, switchboard  # noqa: F401 (fixtures)
from tests.test_service_evaluate import CAPITALS, replies

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "headless Chromium is not installed (Debian's `chromium` package; scripts/test installs "
    "it when it can), so the HTML report's rendering is not checked"
)


def write_dataset(path: Path) -> Path:
    rows = [
        {"id": country, "prompt": f"What is the capital of {country}?", "reference": city}
        for country, city in CAPITALS.items()
    ]
    rows.append({"id": "greet", "prompt": "Say hello.", "regex": r"(?i)\bhello\b"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def eval_env(cli_env: dict[str, str], fake_server: FakeOpenAI) -> dict[str, str]:  # noqa: F811
    fake_server.reply = replies
    fake_server.fail_model("fake-tiny", 503)
    return {**cli_env, "COLUMNS": "160"}


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_eval_writes_results_summary_charts_and_a_report_that_renders(
    eval_env: dict[str, str], tmp_path: Path
) -> None:
    data, out = write_dataset(tmp_path / "data.jsonl"), tmp_path / "run"
    proc = switchboard(
        eval_env, "eval", str(data), "--models", "main,solo,tiny", "--out", str(out),
        "--judge", "backup",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Evaluation: 5 rows" in proc.stdout and "100.0%" in proc.stdout
    assert "5 calls failed" in proc.stdout and "--retry-failed" in proc.stdout
    assert proc.stderr.strip() == ""  # the failures' warnings went to the log file

    with (out / "examples.csv").open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 15 and {r["model"] for r in rows} == {"main", "solo", "tiny"}
    paris = next(r for r in rows if r["id"] == "France" and r["model"] == "main")
    assert (paris["reply"], paris["exact"], paris["contains"]) == ("Paris.", "1.0", "1.0")
    assert next(r for r in rows if r["model"] == "tiny")["error"].endswith(
        "(HTTP 503). Try again shortly."
    )
    assert len((out / "examples.jsonl").read_text().splitlines()) == 15
    summary = {s["model"]: s for s in json.loads((out / "summary.json").read_text())["summary"]}
    assert summary["main"]["exact"] == 1.0 and summary["solo"]["exact"] == 0.0
    assert summary["main"]["judge"] == pytest.approx(0.9) and summary["tiny"]["failed"] == 5
    assert summary["main"]["cost_usd"] > 0 and summary["main"]["median_latency_ms"] > 0
    for chart in ("scores.png", "speed_cost.png"):
        image = Image.open(io.BytesIO((out / chart).read_bytes()))
        assert image.format == "PNG" and image.width > 400

    html = (out / "report.html").read_text(encoding="utf-8")
    # Self-contained: the charts are inside, nothing is fetched.
    assert html.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(https?:)?//', html)

    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    page = out / "report.html"
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    summary_table = dom.stdout.split('id="summary"')[1].split("</table>")[0]
    for model in ("main", "solo", "tiny"):
        assert f"<td>{model}</td>" in summary_table
    assert re.search(r'class="num best" data-score="exact">100.0%</td>', summary_table)
    assert 'data-score="judge">90.0%</td>' in summary_table
    assert "(HTTP 503)" in dom.stdout.split('id="failures"')[1]
    shot = tmp_path / "report.png"
    taken = chromium("--window-size=1280,1800", f"--screenshot={shot}", page.as_uri())
    assert taken.returncode == 0, taken.stderr
    picture = Image.open(shot).convert("RGB")
    colours = {rgb for _, rgb in picture.getcolors(maxcolors=10_000_000) or []}
    assert (0x58, 0x65, 0xF2) in colours  # the charts' bars: the images were decoded and drawn


def test_a_run_stopped_by_sigterm_resumes_with_what_is_missing(
    eval_env: dict[str, str],
    fake_server: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    data, out = write_dataset(tmp_path / "data.jsonl"), tmp_path / "run"
    fake_server.slow_model("fake-solo", 2.0)
    command = [
        sys.executable, "-m", "bot", "eval", str(data), "--models", "main,solo",
        "--out", str(out), "--concurrency", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=eval_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    results = out / "results.jsonl"
    try:
        deadline = time.monotonic() + 90
        while not (results.exists() and len(results.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run recorded nothing"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Stopped. What finished is kept in" in stderr and "run the same command again" in stderr
    kept = len(results.read_text().splitlines())
    assert 2 <= kept < 10

    fake_server.reset()
    fake_server.reply = replies
    again = switchboard(eval_env, *command[3:])
    assert again.returncode == 0, again.stderr
    assert len(fake_server.chat_requests) == 10 - kept  # only what the first run had not done
    assert len(results.read_text().splitlines()) == 10
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_eval_mistakes_are_one_line(eval_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"reference": "no prompt"}\n')
    for args, message in [
        ([str(bad), "--models", "main"], f'{bad} line 2: no "prompt" (each row needs a "prompt" string).'),
        ([str(tmp_path / "none.jsonl"), "--models", "main"], f"The dataset {tmp_path / 'none.jsonl'} does not exist."),
        ([str(write_dataset(tmp_path / "d.jsonl")), "--models", "main", "--judge", "backup"],
         "A pairwise judge compares models: name two or more, or use --judge-mode rubric."),
        ([str(tmp_path / "d.jsonl"), "--models", "main,nope"], None),
        (["--models", "main"], "Give the dataset to evaluate on (switchboard eval DATASET.jsonl ...), or --from-log to take the prompts from the log."),
        ([str(tmp_path / "d.jsonl"), "--models", "main", "--from-log"], "Give a dataset or --from-log, not both."),
        (["--models", "main", "--from-log", "--guild", "5"],
         "No logged prompts match those filters: widen --guild, --channel, --log-model, --since or --until."),
        (["--models", "main", "--from-log", "--since", "May"],
         "--since 'May' is not an ISO date: write it like 2024-05-01 or 2024-05-01T14:30."),
    ]:  # fmt: skip
        proc = switchboard(eval_env, "eval", *args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 1, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        if message is not None:
            assert lines[0] == message
        else:
            assert "nope" in lines[0] and "switchboard models list" in lines[0]


def test_eval_from_the_log_tries_models_on_real_traffic(
    eval_env: dict[str, str],
    fake_server: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Real traffic: two conversations in one channel, one in another server.
    for guild, lines in [("10", ["What is the capital of France?", "And of Italy?"]),
                         ("10", ["What is the capital of Spain?"]),
                         ("99", ["What is the capital of Japan?"])]:  # fmt: skip
        chat = switchboard(
            eval_env, "chat", "--json", "--guild", guild, "--channel", "20",
            stdin="\n".join(lines) + "\n",
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr
    out = tmp_path / "run"
    args = ["eval", "--from-log", "--guild", "10", "--models", "main,solo", "--out", str(out)]
    proc = switchboard(eval_env, *args)
    assert proc.returncode == 0, proc.stderr
    assert f"3 prompts from the log (all that match), written to {out / 'dataset.jsonl'}." in (
        proc.stderr
    )
    taken = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in taken] == [
        "What is the capital of France?",
        "And of Italy?",
        "What is the capital of Spain?",
    ]
    assert [turn["role"] for turn in taken[1]["history"]] == ["user", "assistant"]
    assert "Evaluation: 3 rows" in proc.stdout
    with (out / "examples.csv").open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)
    # Resumed: the same command asks nothing again; --limit keeps the newest.
    asked = len(fake_server.chat_requests)
    again = switchboard(eval_env, *args, "--limit", "1")
    assert again.returncode == 0, again.stderr
    assert "1 prompt from the log (the newest 1 of 3)" in again.stderr
    assert len(fake_server.chat_requests) == asked
