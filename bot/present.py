"""How the adapters say things: sizes, prices, models and settings changes, in words.

The service returns facts (a `SettingChange`, a `ModelSpec`); the CLI, the terminal
chat and the Discord cogs phrase them here, so every face of the bot says the same
thing the same way. Text is Discord-flavoured Markdown where it says so; nothing here
imports `discord` or `rich`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bot.service.compare import BattleVerdict, PreferenceOutcome
from bot.service.feedback import ModelFeedback, VoteOutcome
from bot.service.leaderboard import Leaderboard, LeaderboardEntry
from bot.service.limits import SpendingReport, Spent, until, usd
from bot.service.place_settings import Setting, SettingChange
from bot.service.privacy import ForgetReport, PrivacyStatus, PurgeReport
from bot.service.tune import JobView
from chains.registry import ModelSpec
from core.messages import scope_word
from store.export import ExportOptions, ExportSummary, removed_text

# How each source of a setting is called, as in "(server default)".
SOURCE_WORDS: dict[str, str] = {
    "thread": "set for this thread",
    "channel": "set for this channel",
    "guild": "server default",
    "global": "bot default",
}


def human_size(size: int) -> str:
    """Bytes for people: 1536 → "1.5 KB"."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def context_size(tokens: int) -> str:
    """A context window for people: 128000 → "128k", 8192 → "8k", 1048576 → "1M"."""
    for size, unit in ((1_048_576, "M"), (1_000_000, "M"), (1024, "k"), (1000, "k")):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return f"{round(tokens / 1000)}k" if tokens >= 1000 else str(tokens)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """One model as every list of models shows it."""

    name: str
    provider: str
    weights: str  # "open" or "closed"
    local: bool  # runs on this machine (llama.cpp)
    context: str  # "8,192"
    price: str  # "free", or "$0.15 in / $0.6 out per 1M tokens"
    description: str
    fallback: str
    is_default: bool
    candidate: bool = False  # a fine-tune not yet promoted


def price(spec: ModelSpec) -> str:
    """What a million tokens cost, in and out."""
    if not spec.input_price and not spec.output_price:
        return "free"
    return f"${spec.input_price:g} in / ${spec.output_price:g} out per 1M tokens"


def endpoint(spec: ModelSpec) -> str:
    """Where a remote model is reached, credentials in the URL masked; "" for local models."""
    if spec.is_local:
        return ""
    if spec.provider == "openai" and not spec.base_url:
        return "OpenAI"
    return spec.public_base_url or ""


def model_facts(spec: ModelSpec, default_model: str) -> ModelFacts:
    """The facts of one model that the model lists show."""
    return ModelFacts(
        name=spec.name,
        provider=spec.provider,
        weights="open" if spec.open_weights else "closed",
        local=spec.is_local,
        context=f"{spec.context_window:,}",
        price=price(spec),
        description=spec.description,
        fallback=spec.fallback or "",
        is_default=spec.name == default_model,
        candidate=spec.candidate,
    )


def models_text(specs: list[ModelSpec], default_model: str) -> str:
    """The model list as plain text, a line per model (the terminal's `/model list`)."""
    lines = []
    for spec in specs:
        facts = model_facts(spec, default_model)
        mark = " (default)" if facts.is_default else ""
        mark += " (candidate: admins only until promoted)" if facts.candidate else ""
        local = ", local" if facts.local else ""
        lines.append(
            f"{facts.name}{mark}: {facts.provider}, {facts.weights} weights{local}, {facts.context} tokens, {facts.price}"
        )
    return "\n".join(lines)


def change_line(change: SettingChange) -> str:
    """What a settings command says it did (Discord Markdown; the terminal shows it as is)."""
    where = f"this {scope_word(change.scope)}"
    if change.name == "model":
        if change.new is None:
            now = change.now
            return f"Model for {where} reset; now using **{now.value}** (from {now.source})."
        was = f" (was: {change.old})." if change.old else "."
        return f"Model for {where}: **{change.new}**{was}"
    if change.name == "system_prompt":
        if change.new is None:
            return f"System prompt for {where} reset to the inherited one."
        return f"System prompt for {where} set ({len(str(change.new))} characters)."
    if change.name == "logging":
        now = "logged" if change.now.value else "not logged (only counted)"
        if change.new is None:
            return f"Logging for {where}: **inherited**; exchanges here are {now}."
        if change.new:
            return f"Logging for {where}: **on**; exchanges here are stored again."
        return (
            f"Logging for {where}: **off**; nothing said here is stored from now on, "
            "only counted (day, model, tokens)."
        )
    if change.name == "retention":
        if change.new is None:
            return f"Retention for this server reset: {retention_words(change.now)}."
        return f"Retention for this server: {retention_words(change.now)}."
    if change.name == "arena_pool":
        if change.new is None:
            now = change.now
            return (
                f"Arena pool for {where} reset; battles now draw from {pool_text(now.value)} "
                f"({SOURCE_WORDS[now.source]})."
            )
        return f"Arena pool for {where}: {pool_text(change.new)}."
    state = "inherited" if change.new is None else ("on" if change.new else "off")
    return f"Knowledge base for {where}: **{state}**."


