"""Error-detection AUROC/AUPRC against scikit-learn; AURC against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mobseg.metrics.uncertainty import (
    ErrorDetectionAccumulator,
    aurc,
    error_detection_auprc,
    error_detection_auroc,
    excess_aurc,
    risk_coverage_curve,
    score_codes,
)


def _data(seed: int, n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    error = rng.random(n) < 0.1
    # errors get larger variances on average; lognormal spans many magnitudes
    score = np.exp(rng.normal(-8 + 2.5 * error, 2.0)).astype(np.float32)
    return score, error


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_when_every_bin_holds_one_distinct_score(seed: int) -> None:
    # Scores on a grid of multiples of 2^-10 have <= 10 significant bits, fewer than
    # the 11 mantissa bits the default codes keep: binned == exact (sklearn, with ties).
    score, error = _data(seed)
    q = (np.round(np.clip(score * 4, 0, 1) * 1024) / 1024).astype(np.float32)
    assert np.unique(q).size == np.unique(score_codes(q)).size
    assert error_detection_auroc(q, error) == pytest.approx(roc_auc_score(error, q), abs=1e-12)
    assert error_detection_auprc(q, error) == pytest.approx(
        average_precision_score(error, q), abs=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_close_to_exact_within_documented_bound(seed: int) -> None:
    score, error = _data(seed)
    acc = ErrorDetectionAccumulator().update(score, error)
    exact = roc_auc_score(error, score)
    assert abs(acc.auroc() - exact) <= acc.tie_bound() + 1e-12
    assert acc.tie_bound() < 1e-3  # 0.05 % relative bins: few tied pairs
    assert acc.auprc() == pytest.approx(average_precision_score(error, score), abs=2e-3)


def test_coarser_bins_have_larger_bound_still_respected() -> None:
    score, error = _data(3)
    acc = ErrorDetectionAccumulator(shift=20).update(score, error)  # 3 mantissa bits
    assert abs(acc.auroc() - roc_auc_score(error, score)) <= acc.tie_bound() + 1e-12


def test_streamed_pieces_and_merge_equal_whole() -> None:
    score, error = _data(4)
    whole = ErrorDetectionAccumulator().update(score, error)
    parts = ErrorDetectionAccumulator()
    for sl in np.array_split(np.arange(score.size), 5):
        parts.merge(ErrorDetectionAccumulator().update(score[sl], error[sl]))
    np.testing.assert_array_equal(parts.hist, whole.hist)
    assert parts.auroc() == whole.auroc()


def test_known_values_and_degenerate_cases() -> None:
    error = np.array([0, 0, 1, 1], dtype=bool)
    assert error_detection_auroc(np.array([0.0, 0.1, 0.2, 0.3]), error) == 1.0
    assert error_detection_auroc(np.array([0.3, 0.2, 0.1, 0.0]), error) == 0.0
    assert error_detection_auroc(np.full(4, 0.1), error) == 0.5  # constant score: all ties
    assert error_detection_auprc(np.array([0.0, 0.1, 0.2, 0.3]), error) == 1.0
    assert math.isnan(error_detection_auroc(np.ones(3), np.zeros(3, bool)))  # no errors
    assert math.isnan(error_detection_auprc(np.ones(3), np.zeros(3, bool)))
    # -0.0 and tiny negative rounding noise count as 0
    assert error_detection_auroc(np.array([-0.0, -1e-9, 0.2, 0.3]), error) == 1.0


def test_rejects_nan_and_negative_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        error_detection_auroc(np.array([np.nan, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match=">= 0"):
        error_detection_auroc(np.array([-0.5, 1.0]), np.array([0, 1]))


def _brute_aurc(risk: list[float], conf: list[float]) -> float:
    """Mean over all orders consistent with decreasing confidence (ties permuted)."""
    groups: dict[float, list[float]] = {}
    for r, c in zip(risk, conf, strict=True):
        groups.setdefault(c, []).append(r)
    keys = sorted(groups, reverse=True)
    values = []
    for perms in itertools.product(*[list(itertools.permutations(groups[k])) for k in keys]):
        order = [r for p in perms for r in p]
        sel = [sum(order[: k + 1]) / (k + 1) for k in range(len(order))]
        values.append(sum(sel) / len(sel))
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("risk", "conf"),
    [
        ([0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.3]),
        ([0.1, 0.5, 0.2, 0.9, 0.0], [0.5, 0.5, 0.2, 0.2, 0.9]),  # ties
        ([0.3, 0.3, 0.8], [1.0, 1.0, 1.0]),  # all tied
    ],
)
def test_aurc_equals_brute_force_with_ties(risk: list[float], conf: list[float]) -> None:
    assert aurc(np.array(risk), np.array(conf)) == pytest.approx(_brute_aurc(risk, conf))


def test_risk_coverage_curve_and_excess() -> None:
    risk = np.array([0.1, 0.4, np.nan, 0.2])
    conf = np.array([3.0, 1.0, 5.0, 2.0])
    cov, sel = risk_coverage_curve(risk, conf)  # NaN risk (undefined Dice) dropped
    np.testing.assert_allclose(cov, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(sel, [0.1, 0.15, 0.7 / 3])
    assert excess_aurc(risk, -risk) == pytest.approx(0.0)  # oracle confidence
    assert excess_aurc(risk, risk) > 0
    assert math.isnan(aurc(np.array([]), np.array([])))
    with pytest.raises(ValueError, match=r"risk \(2,\) and confidence \(3,\)"):
        aurc(np.zeros(2), np.zeros(3))
