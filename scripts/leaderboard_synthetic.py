"""A leaderboard chart and table from a synthetic battle set with known strengths.

Run from the repository: python scripts/leaderboard_synthetic.py docs/leaderboard-synthetic.png docs/leaderboard-synthetic.txt
Verdicts are drawn from Davidson's model (tie parameter 0.5) with the true ratings below;
the fit does not see them. A seventh model fought only 12 battles (unranked).
"""

import io
import math
import sys

import numpy as np
from rich.console import Console

from bot.charts import leaderboard_chart
from bot.cli_eval import leaderboard_table
from bot.service.leaderboard import Leaderboard, LeaderboardEntry, Price
from bot.service.ratings import BASE_RATING, SCALE, Comparison, fit_ratings

TRUE = {
    "gpt-4o": 1250.0,
    "claude-sonnet": 1120.0,
    "llama3-70b": 1040.0,
    "gpt-4o-mini": 960.0,
    "mistral-small": 945.0,
    "smollm2": 730.0,
}
LATE = ("qwen2.5-7b", 1000.0, 12)
PRICES = {  # USD per 1M tokens in / out
    "gpt-4o": (2.5, 10.0),
    "claude-sonnet": (3.0, 15.0),
    "llama3-70b": (0.59, 0.79),
    "gpt-4o-mini": (0.15, 0.6),
    "mistral-small": (0.2, 0.6),
    "smollm2": (0.0, 0.0),
    "qwen2.5-7b": (0.1, 0.3),
}
TIE, BATTLES, SEED = 0.5, 3000, 14


def draw(rng, a, b, ra, rb, number):
    sa, sb = (ra - BASE_RATING) / SCALE, (rb - BASE_RATING) / SCALE
    p = np.array([math.exp(sa), math.exp(sb), TIE * math.exp((sa + sb) / 2)])
    return Comparison(f"b{number}", a, b, str(rng.choice(["a", "b", "tie"], p=p / p.sum())))


rng = np.random.default_rng(SEED)
names = sorted(TRUE)
battles = []
for n in range(BATTLES):
    i, j = rng.choice(len(names), size=2, replace=False)
    battles.append(draw(rng, names[i], names[j], TRUE[names[i]], TRUE[names[j]], n))
for k in range(LATE[2]):
    other = names[int(rng.integers(len(names)))]
    battles.append(draw(rng, LATE[0], other, LATE[1], TRUE[other], BATTLES + k))
fit = fit_ratings(battles, min_battles=20, seed=0)
entries = []
for r in fit.ratings:
    up = int(rng.integers(40, 200))
    down = int(up * (0.9 - (r.rating - 700) / 800) * rng.uniform(0.8, 1.2))
    p_in, p_out = PRICES[r.model]
    entries.append(
        LeaderboardEntry(
            r.model,
            r,
            up,
            max(down, 1),
            up + down + 50,
            float(rng.uniform(400, 3000)),
            1000 * (600 * p_in + 250 * p_out) / 1e6,
            Price(p_in, p_out),
        )
    )
board = Leaderboard("global", None, None, tuple(entries), fit)
png = leaderboard_chart(board)
open(sys.argv[1], "wb").write(png)
out = io.StringIO()
console = Console(file=out, width=170, force_terminal=False, color_system=None)
console.print(leaderboard_table(board))
all_true = {**TRUE, LATE[0]: LATE[1]}
# Ratings are relative: put the truth on the fit's anchor through the six well-measured
# models (their true mean = their fitted mean); the 12-battle model's noisy estimate
# would otherwise move the comparison for everyone.
six = [r for r in fit.ratings if r.model in TRUE]
shift = sum(r.rating for r in six) / len(six) - sum(TRUE.values()) / len(TRUE)
console.print(
    f"\nSynthetic: {BATTLES:,} battles among 6 models + {LATE[2]} for {LATE[0]} "
    f"(seed {SEED}), verdicts drawn from Davidson's model with tie parameter {TIE}; "
    f"fitted tie parameter {fit.tie_strength:.3f}.\nTrue rating (on the fit's anchor "
    "through the six well-measured models) against fitted, and whether the 95% interval "
    "holds it:"
)
for r in fit.ratings:
    t = all_true[r.model] + shift
    rank = f"rank {r.rank}" if r.rank is not None else f"unranked ({r.battles} battles)"
    console.print(
        f"  {r.model:14} true {t:7.1f}  fitted {r.rating:7.1f}  [{r.low:7.1f}, {r.high:7.1f}]"
        f"  {'inside' if r.low <= t <= r.high else 'OUTSIDE'}  {rank}"
    )
open(sys.argv[2], "w").write(out.getvalue())
print(out.getvalue())
