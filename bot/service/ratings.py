"""Ratings from blind battles: a Bradley–Terry fit with ties, bootstrap intervals, ranks.

Pure: comparisons in, ratings out; no database, no clock. The model is Bradley–Terry with
Davidson's (1970) tie parameter ν: for models with strengths πi and πj,

    P(i beats j) = πi / (πi + πj + ν·√(πi·πj)),   P(tie) = ν·√(πi·πj) / (same),

so a tie is its own outcome, likeliest between equals, and ν is fitted with the strengths
(ν = 0 means no ties happen). The log-likelihood is maximised with scipy's L-BFGS-B over
log-strengths and log ν, with a weak Gaussian prior on the log-strengths (`PRIOR`) so that
a model that won every battle still gets a finite rating; with a handful of battles per
model the prior is no longer felt. Ratings are on the Elo-like scale Chatbot Arena uses,
1000 + 400·log10(π), anchored so that the average model is at 1000.

The 95% interval of each rating comes from a bootstrap over battles (not votes: the votes
of one battle are resampled together): `resamples` datasets drawn with replacement, each
fitted again, seeded, so the same battles give the same intervals. The cost of a resample
does not grow with the number of battles (they are summed per pair of models first).

A model's rank is 1 + the number of ranked models whose lower bound is above its upper
bound: models whose intervals overlap share a rank. A model with fewer than `min_battles`
battles is in the fit (its battles inform the others) but unranked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

CountedOutcome = Literal["a", "b", "tie"]

BASE_RATING = 1000.0
SCALE = 400.0 / math.log(10)  # rating points per unit of natural log-strength
# Precision of the Gaussian prior on log-strengths (σ ≈ 3.2, about ±550 rating points).
PRIOR = 0.1
RESAMPLES = 1000
MIN_BATTLES = 20
CONFIDENCE = 0.95
# log ν stays within these bounds: with no ties at all it goes to the lower one.
_LOG_TIE_BOUNDS = (-20.0, 5.0)
_CHUNK = 250  # resamples fitted at once


@dataclass(frozen=True, slots=True)
class Comparison:
    """One counted verdict on one battle: A better, B better, or a tie."""

    battle_id: str
    model_a: str
    model_b: str
    outcome: CountedOutcome


@dataclass(frozen=True, slots=True)
class Rating:
    """One model's rating with its interval, its rank (None: unranked) and its record."""

    model: str
    rating: float
    low: float
    high: float
    rank: int | None
    battles: int  # battles with at least one counted verdict
    wins: int
    losses: int
    ties: int

    @property
    def ranked(self) -> bool:
        return self.rank is not None


@dataclass(frozen=True, slots=True)
class RatingFit:
    """Every model's rating, best first (the ranked ones, then the unranked)."""

    ratings: tuple[Rating, ...]
    tie_strength: float  # Davidson's ν; P(tie) between equals is ν / (2 + ν)
    comparisons: int
    battles: int
    resamples: int
    min_battles: int
    confidence: float = CONFIDENCE

    def get(self, model: str) -> Rating | None:
        """The rating of `model`, if it fought."""
        return next((r for r in self.ratings if r.model == model), None)


@dataclass(slots=True)
class _Record:
    """What one model's battles came to."""

    battles: set[str]
    wins: int = 0
    losses: int = 0
    ties: int = 0


@dataclass(frozen=True, slots=True)
class _Pairs:
    """The pairs of models that met: which model is first and second in each, as incidence
    matrices (pairs x models), so a fit's gradient per model is one product."""

    first: NDArray[np.float64]
    second: NDArray[np.float64]


def rating_of(log_strength: float | NDArray[np.float64]) -> NDArray[np.float64]:
    """Log-strengths (centred) on the rating scale."""
    return np.asarray(BASE_RATING + SCALE * np.asarray(log_strength), dtype=np.float64)


