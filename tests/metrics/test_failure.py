"""Case-level uncertainty scores and failure detection against scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mobseg.metrics.case import TestSetAccumulator, evaluate_case
from mobseg.metrics.failure import (
    CASE_SCORES,
    auroc,
    boundary_band,
    failure_detection,
    failure_labels,
    volume_cv,
)
from mobseg.metrics.probabilistic import binary_entropy


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(40) < 0.3
    y[:2] = [True, False]
    s = rng.integers(0, 6, 40).astype(float)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_drops_nan_scores_and_is_nan_for_one_class() -> None:
    y = np.array([1, 0, 1, 0, 0], bool)
    s = np.array([0.9, np.nan, 0.2, 0.1, 0.5])
    keep = ~np.isnan(s)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert math.isnan(auroc(np.zeros(4, bool), np.arange(4.0)))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 30).astype(float)
    y = x + rng.normal(0, 2, 30).round()
    from mobseg.metrics.failure import spearman

    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_failure_labels_are_the_cases_below_the_quantile() -> None:
    dice = np.array([0.9, 0.2, np.nan, 0.85, 0.5, 0.88, 0.91, 0.87, 0.86, 0.89, 0.84])
    failed, thr = failure_labels(dice, 0.1)
    assert thr == pytest.approx(np.quantile(dice[~np.isnan(dice)], 0.1))
    # 10 defined values: the 10th percentile lies between 0.2 and 0.5
    assert thr == pytest.approx(0.2 + 0.9 * (0.5 - 0.2))
    assert failed.tolist() == [v < thr for v in np.nan_to_num(dice, nan=1.0)]
    assert failed.sum() == 1 and failed[1]
    with pytest.raises(ValueError, match="quantile"):
        failure_labels(dice, 1.0)


def test_volume_cv_is_sample_std_over_mean() -> None:
    v = [100, 120, 90, 110]
    assert volume_cv(v) == pytest.approx(np.std(v, ddof=1) / np.mean(v))
    assert math.isnan(volume_cv([5])) and math.isnan(volume_cv([0, 0]))


def _blob(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return field > 0.05


@pytest.mark.parametrize("width", [1, 2, 3])
def test_boundary_band_matches_taxicab_distance(width: int) -> None:
    m = _blob((20, 22, 18), width)
    band = boundary_band(m, width)
    # oracle: city-block distance to the other side, the volume's border not a surface
    padded = np.pad(m, 1, constant_values=True)
    d_in = ndimage.distance_transform_cdt(padded, metric="taxicab")[1:-1, 1:-1, 1:-1]
    d_out = ndimage.distance_transform_cdt(~m, metric="taxicab")
    expected = np.where(m, d_in <= width, d_out <= width)
    np.testing.assert_array_equal(band, expected)
    assert not boundary_band(np.zeros((4, 4), bool), 1).any()
    with pytest.raises(ValueError, match="width"):
        boundary_band(m, 0)


def test_case_scores_against_a_whole_volume_oracle() -> None:
    rng = np.random.default_rng(3)
    shape = (16, 20, 24)
    s_mask = _blob(shape, 7)
    prob = np.where(s_mask, rng.uniform(0.51, 1, shape), rng.uniform(0, 0.49, shape))
    target = _blob(shape, 8)
    var = rng.uniform(0, 0.05, shape)
    mi = rng.uniform(0, 0.3, shape)
    samples = [(prob > t).astype(np.uint8) for t in (0.3, 0.5, 0.7)]
    res = evaluate_case(
        prob,
        target,
        variance=var,
        mutual_information=mi,
        samples=samples,
        boundary_width=2,
        chunk=500,
    )
    band = boundary_band(prob > 0.5, 2)
    row = res.row
    assert row["n_voxels_boundary"] == band.sum()
    assert row["mean_var_boundary"] == pytest.approx(var[band].mean())
    assert row["mean_mi_boundary"] == pytest.approx(mi[band].mean())
    assert row["mean_entropy_boundary"] == pytest.approx(binary_entropy(prob)[band].mean())
    assert row["mean_mi_pred"] == pytest.approx(mi[prob > 0.5].mean())
    vols = [m.sum() for m in samples]
    assert row["volume_cv"] == pytest.approx(np.std(vols, ddof=1) / np.mean(vols))


def test_case_scores_with_empty_prediction_fall_back_to_the_whole_volume() -> None:
    prob = np.full((4, 5, 6), 0.2)
    var = np.linspace(0, 0.1, prob.size).reshape(prob.shape)
    res = evaluate_case(prob, np.zeros(prob.shape, np.uint8), variance=var)
    assert res.row["n_voxels_boundary"] == 0
    assert res.row["mean_var_boundary"] == pytest.approx(var.mean())
    assert math.isnan(res.row["mean_mi_pred"]) and math.isnan(res.row["volume_cv"])


def test_pooled_failure_columns_match_sklearn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    acc = TestSetAccumulator()
    shape = (10, 12, 12)
    target = _blob(shape, 1)
    for i in range(12):
        # worse cases get a noisier prediction and a larger variance
        noise = 0.05 + 0.04 * i
        prob = np.clip(target * 0.8 + 0.1 + rng.normal(0, noise, shape), 0, 1)
        var = rng.uniform(0, noise, shape)
        acc.add(evaluate_case(prob, target, case=f"c{i}", variance=var))
    pooled = acc.pooled_row()
    dice = np.array([r["dice"] for r in acc.rows])
    failed = dice < np.quantile(dice, 0.1)
    assert pooled["n_failed"] == failed.sum() >= 1
    for s in ("mean_var_pred", "mean_entropy_boundary"):
        score = np.array([r[s] for r in acc.rows])
        label = s[len("mean_") :]
        assert pooled[f"fail_auroc_{label}"] == pytest.approx(roc_auc_score(failed, score))
        assert pooled[f"fail_spearman_{label}"] == pytest.approx(
            spearmanr(score, 1 - dice).statistic
        )
    assert math.isnan(pooled["fail_auroc_mi_pred"])  # no MI map
    direct = failure_detection(acc.rows)
    assert direct == {k: pooled[k] for k in direct} or all(
        (math.isnan(v) and math.isnan(pooled[k])) or v == pooled[k] for k, v in direct.items()
    )
    assert len(direct) == 2 + 2 * len(CASE_SCORES)


def test_a_constant_score_ranks_at_chance_and_has_no_correlation() -> None:
    from mobseg.metrics.failure import spearman

    y = np.array([1, 0, 0, 0], bool)
    assert auroc(y, np.zeros(4)) == roc_auc_score(y, np.zeros(4)) == 0.5
    assert math.isnan(spearman(np.zeros(4), np.arange(4.0)))
