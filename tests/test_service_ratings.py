"""The rating fit: Bradley–Terry with Davidson's ties, bootstrap intervals and ranks.

Checked against battles drawn from known strengths: the fit must recover the order, the
ratings (inside their intervals) and the tie parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bot.service import ratings
from bot.service.ratings import Comparison, fit_ratings, rank_from_intervals

TRUE_RATINGS = {"m1": 1250.0, "m2": 1120.0, "m3": 1040.0, "m4": 960.0, "m5": 945.0, "m6": 730.0}
TRUE_TIE = 0.5


def strength(rating: float) -> float:
    """The log-strength behind a rating (the fit's scale: 400 points per factor of 10)."""
    return (rating - ratings.BASE_RATING) / ratings.SCALE


def draw_battles(
    truth: dict[str, float], battles: int, tie: float, *, seed: int, votes: int = 1
) -> list[Comparison]:
    """Battles between random pairs, each verdict drawn from Davidson's model with `truth`."""
    rng = np.random.default_rng(seed)
    names = sorted(truth)
    drawn: list[Comparison] = []
    for number in range(battles):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        sa, sb = strength(truth[a]), strength(truth[b])
        p = np.array([math.exp(sa), math.exp(sb), tie * math.exp((sa + sb) / 2)])
        for _ in range(votes):
            outcome = str(rng.choice(["a", "b", "tie"], p=p / p.sum()))
            drawn.append(Comparison(f"battle-{number}", a, b, outcome))  # type: ignore[arg-type]
    return drawn


def centred(truth: dict[str, float]) -> dict[str, float]:
    """The true ratings anchored as the fit anchors them: the average model at 1000."""
    mean = sum(truth.values()) / len(truth)
    return {name: value - mean + ratings.BASE_RATING for name, value in truth.items()}


def test_the_fit_recovers_known_strengths_with_their_intervals() -> None:
    fit = fit_ratings(draw_battles(TRUE_RATINGS, 4000, TRUE_TIE, seed=7), min_battles=20)
    expected = centred(TRUE_RATINGS)

    assert [r.model for r in fit.ratings] == sorted(TRUE_RATINGS, key=lambda m: -TRUE_RATINGS[m])
    for rating in fit.ratings:
        assert rating.low <= expected[rating.model] <= rating.high, rating
        assert rating.low <= rating.rating <= rating.high
        assert rating.high - rating.low < 100  # 4,000 battles pin each model down
    assert abs(fit.tie_strength - TRUE_TIE) < 0.1
    assert fit.comparisons == fit.battles == 4000
    assert sum(r.battles for r in fit.ratings) == 2 * 4000
    # The anchor: the average model is at 1000.
    assert abs(np.mean([r.rating for r in fit.ratings]) - ratings.BASE_RATING) < 1e-6
    # Models 120+ points apart are told apart; m3 and m4 (80 apart) too; m4 and m5 (15 apart) share a rank.
    ranks = {r.model: r.rank for r in fit.ratings}
    assert ranks["m1"] == 1 and ranks["m2"] == 2 and ranks["m6"] == 6
    assert ranks["m4"] == ranks["m5"]


def test_intervals_narrow_as_battles_accumulate() -> None:
    few = fit_ratings(draw_battles(TRUE_RATINGS, 300, TRUE_TIE, seed=1), resamples=300)
    many = fit_ratings(draw_battles(TRUE_RATINGS, 3000, TRUE_TIE, seed=1), resamples=300)
    for model in TRUE_RATINGS:
        few_width = few.get(model).high - few.get(model).low  # type: ignore[union-attr]
        many_width = many.get(model).high - many.get(model).low  # type: ignore[union-attr]
        assert many_width < few_width / 2  # about √10 narrower


def test_ties_are_their_own_outcome() -> None:
    # Equals that always tie: the same rating, and a large tie parameter.
    even = fit_ratings(
        [Comparison(f"b{i}", "x", "y", "tie") for i in range(30)], min_battles=1, resamples=200
    )
    x, y = even.get("x"), even.get("y")
    assert x is not None and y is not None
    assert abs(x.rating - y.rating) < 1e-6
    assert x.ties == y.ties == 30 and x.wins == x.losses == 0
    assert even.tie_strength > 10
    # No ties at all: the tie parameter goes to (nearly) nothing.
    decided = fit_ratings(draw_battles(TRUE_RATINGS, 500, 0.0, seed=3), resamples=50)
    assert decided.tie_strength < 1e-3
    # A tie counts between a win and a loss: beating y and tying with z puts z above y.
    mixed = [Comparison(f"w{i}", "x", "y", "a") for i in range(20)]
    mixed += [Comparison(f"t{i}", "x", "z", "tie") for i in range(20)]
    ordered = fit_ratings(mixed, min_battles=1, resamples=100)
    assert [r.model for r in ordered.ratings] == ["x", "z", "y"]


def test_a_model_that_won_every_battle_gets_a_finite_rating() -> None:
    fit = fit_ratings(
        [Comparison(f"b{i}", "champ", "rival", "a") for i in range(25)], resamples=100
    )
    champ = fit.get("champ")
    assert champ is not None and math.isfinite(champ.rating) and math.isfinite(champ.high)
    assert champ.rating > fit.get("rival").rating + 400  # type: ignore[union-attr]


def test_the_votes_of_one_battle_count_once_as_a_battle_each_as_a_verdict() -> None:
    fit = fit_ratings(
        draw_battles(TRUE_RATINGS, 200, TRUE_TIE, seed=5, votes=3), min_battles=1, resamples=100
    )
    assert fit.battles == 200 and fit.comparisons == 600
    assert sum(r.battles for r in fit.ratings) == 2 * 200
    assert sum(r.wins + r.losses + r.ties for r in fit.ratings) == 2 * 600


def test_the_bootstrap_is_seeded() -> None:
    battles = draw_battles(TRUE_RATINGS, 500, TRUE_TIE, seed=2)
    one = fit_ratings(battles, resamples=200, seed=11)
    again = fit_ratings(battles, resamples=200, seed=11)
    other = fit_ratings(battles, resamples=200, seed=12)
    assert one == again
    assert [r.rating for r in one.ratings] == [r.rating for r in other.ratings]
    assert [r.low for r in one.ratings] != [r.low for r in other.ratings]


def test_the_stacked_fit_is_each_fit_on_its_own() -> None:
    """The bootstrap fits its resamples in one stacked run: it must land where each alone does."""
    battles = draw_battles(TRUE_RATINGS, 400, TRUE_TIE, seed=9)
    names = sorted(TRUE_RATINGS)
    met = sorted({tuple(sorted((names.index(c.model_a), names.index(c.model_b)))) for c in battles})
    pairs = ratings._Pairs(np.zeros((len(met), len(names))), np.zeros((len(met), len(names))))
    pairs.first[np.arange(len(met)), [p[0] for p in met]] = 1
    pairs.second[np.arange(len(met)), [p[1] for p in met]] = 1
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 40, size=(5, len(met), 3)).astype(np.float64)
    together = ratings._fit(pairs, stack, np.zeros((5, len(names) + 1)))
    for row in range(5):
        alone = ratings._fit(pairs, stack[row : row + 1], np.zeros((1, len(names) + 1)))[0]
        assert np.allclose(together[row], alone, atol=1e-4)


