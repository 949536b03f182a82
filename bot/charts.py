"""PNG charts for Discord messages, the command line and the eval report (matplotlib, Agg).

Discord-free and blocking: call these in a worker thread (`asyncio.to_thread`) so that
drawing never holds up the event loop. They use matplotlib's object API (a `Figure` on an
Agg canvas), never `pyplot`, whose global state is not meant for threads; a lock keeps
two drawings from sharing matplotlib's font caches at once.

- `share_chart`: the share of 👍 per model with its 95% interval (`/feedback stats`);
- `leaderboard_chart`: ratings with their 95% intervals, and quality against price per
  1M tokens, the way model-comparison sites plot it (`/leaderboard`, `switchboard
  leaderboard --out`);
- `score_chart`, `speed_cost_chart`: an eval's scores per model, and its answers' latency
  and cost (`switchboard eval`).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bot.service.feedback import ModelFeedback
from bot.service.leaderboard import Leaderboard

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DRAWING = threading.Lock()
BAR_COLOUR = "#5865F2"  # Discord's blurple
ERROR_COLOUR = "#2B2D31"
MUTED_COLOUR = "#A0A4AB"  # what is shown but not ranked
# One colour per score or model, in order (matplotlib's default cycle, blurple first).
PALETTE = ("#5865F2", "#ED8936", "#38A169", "#E53E3E", "#805AD5", "#D69E2E", "#319795")


@contextmanager
def _figure(width: float, height: float) -> Iterator[Figure]:
    """A figure on an Agg canvas, drawn under the lock."""
    # Imported here: matplotlib takes a while to load and only the charts need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with _DRAWING:
        figure = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(figure)
        yield figure


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def share_chart(models: Sequence[ModelFeedback]) -> bytes:
    """The share of 👍 per model with its 95% interval as error bars, as a PNG.

    Models without votes have no share to draw and are left out; at least one model must
    have votes.
    """
    rated = [
        (m.model, m.votes, 100 * share, (100 * interval[0], 100 * interval[1]))
        for m in models
        if (share := m.share_up) is not None and (interval := m.interval) is not None
    ]
    if not rated:
        raise ValueError("no model has votes to draw")
    shares = [share for _, _, share, _ in rated]
    below = [share - low for _, _, share, (low, _) in rated]
    above = [high - share for _, _, share, (_, high) in rated]
    labels = [f"{name} ({votes} vote{'s' if votes != 1 else ''})" for name, votes, _, _ in rated]
    with _figure(6.4, 1.3 + 0.45 * len(rated)) as figure:
        axes = figure.add_subplot()
        rows = list(range(len(rated)))
        axes.barh(
            rows,
            shares,
            xerr=[below, above],
            color=BAR_COLOUR,
            ecolor=ERROR_COLOUR,
            capsize=4,
            height=0.6,
        )
        axes.set_yticks(rows, labels=labels)
        axes.invert_yaxis()  # the model with most votes on top, as in the embeds
        axes.set_xlim(0, 100)
        axes.set_xlabel("thumbs-up share of votes, % (lines: 95% interval)")
        axes.grid(axis="x", alpha=0.3)
        axes.set_axisbelow(True)
        figure.tight_layout()
        return _png(figure)


def leaderboard_chart(board: Leaderboard) -> bytes:
    """The leaderboard as a PNG: ratings with their 95% intervals (left), and quality
    against the blended price per 1M tokens (right).

    Quality is the rating where any model has one, else the share of 👍. Unranked models
    (too few battles) are drawn in grey. A model without a price (no longer configured)
    is left out of the price panel. Raises ValueError when there is nothing to draw.
    """
    rated = [e for e in board.entries if e.rating is not None]
    liked = [e for e in board.entries if e.share_up is not None]
    if not rated and not liked:
        raise ValueError("no model has battles or votes to draw")
    use_rating = bool(rated)
    shown = rated if use_rating else liked
    with _figure(11.0, max(3.2, 1.4 + 0.42 * len(shown))) as figure:
        left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
        rows = list(range(len(shown)))
        if use_rating:
            values = [e.rating.rating for e in rated if e.rating]
            lows = [e.rating.rating - e.rating.low for e in rated if e.rating]
            highs = [e.rating.high - e.rating.rating for e in rated if e.rating]
            labels = [
                (f"#{e.rating.rank} " if e.rating.rank else "")
                + f"{e.model} ({e.battles} battle{'s' if e.battles != 1 else ''}"
                + ("" if e.rating.ranked else ", unranked")
                + ")"
                for e in rated
                if e.rating
            ]
            xlabel = f"rating (lines: {board.fit.confidence:.0%} interval)"
        else:
            values = [100 * (e.share_up or 0) for e in liked]
            intervals = [e.feedback.interval or (0.0, 0.0) for e in liked]
            lows = [v - 100 * low for v, (low, _) in zip(values, intervals, strict=True)]
            highs = [100 * high - v for v, (_, high) in zip(values, intervals, strict=True)]
            labels = [f"{e.model} ({e.votes} votes)" for e in liked]
            xlabel = "thumbs-up share of votes, % (no battles yet)"
        colours = [
            BAR_COLOUR if (not use_rating or (e.rating and e.rating.ranked)) else MUTED_COLOUR
            for e in shown
        ]
        for row, value, low, high, colour in zip(rows, values, lows, highs, colours, strict=True):
            left.errorbar(
                [value],
                [row],
                xerr=[[low], [high]],
                fmt="o",
                color=colour,
                ecolor=colour,
                capsize=4,
                markersize=7,
            )
        left.set_yticks(rows, labels=labels)
        left.set_ylim(len(shown) - 0.5, -0.5)  # the best on top
        left.set_xlabel(xlabel)
        left.grid(axis="x", alpha=0.3)
        left.set_axisbelow(True)
        where = {"channel": "this channel", "server": "this server", "global": "everywhere"}
        left.set_title(
            f"Leaderboard, {where[board.scope]}: {board.battles:,} battle"
            f"{'s' if board.battles != 1 else ''}",
            fontsize=11,
        )

        priced = [(e, v, lo, hi) for e, v, lo, hi in zip(shown, values, lows, highs, strict=True)]
        priced = [item for item in priced if item[0].price is not None]
        for index, (entry, value, low, high) in enumerate(priced):
            assert entry.price is not None
            colour = (
                PALETTE[index % len(PALETTE)]
                if not use_rating or (entry.rating and entry.rating.ranked)
                else MUTED_COLOUR
            )
            x = entry.price.blended
            right.errorbar(
                [x], [value], yerr=[[low], [high]], fmt="o", color=colour, capsize=3, markersize=8
            )
            # Labels alternate above and below their point: models of similar price and
            # quality (the usual case) would otherwise print over each other.
            right.annotate(
                entry.model + (" (free)" if entry.price.free else ""),
                (x, value),
                xytext=(6, 5 if index % 2 == 0 else -11),
                textcoords="offset points",
                fontsize=8,
            )
        most = max([1.0] + [e.price.blended for e, *_ in priced if e.price])
        # Prices span orders of magnitude (free, cents, tens of dollars): a log scale that
        # is linear below 10 cents keeps a free model's point at 0.
        right.set_xscale("symlog", linthresh=0.1, linscale=0.5)
        right.set_xlim(-0.02, most * 2)
        right.set_xlabel("price, USD per 1M tokens (3 input : 1 output), log scale")
        right.set_ylabel("rating" if use_rating else "thumbs-up share, %")
        right.set_title("Quality against price", fontsize=11)
        right.grid(alpha=0.3)
        right.set_axisbelow(True)
        if not priced:
            right.text(0.5, 0.5, "no prices known", ha="center", transform=right.transAxes)
        figure.tight_layout()
        return _png(figure)


def score_chart(scores: Mapping[str, Mapping[str, float | None]], title: str) -> bytes:
    """Grouped bars: for each score (exact, contains, ...), each model's value in 0..1.

    `scores` maps a model to its scores; a score no model has is left out.
    """
    models = list(scores)
    names = [
        name
        for name in dict.fromkeys(n for model in models for n in scores[model])
        if any(scores[m].get(name) is not None for m in models)
    ]
    if not models or not names:
        raise ValueError("no scores to draw")
    width = 0.8 / len(models)
    with _figure(max(6.4, 1.2 * len(names) + 2.5), 3.8) as figure:
        axes = figure.add_subplot()
        for index, model in enumerate(models):
            values = [100 * (scores[model].get(name) or 0.0) for name in names]
            xs = [
                position + (index - (len(models) - 1) / 2) * width for position in range(len(names))
            ]
            bars = axes.bar(
                xs, values, width=width * 0.95, color=PALETTE[index % len(PALETTE)], label=model
            )
            axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        axes.set_xticks(range(len(names)), labels=names)
        axes.set_ylim(0, 110)
        axes.set_ylabel("%")
        axes.set_title(title, fontsize=11)
        axes.legend(fontsize=8, loc="upper right", ncols=min(4, len(models)))
        axes.grid(axis="y", alpha=0.3)
        axes.set_axisbelow(True)
        figure.tight_layout()
        return _png(figure)


def speed_cost_chart(
    latencies: Mapping[str, Sequence[float]], cost_per_1k: Mapping[str, float | None]
) -> bytes:
    """Each model's answer latencies (a box per model, left) and the cost of 1,000 of its
    answers (bars, right)."""
    models = list(latencies)
    if not models:
        raise ValueError("no models to draw")
    with _figure(10.0, max(3.2, 1.4 + 0.45 * len(models))) as figure:
        left, right = figure.subplots(1, 2)
        timed = [list(latencies[m]) for m in models]  # a model that never answered: no box
        boxes = left.boxplot(
            timed, orientation="horizontal", patch_artist=True, tick_labels=models, widths=0.6
        )
        for index, box in enumerate(boxes["boxes"]):
            box.set_facecolor(PALETTE[index % len(PALETTE)])
            box.set_alpha(0.7)
        left.set_ylim(len(models) + 0.5, 0.5)
        left.set_xlabel("latency per answer, ms")
        left.set_title("Speed", fontsize=11)
        left.grid(axis="x", alpha=0.3)
        costs = [cost_per_1k.get(m) or 0.0 for m in models]
        bars = right.barh(
            range(len(models)), costs, color=[PALETTE[i % len(PALETTE)] for i in range(len(models))]
        )
        right.bar_label(
            bars,
            labels=[
                ("free" if c == 0 else f"${c:,.4f}") if cost_per_1k.get(m) is not None else "n/a"
                for m, c in zip(models, costs, strict=True)
            ],
            fontsize=8,
            padding=3,
        )
        right.set_yticks(range(len(models)), labels=models)
        right.set_ylim(len(models) - 0.5, -0.5)
        right.set_xlim(0, max([1e-6, *costs]) * 1.35)
        right.set_xlabel("cost of 1,000 answers, USD")
        right.set_title("Cost", fontsize=11)
        right.grid(axis="x", alpha=0.3)
        figure.tight_layout()
        return _png(figure)