def pool_text(pool: list[str] | None) -> str:
    """An arena pool in words: '**a**, **b**', or 'every model'."""
    return ", ".join(f"**{name}**" for name in pool) if pool else "every model"


def split_models(models: str | None) -> list[str] | None:
    """ "a, b,c" → ["a", "b", "c"]; None or blank → None (the place's default set)."""
    if models is None:
        return None
    names = [name.strip() for name in models.split(",") if name.strip()]
    return names or None


def duration_text(ms: float | None) -> str:
    """A time for people: 850 → "850 ms", 1234 → "1.2 s"; None → "—"."""
    if ms is None:
        return "—"
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.1f} s"


def cost_text(usd: float | None) -> str:
    """What an answer cost: "free", "$0.000123", "$1.25"; None (not known) → "—"."""
    if usd is None:
        return "—"
    if usd == 0:
        return "free"
    if usd >= 0.01:
        return f"${usd:,.2f}"
    shown = f"{usd:.6f}".rstrip("0")
    return f"${shown}" if shown != "0." else "under $0.000001"


# What each outcome of a battle vote says.
OUTCOME_WORDS: dict[str, str] = {
    "a": "A was better",
    "b": "B was better",
    "tie": "a tie",
    "bad": "both were bad",
}


def verdict_line(verdict: BattleVerdict) -> str:
    """What a battle vote did, with the two models revealed (Discord Markdown)."""
    reveal = f"A was **{verdict.model_a}**, B was **{verdict.model_b}**."
    said = OUTCOME_WORDS[verdict.outcome]
    if verdict.already_voted:
        return f"You already voted on this battle ({said}); one vote per person. {reveal}"
    if not verdict.stored:
        return f"Thanks for your vote ({said}). {reveal} Nothing of this battle is stored."
    line = f"Thanks for your vote ({said}). {reveal}"
    if verdict.invalid:
        line += f" This battle does not count: {verdict.invalid}"
    if verdict.votes_left_today is not None and verdict.votes_left_today <= 5:
        line += f" ({verdict.votes_left_today} votes left today.)"
    return line


def preference_line(outcome: PreferenceOutcome) -> str:
    """What picking the best answer of a comparison did, for the person who picked."""
    if not outcome.stored:
        return f"Noted: **{outcome.model}** (not stored)."
    if outcome.previous_id == outcome.chosen_id:
        return f"**{outcome.model}** was already your pick; it stays."
    if outcome.previous_id is not None:
        return f"Changed your pick from **{outcome.previous_model}** to **{outcome.model}**."
    return f"Noted: **{outcome.model}** gave the best answer."


# The 👎 reasons (core.exchange.VOTE_REASONS) as people read them.
REASON_WORDS: dict[str, str] = {
    "wrong": "Wrong",
    "unhelpful": "Unhelpful",
    "unsafe": "Unsafe",
    "off_topic": "Off-topic",
    "too_long": "Too long",
    "refused": "Refused wrongly",
    "other": "Other",
}


def reasons_text(reasons: list[tuple[str, int]]) -> str:
    """'Too long ×3, Wrong ×1', or 'none given'."""
    if not reasons:
        return "none given"
    return ", ".join(f"{REASON_WORDS.get(reason, reason)} ×{count}" for reason, count in reasons)


def share_text(model: ModelFeedback) -> str:
    """'72% 👍 (95% CI 61–81%)', or 'no votes'."""
    share, interval = model.share_up, model.interval
    if share is None or interval is None:
        return "no votes"
    low, high = math.floor(100 * interval[0]), math.ceil(100 * interval[1])
    return f"{100 * share:.0f}% 👍 (95% CI {low}–{high}%)"


