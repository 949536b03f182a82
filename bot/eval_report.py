"""The files an evaluation leaves in its folder, besides its own results.jsonl.

- `examples.csv`, `examples.jsonl`: one row per dataset row and model: the prompt, the
  reference, the answer or its error, each score, latency, tokens and cost;
- `summary.json`, `summary.csv`: one row per model;
- `scores.png`, `speed_cost.png`: the charts (`bot.charts`);
- `report.html`: one self-contained page (inline CSS, the charts as data URIs, no script
  and nothing fetched) that a person opens in a browser.

Blocking: the CLI calls `write_report` in a worker thread.
"""

from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

from bot.charts import score_chart, speed_cost_chart
from bot.present import dollars, latency_text
from bot.service.evaluate import SCORES, EvalResults, ModelSummary

# The report shows this many rows in full; every row is in examples.csv and .jsonl.
HTML_ROWS = 300
SCORE_WORDS = {"exact": "exact match", "contains": "contains", "regex": "regex", "judge": "judge"}


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What `write_report` wrote."""

    html: Path
    examples_csv: Path
    examples_jsonl: Path
    summary_json: Path
    summary_csv: Path
    charts: tuple[Path, ...]


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "–"


def summary_json(summary: ModelSummary) -> dict[str, Any]:
    """One model's summary as summary.json and summary.csv hold it."""
    return {
        "model": summary.model,
        "examples": summary.examples,
        "answered": summary.answered,
        "failed": summary.failed,
        **{name: summary.scores.get(name) for name in SCORES},
        **{f"{name}_over": summary.scored.get(name, 0) for name in SCORES},
        "judge_rating": summary.judge_rating,
        "median_latency_ms": summary.median_latency_ms,
        "p90_latency_ms": summary.p90_latency_ms,
        "median_ttft_ms": summary.median_ttft_ms,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "cost_usd": summary.cost_usd if summary.cost_known else None,
        "cost_per_1k_answers_usd": summary.cost_per_1k_answers,
    }