def _negative_log_likelihood(
    flat: NDArray[np.float64], pairs: _Pairs, counts: NDArray[np.float64]
) -> tuple[float, NDArray[np.float64]]:
    """The penalised negative log-likelihood of Davidson's model, and its gradient, summed
    over a stack of datasets fitted at once (`counts`: datasets x pairs x [first won,
    second won, ties]; `flat`: each dataset's log-strengths and log ν, one row each)."""
    params = flat.reshape(counts.shape[0], -1)
    theta, log_tie = params[:, :-1], params[:, -1:]
    a, b = theta @ pairs.first.T, theta @ pairs.second.T
    tie_term = log_tie + (a + b) / 2
    log_z = np.logaddexp(np.logaddexp(a, b), tie_term)
    p_a, p_b, p_tie = np.exp(a - log_z), np.exp(b - log_z), np.exp(tie_term - log_z)
    wins_a, wins_b, ties = counts[..., 0], counts[..., 1], counts[..., 2]
    total = wins_a + wins_b + ties
    log_likelihood = np.sum(wins_a * (a - log_z) + wins_b * (b - log_z) + ties * (tie_term - log_z))
    # d logZ/da = p_a + p_tie/2 (and so for b); d logZ/d log ν = p_tie.
    grad_a = wins_a + ties / 2 - total * (p_a + p_tie / 2)
    grad_b = wins_b + ties / 2 - total * (p_b + p_tie / 2)
    grad_theta = grad_a @ pairs.first + grad_b @ pairs.second
    grad_log_tie = np.sum(ties - total * p_tie, axis=1, keepdims=True)
    value = -log_likelihood + PRIOR / 2 * float(np.sum(theta * theta))
    gradient = np.concatenate([PRIOR * theta - grad_theta, -grad_log_tie], axis=1)
    return float(value), gradient.ravel()