def vote_line(outcome: VoteOutcome) -> str:
    """What a vote did, for the person who voted."""
    if not outcome.stored:
        return (
            "Thanks! (Your vote is not kept: you opted out of storage, or nothing said "
            "where that answer was given is stored.)"
        )
    if outcome.value == 0:
        return "Your vote is removed." if outcome.previous else "You had not voted on that answer."
    thumb = "👍" if outcome.value > 0 else "👎"
    if outcome.previous == outcome.value:
        return f"You already voted {thumb} on that answer; it stays."
    if outcome.previous is not None:
        return f"Changed your vote to {thumb}."
    return f"Thanks for the {thumb}."


# ------------------------------------------------------------------ the leaderboard

LEADERBOARD_WHERE: dict[str, str] = {
    "channel": "this channel",
    "server": "this server",
    "global": "every server",
}


def rank_text(entry: LeaderboardEntry) -> str:
    """'#1', 'unranked (5 battles)', or 'no battles'."""
    if entry.rating is None:
        return "no battles"
    if entry.rating.rank is None:
        return f"unranked ({entry.battles} battle{'s' if entry.battles != 1 else ''})"
    return f"#{entry.rating.rank}"


def rating_text(entry: LeaderboardEntry) -> str:
    """'1,143 (+21/−19)': the rating and how far its 95% interval reaches; '' without battles."""
    rating = entry.rating
    if rating is None:
        return ""
    up, down = rating.high - rating.rating, rating.rating - rating.low
    return f"{rating.rating:,.0f} (+{up:.0f}/−{down:.0f})"


def record_text(entry: LeaderboardEntry) -> str:
    """'31–12–4' (won, lost, tied verdicts); '' without battles."""
    rating = entry.rating
    return f"{rating.wins}–{rating.losses}–{rating.ties}" if rating is not None else ""


def latency_text(ms: float | None) -> str:
    """'850 ms', '2.4 s', or '' when unknown."""
    if ms is None:
        return ""
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.1f} s"


def dollars(amount: float | None) -> str:
    """'$0.0042', '$0.30', '$1.20', 'free', or '' when unknown."""
    if amount is None:
        return ""
    if amount == 0:
        return "free"
    # Cents as cents ($0.30, not $0.3); below a cent, two significant digits.
    return f"${amount:,.2f}" if amount >= 0.1 else f"${amount:.2g}"


def blended_price_text(entry: LeaderboardEntry) -> str:
    """'$0.26 / 1M tokens' (3 input : 1 output), 'free', or '' for a model no longer configured."""
    if entry.price is None:
        return ""
    if entry.price.free:
        return "free"
    return f"{dollars(entry.price.blended)} / 1M tokens"


def leaderboard_caption(board: Leaderboard) -> str:
    """What the board is made of and how it was computed, in one line."""
    battles = f"{board.battles:,} battle{'s' if board.battles != 1 else ''}"
    return (
        f"{battles} in {LEADERBOARD_WHERE[board.scope]}. {board.method} "
        f"A model needs {board.min_battles} battles to be ranked. Price: 3 input : 1 output tokens."
    )


def retention_words(setting: Setting) -> str:
    """How long exchanges are kept, with where that comes from: "**30 days** (server default)"."""
    days = setting.value
    kept = f"**{days} day{'s' if days != 1 else ''}**" if days else "**kept forever**"
    return f"{kept} ({SOURCE_WORDS.get(setting.source, setting.source)})"


def logging_words(setting: Setting) -> str:
    """Whether exchanges are stored, with where that comes from: "on (bot default)"."""
    state = "on" if setting.value else "off: nothing is stored, only counted"
    return f"{state} ({SOURCE_WORDS.get(setting.source, setting.source)})"


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number:,} {one if number == 1 else (many or one + 's')}"


def privacy_line(status: PrivacyStatus, forget_command: str = "/privacy forget") -> str:
    """What `/privacy status` (and opt-out, opt-in) says."""
    stored = f"{_count(status.messages, 'message')} you wrote and {_count(status.votes, 'vote')}"
    if status.opted_out:
        return (
            "You are **opted out**: you are answered, but nothing you write or receive is "
            f"stored, and you are never exported. Stored from before: {stored}; "
            f"`{forget_command}` deletes them."
        )
    return (
        f"You are **opted in**: your exchanges are stored ({stored} so far) and may be "
        f"used to improve the models. `/privacy opt-out` stops that; `{forget_command}` "
        "deletes what is stored."
    )


