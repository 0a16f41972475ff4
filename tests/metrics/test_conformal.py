"""Conformal risk control of the FNR: histograms and threshold against brute force,
and the guarantee on synthetic exchangeable cases."""

from __future__ import annotations

import numpy as np
import pytest

from mobseg.metrics.conformal import (
    ThresholdHistogram,
    calibrate,
    crc_threshold,
    held_out_risk,
    threshold_grid,
)


def _case(rng: np.random.Generator, size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A case: G and p, organ voxels' p ~ Beta(a, 1.5) with a case-specific a."""
    g = rng.random(size) < rng.uniform(0.2, 0.5)
    a = rng.uniform(0.8, 4.0)  # case difficulty
    p = np.where(g, rng.beta(a, 1.5, size), rng.beta(1.0, 6.0, size)).astype(np.float32)
    return p, g


def test_histogram_fnr_and_volume_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    k = 50
    grid = threshold_grid(k)
    p, g = _case(rng, 1000)
    p[:20] = grid[rng.integers(0, k + 1, 20)]  # values exactly on thresholds
    h = ThresholdHistogram(k).add(p, g)
    want_fnr = np.array([((p < lam) & g).sum() / g.sum() for lam in grid])
    want_vol = np.array([(p >= lam).sum() for lam in grid])
    np.testing.assert_allclose(h.fnr(), want_fnr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(h.volume(), want_vol)
    assert (ThresholdHistogram(k).add(p, np.zeros_like(g)).fnr() == 0).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_threshold_is_the_brute_force_largest_admissible_lambda(alpha: float) -> None:
    rng = np.random.default_rng(int(alpha * 100))
    k = 100
    grid = threshold_grid(k)
    cases = [_case(rng) for _ in range(30)]
    got = calibrate([ThresholdHistogram(k).add(p, g) for p, g in cases], alpha)
    n = len(cases)
    best = None
    for lam in grid:  # brute force: the condition written out at every lambda
        risk = np.mean([((p < lam) & g).sum() / g.sum() for p, g in cases])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha:
            best = lam
    assert best is not None and got.feasible
    assert got.lam == pytest.approx(best) and grid[got.index] == got.lam and got.n == n


def test_too_few_calibration_cases_predict_everything() -> None:
    fnr = np.zeros((5, 11))  # 1/(n+1) = 1/6 > alpha
    t = crc_threshold(fnr, threshold_grid(10), alpha=0.1)
    assert not t.feasible and t.lam == 0.0 and t.index == 0
    with pytest.raises(ValueError, match="alpha"):
        crc_threshold(fnr, threshold_grid(10), alpha=1.5)


def test_held_out_risk_by_hand() -> None:
    p = np.array([0.2, 0.4, 0.6, 0.9, 0.3, 0.55], np.float32)
    g = np.array([1, 1, 1, 1, 0, 0], bool)
    h = ThresholdHistogram(10).add(p, g)
    t = crc_threshold(np.zeros((50, 11)), threshold_grid(10), alpha=0.1)
    assert t.lam == 1.0  # zero calibration FNR: the largest lambda
    t = type(t)(lam=0.3, index=3, feasible=True, n=50, alpha=0.1)
    out = held_out_risk([h], t, n_pred=[3])  # S = p > 0.5: 0.6, 0.9, 0.55
    assert out["crc_fnr"] == pytest.approx(1 / 4)  # 0.2 is left out
    assert out["crc_volume_ratio"] == pytest.approx(5 / 3)  # 0.4 0.6 0.9 0.3 0.55
    assert out["crc_extra_volume"] == pytest.approx(2 / 3)


def test_guarantee_on_exchangeable_cases_over_random_splits() -> None:
    """Over R random calibration/test splits of i.i.d. cases, the mean test FNR is
    at most alpha + 3 standard errors (the bound holds in expectation), and not
    far below alpha - 2/(n+1) (conformal risk control is tight, Theorem 2)."""
    rng = np.random.default_rng(2026)
    alpha, n_cal, n_test, trials, k = 0.1, 29, 20, 300, 200
    grid = threshold_grid(k)
    pool = [ThresholdHistogram(k).add(*_case(rng, 300)) for _ in range(n_cal + n_test)]
    fnr_pool = np.stack([h.fnr() for h in pool])
    achieved = []
    for _ in range(trials):
        # fresh exchangeable cases each trial: redraw the pool half of the time
        if rng.random() < 0.5:
            pool = [ThresholdHistogram(k).add(*_case(rng, 300)) for _ in range(n_cal + n_test)]
            fnr_pool = np.stack([h.fnr() for h in pool])
        perm = rng.permutation(n_cal + n_test)
        cal, test = perm[:n_cal], perm[n_cal:]
        t = crc_threshold(fnr_pool[cal], grid, alpha)
        achieved.append(fnr_pool[test, t.index].mean())
    achieved = np.array(achieved)
    se = achieved.std(ddof=1) / np.sqrt(trials)
    assert achieved.mean() <= alpha + 3 * se
    assert achieved.mean() >= alpha - 2 / (n_cal + 1) - 3 * se
