"""One-pass case evaluation and test-set pooling against the separate metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryCalibrationError

from mobseg.metrics import (
    TestSetAccumulator,
    brier_score,
    dice,
    evaluate_case,
    expected_calibration_error,
    generalized_energy_distance,
    maximum_calibration_error,
    negative_log_likelihood,
    probability_error,
    roi_slices,
)
from mobseg.metrics.probabilistic import binary_entropy
from mobseg.metrics.uncertainty import aurc


def _case(seed: int, shape: tuple[int, ...] = (9, 14, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(z**2 + (y - 0.1 * seed) ** 2 + x**2)
    pstar = 1 / (1 + np.exp((r - 0.5) * 12))
    target = (rng.random(shape) < pstar).astype(np.uint8)
    prob = np.clip(pstar + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    var = (prob * (1 - prob) * rng.uniform(0.1, 0.3, shape)).astype(np.float32)
    return {"prob": prob, "target": target, "var": var, "pstar": pstar.astype(np.float32)}


def test_one_pass_equals_separate_functions() -> None:
    c = _case(0)
    refs = [c["target"], (c["pstar"] > 0.4).astype(np.uint8), (c["pstar"] > 0.6).astype(np.uint8)]
    res = evaluate_case(
        c["prob"], c["target"], variance=c["var"], references=refs, true_prob=c["pstar"], case="x"
    )
    row = res.row
    seg = c["prob"] > 0.5
    err = seg != c["target"].astype(bool)
    assert row["case"] == "x"
    assert row["dice"] == pytest.approx(dice(seg, c["target"]))
    assert row["nll"] == pytest.approx(negative_log_likelihood(c["prob"], c["target"]))
    assert row["brier"] == pytest.approx(brier_score(c["prob"], c["target"]))
    assert row["ece"] == pytest.approx(expected_calibration_error(c["prob"], c["target"]))
    assert row["mce"] == pytest.approx(maximum_calibration_error(c["prob"], c["target"]))
    assert row["auroc_var"] == pytest.approx(roc_auc_score(err.ravel(), c["var"].ravel()), abs=1e-3)
    ent = binary_entropy(c["prob"])
    assert row["auroc_entropy"] == pytest.approx(roc_auc_score(err.ravel(), ent.ravel()), abs=1e-3)
    assert row["mean_var_pred"] == pytest.approx(c["var"][seg].mean(), rel=1e-5)
    assert row["mean_entropy_pred"] == pytest.approx(ent[seg].mean(), rel=1e-5)
    g = generalized_energy_distance([seg], refs)
    assert row["ged2"] == pytest.approx(g.ged2)
    assert row["n_samples"] == 1 and row["n_references"] == 3
    mae, rmse = probability_error(c["prob"], c["pstar"])
    assert (row["pstar_mae"], row["pstar_rmse"]) == (pytest.approx(mae), pytest.approx(rmse))
    assert row["n_voxels"] == c["prob"].size
    assert row["n_true"] == int(c["target"].sum()) and row["n_pred"] == int(seg.sum())


def test_chunk_size_does_not_change_results() -> None:
    c = _case(1)
    big = evaluate_case(c["prob"], c["target"], variance=c["var"]).row
    small = evaluate_case(c["prob"], c["target"], variance=c["var"], chunk=97).row
    for k, v in big.items():
        if isinstance(v, float) and not math.isnan(v):
            assert small[k] == pytest.approx(v, rel=1e-9), k
        else:
            assert (small[k] == v) or (math.isnan(small[k]) and math.isnan(v)), k


def test_known_values_perfect_inverted_constant() -> None:
    t = np.zeros((5, 6, 7), dtype=np.uint8)
    t[1:4, 2:5, 2:6] = 1
    perfect = evaluate_case(t.astype(np.float32), t).row
    assert (perfect["dice"], perfect["nll"], perfect["brier"], perfect["ece"]) == (1, 0, 0, 0)
    assert math.isnan(perfect["auroc_entropy"])  # no errors to detect
    inverted = evaluate_case(1 - t.astype(np.float32), t).row
    assert inverted["dice"] == 0 and inverted["brier"] == pytest.approx(2)
    assert inverted["ece"] == pytest.approx(1) and inverted["mce"] == pytest.approx(1)
    assert inverted["nll"] == pytest.approx(-math.log(1e-8), rel=1e-6)
    half = evaluate_case(np.full(t.shape, 0.5, np.float32), t).row
    assert half["dice"] == 0 and half["n_pred"] == 0  # 0.5 is a tie -> background
    assert half["nll"] == pytest.approx(math.log(2)) and half["brier"] == pytest.approx(0.5)
    assert half["ece"] == pytest.approx(abs(t.mean() - 0.5))
    # S empty: mean uncertainty falls back to the whole volume (entropy ln 2 everywhere)
    assert half["mean_entropy_pred"] == pytest.approx(math.log(2), rel=1e-6)
    empty = evaluate_case(np.zeros(t.shape, np.float32), np.zeros_like(t)).row
    assert math.isnan(empty["dice"])


def test_roi_is_bounding_box_of_gt_or_seg_plus_margin() -> None:
    prob = np.zeros((10, 12, 14), dtype=np.float32)
    target = np.zeros(prob.shape, dtype=np.uint8)
    target[3:5, 4:6, 5:7] = 1
    prob[6, 8, 9] = 0.9  # a false positive widens the box
    assert roi_slices(prob, target, margin=0) == (slice(3, 7), slice(4, 9), slice(5, 10))
    assert roi_slices(prob, target, margin=4) == (slice(0, 10), slice(0, 12), slice(1, 14))
    assert roi_slices(prob, target, margin=1, chunk=12 * 14) == (
        slice(2, 8),
        slice(3, 10),
        slice(4, 11),
    )
    assert roi_slices(np.zeros_like(prob), np.zeros_like(target), 2) is None
    c = _case(2)
    for chunk in (97, 14 * 16 * 2, 1 << 21):  # slabs of one row, two rows, the whole case
        res = evaluate_case(c["prob"], c["target"], margin=1, chunk=chunk)
        box = roi_slices(c["prob"], c["target"], 1)
        assert res.roi == box
        row = res.row
        p, t = c["prob"][box], c["target"][box]
        assert row["n_voxels_roi"] == p.size < c["prob"].size == row["n_voxels"]
        assert row["ece_roi"] == pytest.approx(expected_calibration_error(p, t))
        assert row["mce_roi"] == pytest.approx(maximum_calibration_error(p, t))
        assert row["nll_roi"] == pytest.approx(negative_log_likelihood(p, t))
        assert row["brier_roi"] == pytest.approx(brier_score(p, t))
        # the whole-volume columns stay the whole volume's
        assert row["nll"] == pytest.approx(negative_log_likelihood(c["prob"], c["target"]))
        assert row["nll_roi"] > row["nll"]  # the background dilutes the whole-volume NLL
        assert row["dice"] == pytest.approx(dice(c["prob"] > 0.5, c["target"]))
    # G and S empty: no ROI, NaN scores, zero voxels
    empty = evaluate_case(np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8))
    assert empty.roi is None and empty.row["n_voxels_roi"] == 0
    assert math.isnan(empty.row["nll_roi"]) and math.isnan(empty.row["ece_roi"])


def test_pooled_row_equals_all_voxels_at_once() -> None:
    cases = [_case(s) for s in range(3)]
    acc = TestSetAccumulator()
    for i, c in enumerate(cases):
        acc.add(evaluate_case(c["prob"], c["target"], variance=c["var"], case=f"c{i}"))
    row = acc.pooled_row()
    p = np.concatenate([c["prob"].ravel() for c in cases])
    t = np.concatenate([c["target"].ravel() for c in cases])
    v = np.concatenate([c["var"].ravel() for c in cases])
    metric = BinaryCalibrationError(n_bins=15, norm="l1")
    metric.update(torch.from_numpy(p), torch.from_numpy(t).long())
    assert row["ece"] == pytest.approx(float(metric.compute()), abs=1e-6)
    assert row["nll"] == pytest.approx(negative_log_likelihood(p, t))
    assert row["brier"] == pytest.approx(brier_score(p, t))
    assert row["auroc_var"] == pytest.approx(roc_auc_score((p > 0.5) != t, v), abs=1e-3)
    boxes = [roi_slices(c["prob"], c["target"], 10) for c in cases]
    p_roi = np.concatenate([c["prob"][b].ravel() for c, b in zip(cases, boxes, strict=True)])
    t_roi = np.concatenate([c["target"][b].ravel() for c, b in zip(cases, boxes, strict=True)])
    assert row["ece_roi"] == pytest.approx(expected_calibration_error(p_roi, t_roi))
    assert row["nll_roi"] == pytest.approx(negative_log_likelihood(p_roi, t_roi))
    assert row["n_voxels_roi"] == p_roi.size
    dices = [r["dice"] for r in acc.rows]
    assert row["dice"] == pytest.approx(np.mean(dices))
    assert row["dice_std"] == pytest.approx(np.std(dices, ddof=1))
    conf = -np.array([r["mean_var_pred"] for r in acc.rows])
    assert row["aurc_var"] == pytest.approx(aurc(1 - np.array(dices), conf))
    assert row["n_cases"] == 3 and row["n_nan_dice"] == 0
    assert row["n_voxels"] == p.size


def test_nan_dice_counted_and_excluded() -> None:
    acc = TestSetAccumulator()
    t = np.zeros((4, 4), dtype=np.uint8)
    acc.add(evaluate_case(np.zeros((4, 4), np.float32), t, case="empty"))
    t2 = t.copy()
    t2[1, 1] = 1
    acc.add(evaluate_case(t2.astype(np.float32), t2, case="ok"))
    row = acc.pooled_row()
    assert row["n_nan_dice"] == 1 and row["dice"] == 1.0


def test_errors_name_the_array() -> None:
    c = _case(0)
    with pytest.raises(ValueError, match=r"variance \(2, 2\)"):
        evaluate_case(c["prob"], c["target"], variance=np.zeros((2, 2)))
    bad = c["prob"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="probability holds NaN"):
        evaluate_case(bad, c["target"])
    with pytest.raises(ValueError, match="variance holds NaN"):
        v = c["var"].copy()
        v[1, 1, 1] = np.inf
        evaluate_case(c["prob"], c["target"], variance=v)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        evaluate_case(c["prob"], c["target"], margin=-1)


def _truth_brute(p: np.ndarray, q: np.ndarray, v: np.ndarray) -> dict[str, float]:
    """Every metric against p* by direct numpy/scipy formulas on the given voxels."""
    from scipy.stats import pearsonr

    p, q, v = (np.asarray(x, dtype=np.float64).ravel() for x in (p, q, v))
    pc = np.maximum(p, 1e-8)
    qc = np.maximum(1 - p, 1e-8)
    a = q * (1 - q)
    return {
        "pstar_mae": float(np.abs(p - q).mean()),
        "pstar_rmse": float(np.sqrt(((p - q) ** 2).mean())),
        "pstar_nll": float(np.mean(-(q * np.log(pc) + (1 - q) * np.log(qc)))),
        "pstar_brier": float(np.mean(2 * ((p - q) ** 2 + a))),
        "pstar_var_corr": float(pearsonr(v, a)[0]),
        "pstar_var_ratio": float(v.mean() / a.mean()),
    }


def test_truth_metrics_whole_volume_and_band_against_brute_force() -> None:
    c = _case(4)
    refs = [c["target"], (c["pstar"] > 0.3).astype(np.uint8), (c["pstar"] > 0.7).astype(np.uint8)]
    samples = [(c["pstar"] > x).astype(np.uint8) for x in (0.4, 0.5, 0.6)]
    kwargs = dict(variance=c["var"], true_prob=c["pstar"], references=refs, samples=samples)
    row = evaluate_case(c["prob"], c["target"], **kwargs).row
    small = evaluate_case(c["prob"], c["target"], chunk=97, **kwargs).row  # streamed in rows
    q = c["pstar"]
    band = (q > np.float32(0.01)) & (q < np.float32(0.99))
    assert 0 < band.sum() < q.size
    expect = _truth_brute(c["prob"], q, c["var"])
    in_band = _truth_brute(c["prob"][band], q[band], c["var"][band])
    expect |= {f"{k}_band": v for k, v in in_band.items()}
    for key, value in expect.items():
        assert row[key] == pytest.approx(value, rel=1e-6), key
        assert small[key] == pytest.approx(value, rel=1e-6), key
    assert row["n_voxels_band"] == int(band.sum())
    # the band is where the truth is uncertain: every per-voxel error is larger there
    assert row["pstar_nll_band"] > row["pstar_nll"] and row["pstar_mae_band"] > row["pstar_mae"]
    g = generalized_energy_distance(samples, refs)
    assert row["diversity_ratio"] == pytest.approx(g.diversity / g.reference_diversity)
    assert row["n_references"] == 3 and row["n_samples"] == 3


def test_truth_metrics_of_a_perfect_model_and_without_variance() -> None:
    from scipy.stats import entropy as scipy_entropy

    c = _case(5)
    q = c["pstar"]
    a = q.astype(np.float64) * (1 - q.astype(np.float64))
    row = evaluate_case(q, c["target"], variance=a.astype(np.float32), true_prob=q).row
    ent = np.mean([scipy_entropy([x, 1 - x]) for x in q.astype(np.float64).ravel()])
    assert row["pstar_mae"] == 0 and row["pstar_rmse"] == 0
    assert row["pstar_nll"] == pytest.approx(ent, rel=1e-6)
    assert row["pstar_brier"] == pytest.approx(2 * a.mean(), rel=1e-6)
    assert row["pstar_var_corr_band"] == pytest.approx(1.0, abs=1e-6)
    assert row["pstar_var_ratio_band"] == pytest.approx(1.0, rel=1e-5)
    # no variance map (deterministic export): the variance columns are NaN, the rest is there
    det = evaluate_case(c["prob"], c["target"], true_prob=q).row
    assert math.isnan(det["pstar_var_corr_band"]) and math.isnan(det["pstar_var_ratio"])
    assert det["pstar_mae_band"] > 0
    # no p*: every truth column is NaN
    none = evaluate_case(c["prob"], c["target"]).row
    assert all(math.isnan(none[k]) for k in none if k.startswith("pstar_"))


def test_pooled_truth_metrics_equal_all_voxels_at_once() -> None:
    cases = [_case(s) for s in range(3)]
    acc = TestSetAccumulator()
    for c in cases:
        acc.add(evaluate_case(c["prob"], c["target"], variance=c["var"], true_prob=c["pstar"]))
    row = acc.pooled_row()
    p, q, v = (np.concatenate([c[k].ravel() for c in cases]) for k in ("prob", "pstar", "var"))
    band = (q > np.float32(0.01)) & (q < np.float32(0.99))
    expect = _truth_brute(p, q, v)
    expect |= {f"{k}_band": val for k, val in _truth_brute(p[band], q[band], v[band]).items()}
    for key, value in expect.items():
        assert row[key] == pytest.approx(value, rel=1e-6), key
    assert row["n_voxels_band"] == int(band.sum())
