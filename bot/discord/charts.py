"""Small PNG charts for Discord messages, drawn with matplotlib's Agg backend.

Discord-free and blocking: call `share_chart` in a worker thread (`asyncio.to_thread`)
so drawing never holds up the event loop. It uses matplotlib's object API (a `Figure`
on an Agg canvas), never `pyplot`, whose global state is not meant for threads; a lock
keeps two drawings from sharing matplotlib's font caches at once.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

from bot.service.feedback import ModelFeedback

_DRAWING = threading.Lock()
BAR_COLOUR = "#5865F2"  # Discord's blurple
ERROR_COLOUR = "#2B2D31"


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
    # Imported here: matplotlib takes a while to load and only this chart needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shares = [share for _, _, share, _ in rated]
    below = [share - low for _, _, share, (low, _) in rated]
    above = [high - share for _, _, share, (_, high) in rated]
    labels = [f"{name} ({votes} vote{'s' if votes != 1 else ''})" for name, votes, _, _ in rated]
    with _DRAWING:
        figure = Figure(figsize=(6.4, 1.3 + 0.45 * len(rated)), dpi=100)
        FigureCanvasAgg(figure)
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
        out = io.BytesIO()
        figure.savefig(out, format="png")
    return out.getvalue()