def forget_line(report: ForgetReport) -> str:
    """What `/privacy forget` says it deleted."""
    if report.nothing:
        line = "Nothing was stored about you; nothing to delete."
    else:
        parts = [
            _count(report.messages, "message") + " you wrote",
            _count(report.answers, "answer") + " to them or built on them",
            _count(report.votes, "vote"),
            _count(report.corrections, "correction"),
        ]
        if report.conversations:
            parts.append(_count(report.conversations, "conversation") + " left empty")
        line = "Deleted " + ", ".join(parts) + "."
        renamed = []
        if report.setting_changes:
            renamed.append(_count(report.setting_changes, "settings change"))
        if report.documents:
            renamed.append(_count(report.documents, "document"))
        if renamed:
            line += f" Your name was taken off {' and '.join(renamed)}."
        line += _snapshot_words(report.snapshot_lines)
    if report.documents_problem:
        line += (
            f" Your name could not be taken off your documents ({report.documents_problem}); "
            "run the command again later."
        )
    if report.snapshots_problem:
        line += f" {_snapshots_problem(report.snapshots_problem)}"
    return line


def _snapshot_words(lines: int) -> str:
    """ " 3 examples built on them were taken out of fine-tuning snapshots.", or ""."""
    if not lines:
        return ""
    return (
        f" {_count(lines, 'example')} built on them "
        f"{'was' if lines == 1 else 'were'} taken out of fine-tuning snapshots."
    )


def _snapshots_problem(problem: str) -> str:
    return (
        f"A fine-tuning snapshot could not be rewritten ({problem}); the bot's admin has to "
        "fix that, and the next deletion tries again."
    )


def purge_line(report: PurgeReport) -> str:
    """What `switchboard db purge` says it deleted (or would delete)."""
    if report.default_days is None and not any(report.servers.values()):
        policy = (
            "no retention is set (SWITCHBOARD_RETENTION_DAYS, /retention), so everything is kept"
        )
    else:
        default = f"{report.default_days} days" if report.default_days else "kept forever"
        policy = f"retention {default}"
        if report.servers:
            own = ", ".join(
                f"server {guild_id}: {days} days" if days else f"server {guild_id}: forever"
                for guild_id, days in sorted(report.servers.items())
            )
            policy += f" ({own})"
    what = (
        f"{_count(report.prompts, 'prompt')} with {_count(report.answers, 'answer')}, "
        f"{_count(report.conversations, 'conversation')} left empty"
    )
    if report.dry_run:
        return f"Would delete {what}; nothing was changed ({policy})."
    line = f"Deleted {what} ({policy})." + _snapshot_words(report.snapshot_lines)
    if report.snapshots_problem:
        line += f" {_snapshots_problem(report.snapshots_problem)}"
    return line


def export_summary_lines(summary: ExportSummary) -> list[str]:
    """What an export says it did: examples and tokens, files, what was left out, the cost."""
    options = summary.options
    lines = [
        f"Exported {summary.examples:,} {summary.format} examples ({summary.tokens:,} tokens) "
        f"from {summary.candidates:,} answers."
    ]
    for file in summary.files:
        share = "" if file.split == "all" else f"{file.split}: "
        lines.append(
            f"  {share}{file.path} ({file.examples:,} examples, {human_size(file.bytes)}, "
            f"sha256 {file.sha256[:12]}…)"
        )
    lines.append(f"  manifest: {summary.manifest}")
    left_out = removed_text(summary.removed, options)
    if left_out:
        lines.append(f"Left out: {left_out}.")
    if summary.kto is not None:
        kto = summary.kto
        lines.append(
            f"KTO: {kto['desirable']:,.0f} desirable, {kto['undesirable']:,.0f} undesirable; "
            f"desirable_weight {kto['desirable_weight']:g}, undesirable_weight "
            f"{kto['undesirable_weight']:g}."
        )
    if summary.cost_usd is not None:
        priced = (
            ""
            if summary.priced_examples == summary.examples
            else f" ({summary.priced_examples:,} of {summary.examples:,} examples have a price)"
        )
        lines.append(f"Estimated training cost: ${summary.cost_usd:.2f} per epoch{priced}.")
    else:
        lines.append(
            "No training price for these models: set training_price in the registry to see "
            "the estimated cost."
        )
    if summary.redacted:
        written = sum(summary.placeholders.values())
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in summary.placeholders.items() if n)
        lines.append(
            f"Personal data redacted: {written:,} placeholders" + (f" ({kinds})." if kinds else ".")
        )
    else:
        lines.append("Not redacted (--no-redact): the files hold personal data as it was logged.")
    return lines