def test_rank_is_one_plus_the_models_surely_better() -> None:
    low = [1100.0, 1050.0, 990.0, 900.0, 1200.0]
    high = [1150.0, 1120.0, 1060.0, 960.0, 1300.0]
    ranked = [True, True, True, True, False]
    # The fifth model is unranked: it neither gets a rank nor pushes anyone down.
    assert rank_from_intervals(low, high, ranked) == [1, 1, 2, 4, None]
    assert rank_from_intervals([], [], []) == []


def test_models_with_too_few_battles_are_unranked_but_rated() -> None:
    battles = draw_battles({"a": 1100, "b": 1000, "c": 900}, 300, TRUE_TIE, seed=4)
    battles += [Comparison(f"new-{i}", "newcomer", "a", "a") for i in range(5)]
    fit = fit_ratings(battles, min_battles=20, resamples=100)
    newcomer = fit.get("newcomer")
    assert newcomer is not None and newcomer.rank is None and not newcomer.ranked
    assert newcomer.battles == 5 and newcomer.wins == 5
    assert fit.ratings[-1] is newcomer  # the unranked come after the ranked
    assert all(r.ranked for r in fit.ratings[:-1])
    assert newcomer.rating > fit.get("a").rating  # type: ignore[union-attr]
    # Its rank would be 1 if it counted; unranked, it pushes nobody down.
    assert fit.get("a").rank == 1  # type: ignore[union-attr]


def test_no_battles_and_bad_input() -> None:
    empty = fit_ratings([])
    assert empty.ratings == () and empty.battles == 0
    with pytest.raises(ValueError, match="itself"):
        fit_ratings([Comparison("b", "x", "x", "a")])
    with pytest.raises(ValueError, match="outcome"):
        fit_ratings([Comparison("b", "x", "y", "bad")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two different pairs"):
        fit_ratings([Comparison("b", "x", "y", "a"), Comparison("b", "x", "z", "a")])