def _fit(
    pairs: _Pairs, counts: NDArray[np.float64], start: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Maximum-likelihood log-strengths (centred) and log ν for each dataset of a stack.

    The datasets are independent, so the stacked likelihood is their sum and one L-BFGS-B
    run fits them all (a bootstrap's thousand fits in one vectorised run, not a thousand
    runs of scipy's per-call overhead); `start` holds each dataset's first guess.
    """
    stack, width = start.shape
    low = np.full((stack, width), -np.inf)
    high = np.full((stack, width), np.inf)
    low[:, -1], high[:, -1] = _LOG_TIE_BOUNDS
    from scipy.optimize import Bounds, minimize  # imported on first fit: it is slow to load

    result = minimize(
        _negative_log_likelihood,
        start.ravel(),
        args=(pairs, counts),
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(low.ravel(), high.ravel()),
        # ftol 0: stop on the gradient, which must be small in every dataset of the stack.
        options={"maxiter": 1000, "gtol": 1e-6, "ftol": 0.0},
    )
    params = np.asarray(result.x, dtype=np.float64).reshape(stack, width)
    # The likelihood does not see a common shift; the prior already centres (exactly so here).
    params[:, :-1] -= params[:, :-1].mean(axis=1, keepdims=True)
    return params


def rank_from_intervals(
    low: Sequence[float], high: Sequence[float], ranked: Sequence[bool]
) -> list[int | None]:
    """1 + the number of ranked models whose lower bound is above this one's upper bound."""
    ranks: list[int | None] = []
    for index, is_ranked in enumerate(ranked):
        if not is_ranked:
            ranks.append(None)
            continue
        above = sum(
            1
            for other, other_ranked in enumerate(ranked)
            if other_ranked and other != index and low[other] > high[index]
        )
        ranks.append(1 + above)
    return ranks


def fit_ratings(
    comparisons: Sequence[Comparison],
    *,
    min_battles: int = MIN_BATTLES,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> RatingFit:
    """Fit every model that fought; intervals from `resamples` bootstrap resamples of battles.

    Blocking (about a second for 1,000 resamples): call it in a worker thread.
    """
    # BLAS threads only slow these small products down (on 2 busy cores, by 3x).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_ratings(
            comparisons,
            min_battles=min_battles,
            resamples=resamples,
            seed=seed,
            confidence=confidence,
        )


def _fit_ratings(
    comparisons: Sequence[Comparison],
    *,
    min_battles: int = MIN_BATTLES,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> RatingFit:
    if not 0 < confidence < 1:
        raise ValueError("confidence is between 0 and 1")
    if not comparisons:
        return RatingFit((), 0.0, 0, 0, resamples, min_battles, confidence)
    models = sorted({c.model_a for c in comparisons} | {c.model_b for c in comparisons})
    index = {name: i for i, name in enumerate(models)}
    for c in comparisons:
        if c.model_a == c.model_b:
            raise ValueError(f"a battle between {c.model_a} and itself")
        if c.outcome not in ("a", "b", "tie"):
            raise ValueError(f"outcome {c.outcome!r} is not a, b or tie")

    # Per battle: its pair of models (lower index first) and [first won, second won, ties].
    battle_rows: dict[str, int] = {}
    battle_pair: list[tuple[int, int]] = []
    battle_counts: list[list[float]] = []
    record = {name: _Record(set()) for name in models}
    for c in comparisons:
        i, j = index[c.model_a], index[c.model_b]
        row = battle_rows.get(c.battle_id)
        if row is None:
            row = battle_rows[c.battle_id] = len(battle_pair)
            battle_pair.append((min(i, j), max(i, j)))
            battle_counts.append([0.0, 0.0, 0.0])
        elif battle_pair[row] != (min(i, j), max(i, j)):
            raise ValueError(f"battle {c.battle_id} names two different pairs of models")
        winner = {"a": i, "b": j}.get(c.outcome)
        column = 2 if winner is None else (0 if winner == battle_pair[row][0] else 1)
        battle_counts[row][column] += 1
        record[c.model_a].battles.add(c.battle_id)
        record[c.model_b].battles.add(c.battle_id)
        if c.outcome == "tie":
            record[c.model_a].ties += 1
            record[c.model_b].ties += 1
        else:
            won, lost = (c.model_a, c.model_b) if c.outcome == "a" else (c.model_b, c.model_a)
            record[won].wins += 1
            record[lost].losses += 1

    met = sorted(set(battle_pair))
    pair_index = {pair: k for k, pair in enumerate(met)}
    battle_to_pair = np.array([pair_index[pair] for pair in battle_pair], dtype=np.intp)
    per_battle = np.array(battle_counts, dtype=np.float64)
    n_battles, n_pairs, n_models = len(battle_pair), len(met), len(models)
    pairs = _Pairs(np.zeros((n_pairs, n_models)), np.zeros((n_pairs, n_models)))
    pairs.first[np.arange(n_pairs), [p[0] for p in met]] = 1
    pairs.second[np.arange(n_pairs), [p[1] for p in met]] = 1

    totals = np.zeros((1, n_pairs, 3))
    np.add.at(totals[0], battle_to_pair, per_battle)
    full = _fit(pairs, totals, np.zeros((1, n_models + 1)))[0]

    # A resample draws n battles with replacement. Battles with the same pair and the
    # same verdicts are interchangeable, so it is the same to draw how many of each kind
    # (multinomially, by their share): the cost no longer depends on the number of battles.
    kinds, seen = np.unique(
        np.column_stack([battle_to_pair, per_battle]), axis=0, return_counts=True
    )
    # Kinds x (pairs x 3): what one battle of each kind adds to a dataset's counts.
    per_kind = np.zeros((len(kinds), n_pairs, 3))
    per_kind[np.arange(len(kinds)), kinds[:, 0].astype(np.intp)] = kinds[:, 1:]
    adds = per_kind.reshape(len(kinds), n_pairs * 3)
    rng = np.random.default_rng(seed)
    boot = np.empty((resamples, n_models))
    for done in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - done)
        drawn = rng.multinomial(n_battles, seen / n_battles, size=size).astype(np.float64)
        counts = (drawn @ adds).reshape(size, n_pairs, 3)
        boot[done : done + size] = _fit(pairs, counts, np.tile(full, (size, 1)))[:, :-1]

    point = rating_of(full[:-1])
    tail = (1 - confidence) / 2 * 100
    # Percentile intervals; one that misses the point estimate (a skewed bootstrap) is
    # widened to hold it.
    low = np.minimum(rating_of(np.percentile(boot, tail, axis=0)), point) if resamples else point
    high = (
        np.maximum(rating_of(np.percentile(boot, 100 - tail, axis=0)), point)
        if resamples
        else point
    )
    ranked = [len(record[name].battles) >= min_battles for name in models]
    ranks = rank_from_intervals(low.tolist(), high.tolist(), ranked)
    ratings = [
        Rating(
            model=name,
            rating=float(point[i]),
            low=float(low[i]),
            high=float(high[i]),
            rank=ranks[i],
            battles=len(record[name].battles),
            wins=record[name].wins,
            losses=record[name].losses,
            ties=record[name].ties,
        )
        for i, name in enumerate(models)
    ]
    ratings.sort(key=lambda r: (not r.ranked, -r.rating, r.model))
    return RatingFit(
        ratings=tuple(ratings),
        tie_strength=float(math.exp(full[-1])),
        comparisons=len(comparisons),
        battles=n_battles,
        resamples=resamples,
        min_battles=min_battles,
        confidence=confidence,
    )