def export_command(options: ExportOptions, output: str | None = None) -> str:
    """The `switchboard export` command line that runs the same export."""
    parts = ["switchboard export", f"--format {options.format}"]
    if output:
        parts.append(f"--output {output}")
    if options.min_rating != 1:
        parts.append(f"--min-rating {options.min_rating}")
    if options.model:
        parts.append(f"--model {options.model}")
    if options.guild_id is not None:
        parts.append(f"--guild {options.guild_id}")
    if options.channel_id is not None:
        parts.append(f"--channel {options.channel_id}")
    if options.since is not None:
        parts.append(f"--since {options.since.strftime('%Y-%m-%dT%H:%M:%S')}")
    if options.until is not None:
        parts.append(f"--until {options.until.strftime('%Y-%m-%dT%H:%M:%S')}")
    if options.include_unrated:
        parts.append("--include-unrated")
    if options.with_context:
        parts.append("--with-context")
    if options.split is not None:
        parts.append(f"--split {options.split:g}")
    if not options.redact:
        parts.append("--no-redact")
    return " ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def tune_status_lines(job: JobView) -> list[str]:
    """A fine-tuning job as `tune status` and `/tune status` show it."""
    progress = f"step {job.step}/{job.total_steps}" if job.total_steps else f"step {job.step}"
    loss = f"loss {job.loss:.4f}" if job.loss is not None else "no loss yet"
    lines = [
        f"Job {job.id} — {job.name}: {job.status} ({job.phase}, {progress}, {loss})",
        f"  base {job.base_model} · {job.backend} {job.method} · snapshot {job.snapshot_rows} "
        f"examples, sha256 {job.snapshot_sha256[:12]}…",
        f"  started by {job.started_by} at {job.created_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        f" · elapsed {_duration(job.elapsed_s)}"
        + (f" · about {_duration(job.eta_s)} left" if job.active and job.eta_s else ""),
    ]
    if job.model_name:
        lines.append(f"  model: {job.model_name} ({job.gate})")
    if job.error:
        lines.append(f"  {'error' if job.status == 'failed' else 'note'}: {job.error}")
    return lines


def spending_line(spent: Spent | None, in_server: bool) -> str:
    """What `/usage` says: today's spending on priced models against the daily budgets."""
    if spent is None:
        return "No daily budget is set for paid models: they answer without a cap."
    parts = []
    if spent.person_budget:
        parts.append(f"you spent {usd(spent.person)} of your {usd(spent.person_budget)}")
    if in_server and spent.server_budget:
        parts.append(f"this server spent {usd(spent.server)} of its {usd(spent.server_budget)}")
    if not parts:
        return "No daily budget applies here: paid models answer without a cap."
    renews = until(spent.renews_at, datetime.now(UTC))
    return (
        f"Today (UTC), on paid models, {' and '.join(parts)} daily budget. Budgets renew at "
        f"00:00 UTC ({renews}); models without a price, like the local ones, cost nothing."
    )


def spending_report_lines(
    report: SpendingReport | None, top: int
) -> tuple[str, list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """`switchboard usage` in words: a heading, and the rows of its two tables (servers,
    then the `top` people), each (who, spent, share of the budget)."""
    if report is None:
        return (
            "No daily budget is set (SWITCHBOARD_PERSON_DAILY_BUDGET_USD, "
            "SWITCHBOARD_SERVER_DAILY_BUDGET_USD), so spending is not counted.",
            [],
            [],
        )
    budgets = ", ".join(
        f"{usd(amount)} a {who}"
        for who, amount in (("person", report.person_budget), ("server", report.server_budget))
        if amount
    )
    heading = (
        f"Spent on paid models on {report.day.isoformat()} (UTC): {usd(report.total)}"
        f" in {len(report.servers)} place{'s' if len(report.servers) != 1 else ''}. "
        f"Daily budgets: {budgets}."
    )

    def share(amount: float, budget: float) -> str:
        if not budget:
            return "—"
        part = amount / budget
        return f"{part:.1%}" if part < 0.1 else f"{part:.0%}"

    servers = [
        (
            str(guild) if guild else "DMs",
            usd(amount),
            share(amount, report.server_budget) if guild else "—",
        )
        for guild, amount in report.servers
    ]
    people = [
        (str(person) if person else "(forgotten)", usd(amount), share(amount, report.person_budget))
        for person, amount in report.people[:top]
    ]
    return heading, servers, people


def spending_report_json(report: SpendingReport | None, top: int) -> dict[str, Any] | None:
    """`switchboard usage --json`: the report as one object (null without budgets)."""
    if report is None:
        return None
    return {
        "day": report.day.isoformat(),
        "person_budget_usd": report.person_budget,
        "server_budget_usd": report.server_budget,
        "total_usd": report.total,
        "servers": [{"guild_id": guild, "usd": amount} for guild, amount in report.servers],
        "people": [{"person_id": who, "usd": amount} for who, amount in report.people[:top]],
    }