def example_rows(results: EvalResults) -> list[dict[str, Any]]:
    """One row per dataset row and model, as examples.csv and examples.jsonl hold them."""
    rows = []
    for row in results.rows:
        answer = row.answer
        call = answer.call if answer is not None else None
        rows.append(
            {
                "id": row.example.id,
                "model": row.model,
                "prompt": row.example.prompt,
                "reference": row.example.reference,
                "reply": answer.reply if answer is not None else None,
                "error": answer.error if answer is not None else "not asked yet",
                **{name: row.scores.get(name) for name in SCORES},
                "latency_ms": call.latency_ms if call else None,
                "ttft_ms": call.ttft_ms if call else None,
                "prompt_tokens": call.prompt_tokens if call else None,
                "completion_tokens": call.completion_tokens if call else None,
                "cost_usd": call.cost_usd if call else None,
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        if not rows:
            return
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
         max-width: 1200px; padding: 0 1rem; color: #1f2328; }
  h1 { font-size: 1.6rem; margin-bottom: .2rem; }
  h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
  .meta { color: #59636e; }
  table { border-collapse: collapse; width: 100%; margin: .8rem 0; }
  th, td { border: 1px solid #d0d7de; padding: .35rem .55rem; text-align: left; vertical-align: top; }
  th { background: #f6f8fa; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  .wide { overflow-x: auto; }
  .best { font-weight: 700; background: #dafbe1; }
  .failed { color: #cf222e; }
  .incomplete { background: #fff8c5; border: 1px solid #d4a72c; padding: .6rem .8rem; }
  .charts img { max-width: 100%; display: block; margin: .8rem 0; border: 1px solid #d0d7de; }
  pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 13px/1.4 ui-monospace, monospace; }
  .score { display: inline-block; margin: .25rem .3rem 0 0; padding: 0 .4rem; border-radius: .6rem;
           font-size: 12px; background: #eef1f4; }
  .score.yes { background: #dafbe1; } .score.no { background: #ffebe9; }
  details summary { cursor: pointer; color: #0969da; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ rows_count }} rows × {{ models|length }} models ({{ models|join(", ") }}){% if judge %};
judge: {{ judge }} ({{ judge_mode }}){% endif %}. Written {{ written }}.</p>
{% if not complete %}<p class="incomplete">This run is not finished: {{ missing }} calls are still to
make. Run the same command again to go on where it stopped.</p>{% endif %}

<h2>Summary</h2>
<div class="wide"><table id="summary">
<thead><tr><th>model</th><th class="num">answered</th><th class="num">failed</th>
{% for name in shown_scores %}<th class="num">{{ score_words[name] }}</th>{% endfor %}
<th class="num">median latency</th><th class="num">p90 latency</th><th class="num">tokens in / out</th>
<th class="num">cost</th><th class="num">per 1,000 answers</th></tr></thead>
<tbody>
{% for s in summaries %}<tr>
<td>{{ s.model }}</td><td class="num">{{ s.answered }}</td>
<td class="num{% if s.failed %} failed{% endif %}">{{ s.failed }}</td>
{% for name in shown_scores %}<td class="num{% if best[name] == s.model %} best{% endif %}" data-score="{{ name }}">{{ percent(s.scores[name]) }}</td>{% endfor %}
<td class="num">{{ latency(s.median_latency_ms) }}</td><td class="num">{{ latency(s.p90_latency_ms) }}</td>
<td class="num">{{ "{:,}".format(s.prompt_tokens) }} / {{ "{:,}".format(s.completion_tokens) }}</td>
<td class="num">{{ dollars(s.cost_usd) if s.cost_known else "–" }}</td>
<td class="num">{{ dollars(s.cost_per_1k_answers) or "–" }}</td>
</tr>{% endfor %}
</tbody>
</table></div>
<p class="meta">Scores are shares of the rows that have what they need (a reference for exact match
and contains, a pattern for regex); a failed answer scores 0.{% if judge and judge_mode == "pairwise" %}
Judge: the share of pairwise comparisons won, ties counting half, each pair judged in both orders.{% elif judge %}
Judge: the 1–10 rating, scaled to 0–100%.{% endif %}{% if judge %} The judge's own calls cost
{{ dollars(judge_cost) if judge_cost else "nothing" }}.{% endif %}</p>

<h2>Charts</h2>
<div class="charts">
{% for chart in charts %}<img alt="{{ chart.alt }}" src="{{ chart.src }}">{% endfor %}
</div>

{% if failures %}<h2>Failures</h2>
<table id="failures"><thead><tr><th>row</th><th>model</th><th>error</th></tr></thead><tbody>
{% for f in failures %}<tr><td>{{ f.id }}</td><td>{{ f.model }}</td><td class="failed">{{ f.error }}</td></tr>{% endfor %}
</tbody></table>{% endif %}

<h2>Rows</h2>
{% if hidden %}<p class="meta">The first {{ rows|length }} rows are shown; all {{ rows_count }} are in examples.csv.</p>{% endif %}
<table id="rows">
<thead><tr><th>row</th><th>prompt</th><th>reference</th>{% for m in models %}<th>{{ m }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rows %}<tr>
<td>{{ r.id }}</td><td><pre>{{ r.prompt }}</pre></td><td><pre>{{ r.reference or "" }}</pre></td>
{% for cell in r.cells %}<td>
{% if cell.error %}<span class="failed">{{ cell.error }}</span>{% else %}
{% if cell.long %}<details><summary>{{ cell.short }}</summary><pre>{{ cell.reply }}</pre></details>{% else %}<pre>{{ cell.reply }}</pre>{% endif %}{% endif %}
<div>{% for name, value in cell.scores %}<span class="score {{ 'yes' if value >= 0.5 else 'no' }}">{{ score_words[name] }} {{ percent(value) }}</span>{% endfor %}
{% if cell.latency %}<span class="score">{{ cell.latency }}</span>{% endif %}</div>
</td>{% endfor %}
</tr>{% endfor %}
</tbody>
</table>
</body>
</html>
"""


def render_html(
    results: EvalResults, charts: list[tuple[str, bytes]], title: str = "Evaluation"
) -> str:
    """The report page: summary, charts, failures and the rows, in one HTML document."""
    shown_scores = [
        name for name in SCORES if any(s.scores.get(name) is not None for s in results.summaries)
    ]
    best: dict[str, str | None] = {}
    for name in shown_scores:
        scored = [
            (s.scores[name], s.model) for s in results.summaries if s.scores[name] is not None
        ]
        top = max(scored, default=None, key=lambda item: item[0] or 0.0)
        best[name] = top[1] if top is not None and len(results.summaries) > 1 else None
    by_example: dict[str, dict[str, Any]] = {}
    failures = []
    for row in results.rows:
        entry = by_example.setdefault(
            row.example.id,
            {
                "id": row.example.id,
                "prompt": row.example.prompt,
                "reference": row.example.reference,
                "cells": [],
            },
        )
        answer = row.answer
        reply = answer.reply if answer is not None else ""
        error = answer.error if answer is not None else "not asked yet"
        if answer is not None and answer.error:
            failures.append({"id": row.example.id, "model": row.model, "error": answer.error})
        entry["cells"].append(
            {
                "reply": reply,
                "error": error,
                "long": len(reply) > 600,
                "short": reply[:200] + "…",
                "scores": [(n, v) for n, v in row.scores.items() if v is not None],
                "latency": latency_text(answer.call.latency_ms) if answer is not None else "",
            }
        )
    rows = list(by_example.values())
    missing = sum(1 for r in results.rows if r.answer is None)
    environment = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = environment.from_string(TEMPLATE)
    return template.render(
        title=title,
        models=list(results.models),
        rows_count=len(rows),
        rows=rows[:HTML_ROWS],
        hidden=len(rows) > HTML_ROWS,
        judge=results.judge,
        judge_mode=results.judge_mode,
        judge_cost=results.judge_calls.cost_usd,
        written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        complete=results.complete,
        missing=missing or "some judge",
        summaries=results.summaries,
        shown_scores=shown_scores,
        score_words=SCORE_WORDS,
        best=best,
        failures=failures,
        charts=[{"alt": alt, "src": _data_uri(png)} for alt, png in charts],
        percent=percent,
        latency=latency_text,
        dollars=dollars,
    )


def charts_of(results: EvalResults) -> list[tuple[str, str, bytes]]:
    """(file name, description, PNG) for each chart the results can draw."""
    charts: list[tuple[str, str, bytes]] = []
    scores = {s.model: {SCORE_WORDS[n]: s.scores.get(n) for n in SCORES} for s in results.summaries}
    try:
        charts.append(("scores.png", "Scores per model", score_chart(scores, "Scores per model")))
    except ValueError:
        pass  # nothing scored (no references, patterns or judge)
    latencies = {
        model: [
            r.answer.call.latency_ms
            for r in results.rows
            if r.model == model
            and r.answer is not None
            and r.answer.ok
            and r.answer.call.latency_ms is not None
        ]
        for model in results.models
    }
    costs = {s.model: s.cost_per_1k_answers for s in results.summaries}
    charts.append(
        (
            "speed_cost.png",
            "Latency per answer and cost of 1,000 answers",
            speed_cost_chart(latencies, costs),
        )
    )
    return charts


def write_report(results: EvalResults, folder: Path, title: str = "Evaluation") -> ReportFiles:
    """Write every report file into `folder` (replacing the last run's); what was written."""
    rows = example_rows(results)
    summaries = [summary_json(s) for s in results.summaries]
    files = ReportFiles(
        html=folder / "report.html",
        examples_csv=folder / "examples.csv",
        examples_jsonl=folder / "examples.jsonl",
        summary_json=folder / "summary.json",
        summary_csv=folder / "summary.csv",
        charts=(),
    )
    _write_csv(files.examples_csv, rows)
    _write_jsonl(files.examples_jsonl, rows)
    _write_csv(files.summary_csv, summaries)
    files.summary_json.write_text(
        json.dumps(
            {
                "models": list(results.models),
                "rows": len(results.examples),
                "judge": results.judge,
                "judge_mode": results.judge_mode if results.judge else None,
                "complete": results.complete,
                "summary": summaries,
            },
            ensure_ascii=False,
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    charts = charts_of(results)
    written = []
    for name, _, png in charts:
        (folder / name).write_bytes(png)
        written.append(folder / name)
    files.html.write_text(
        render_html(results, [(alt, png) for _, alt, png in charts], title), encoding="utf-8"
    )
    return ReportFiles(
        files.html,
        files.examples_csv,
        files.examples_jsonl,
        files.summary_json,
        files.summary_csv,
        tuple(written),
    )
