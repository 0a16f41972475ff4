"""Quality of the uncertainty: voxel error detection and case-level risk-coverage.

SPEC section 6.

**Voxel error detection.** A voxel is an error when the segmentation disagrees
with the reference (S != G). A good uncertainty score u (Var[p] or the
predictive entropy) ranks errors above correct voxels. AUROC is
P(u_error > u_correct) + P(tie) / 2; AUPRC is the average precision
sum_k (R_k - R_{k-1}) P_k over descending thresholds (scikit-learn's
``average_precision_score``).

Decision (streamed, binned): a test set has ~10^10 voxels, so the scores are
never sorted. Each score is reduced to a *bin code*: the top bits of its
float32 bit pattern. For non-negative floats the bit pattern is monotone in
the value, so the code is a monotone histogram bin of *relative* width
2^-(23 - shift) (shift = 12: 2^-11, about 0.05 %) at every magnitude, from
1e-38 to the largest float; a variance of 1e-9 and one of 0.2 are resolved
equally well, which a uniform histogram on [0, 0.25] would not do. Two
histograms (errors, correct voxels) of 2^19 counts each summarise any number
of voxels; pooling cases adds histograms. Scores that share a code count as
ties, so the binned AUROC differs from the exact one by at most
:meth:`ErrorDetectionAccumulator.tie_bound` (half the fraction of
error/correct pairs that share a bin); it is exact whenever every bin holds
one distinct score (e.g. scores with at most 23 - shift significant mantissa
bits). ``tests/metrics/test_uncertainty.py`` checks both against
scikit-learn.

**Risk-coverage.** Per case, risk = 1 - Dice and confidence = minus the mean
uncertainty over the predicted organ S (over the whole volume when S is
empty). Cases are accepted in order of decreasing confidence; the selective
risk at coverage k/n is the mean risk of the k accepted cases, and
AURC = (1/n) sum_k risk_k. Tied confidences get the mean risk of their tie
group, which is the expectation over a random order of the ties. E-AURC
subtracts the AURC of the oracle order (by increasing risk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mobseg.metrics._common import (
    as_bool_mask,
    check_finite_nonnegative,
    check_same_shape,
    flat_chunks,
)

#: Bits dropped from the float32 pattern: codes keep 8 exponent + 11 mantissa bits.
DEFAULT_SHIFT = 12


def score_codes(score: np.ndarray, shift: int = DEFAULT_SHIFT) -> np.ndarray:
    """Monotone bin codes of non-negative scores (top bits of the float32 pattern).

    Args:
        score: Scores >= 0, 1-D; negative values and -0.0 map to code 0.
        shift: Low bits of the float32 pattern to drop.

    Returns:
        int64 codes in [0, 2^(31 - shift)).
    """
    s = np.array(score, dtype=np.float32, copy=True)
    s[~(s > 0)] = 0.0  # -0.0, tiny negatives
    return (s.view(np.uint32) >> np.uint32(shift)).astype(np.int64)


@dataclass
class ErrorDetectionAccumulator:
    """Streaming histograms of an uncertainty score for errors and correct voxels.

    Args:
        shift: Low bits dropped from the float32 pattern, 8..24 (see module
            docstring); 2^(32 - shift) counters of 8 bytes are kept.

    Attributes:
        hist: (2, 2^(31 - shift)) int64; row 0 correct voxels, row 1 errors.
    """

    shift: int = DEFAULT_SHIFT
    hist: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not 8 <= self.shift <= 24:
            raise ValueError(f"shift must be in [8, 24], got {self.shift}.")
        self.hist = np.zeros((2, 1 << (31 - self.shift)), dtype=np.int64)

    @property
    def n_codes(self) -> int:
        return self.hist.shape[1]

    def update(self, score: np.ndarray, error: np.ndarray) -> ErrorDetectionAccumulator:
        """Add voxels.

        Args:
            score: Uncertainty per voxel (>= 0, finite), any shape.
            error: 0/1 or bool mask of errors (S != G), same shape.

        Returns:
            self.
        """
        check_same_shape(score=score, error=error)
        for u, e in flat_chunks(np.asarray(score), np.asarray(error)):
            check_finite_nonnegative(u, "uncertainty score")
            self._add_codes(score_codes(u, self.shift), as_bool_mask(e, "error mask"))
        return self

    def _add_codes(self, codes: np.ndarray, error: np.ndarray) -> None:
        """Add one flat chunk of codes (from :func:`score_codes`, modified in place)."""
        k = self.n_codes
        codes += error * k
        self.hist += np.bincount(codes, minlength=2 * k).reshape(2, k)

    def merge(self, other: ErrorDetectionAccumulator) -> ErrorDetectionAccumulator:
        """Add the histograms of ``other`` (same shift); returns self."""
        if other.shift != self.shift:
            raise ValueError(f"Cannot merge shift {other.shift} into shift {self.shift}.")
        self.hist += other.hist
        return self

    @property
    def n_errors(self) -> int:
        return int(self.hist[1].sum())

    @property
    def n_correct(self) -> int:
        return int(self.hist[0].sum())

    def _compressed(self) -> tuple[np.ndarray, np.ndarray]:
        """(correct, errors) counts of the non-empty bins, ascending score, as float64."""
        nz = np.flatnonzero(self.hist[0] | self.hist[1])
        return self.hist[0, nz].astype(np.float64), self.hist[1, nz].astype(np.float64)

    def auroc(self) -> float:
        """Area under the ROC curve of detecting errors; NaN without both classes."""
        neg, pos = self._compressed()
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # correct voxels with a strictly lower code
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def auprc(self) -> float:
        """Average precision of detecting errors; NaN without errors."""
        neg, pos = self._compressed()
        neg, pos = neg[::-1], pos[::-1]  # descending score
        n_pos = pos.sum()
        if n_pos == 0:
            return float("nan")
        keep = pos > 0
        tp = np.cumsum(pos)[keep]
        fp = np.cumsum(neg)[keep]
        precision = tp / (tp + fp)
        return float((pos[keep] / n_pos * precision).sum())

    def tie_bound(self) -> float:
        """Upper bound of |binned AUROC - exact AUROC|: half the share of tied pairs."""
        neg, pos = self._compressed()
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        return float(0.5 * (pos * neg).sum() / (n_pos * n_neg))


def error_detection_auroc(
    score: np.ndarray, error: np.ndarray, shift: int = DEFAULT_SHIFT
) -> float:
    """Binned AUROC of detecting errors from an uncertainty score (see module docstring).

    Args:
        score: Uncertainty per voxel, any shape.
        error: 0/1 mask of errors, same shape.
        shift: Binning resolution, 8..24 (bins of relative width 2^-(23 - shift)).
    """
    return ErrorDetectionAccumulator(shift).update(score, error).auroc()


def error_detection_auprc(
    score: np.ndarray, error: np.ndarray, shift: int = DEFAULT_SHIFT
) -> float:
    """Binned average precision of detecting errors from an uncertainty score.

    Args:
        score: Uncertainty per voxel, any shape.
        error: 0/1 mask of errors, same shape.
        shift: Binning resolution, 8..24 (bins of relative width 2^-(23 - shift)).
    """
    return ErrorDetectionAccumulator(shift).update(score, error).auprc()


def _tie_averaged(risk: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Risks sorted by decreasing confidence, each tie group replaced by its mean."""
    order = np.argsort(-confidence, kind="stable")
    r, c = risk[order], confidence[order]
    out = r.copy()
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    ends = np.r_[starts[1:], len(c)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            out[s:e] = r[s:e].mean()
    return out


def _valid_pairs(risk: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if risk.shape != confidence.shape:
        raise ValueError(
            f"risk {risk.shape} and confidence {confidence.shape} must have one length."
        )
    keep = np.isfinite(risk) & ~np.isnan(confidence)
    return risk[keep], confidence[keep]


def risk_coverage_curve(risk: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at every coverage k/n (cases with NaN risk are dropped).

    Args:
        risk: (n,) risk per case, e.g. 1 - Dice.
        confidence: (n,) confidence per case (higher = accepted first).

    Returns:
        coverage (n,) = k/n for k = 1..n, and selective risk (n,) = mean risk of
        the k most confident cases (ties averaged).
    """
    risk, confidence = _valid_pairs(risk, confidence)
    n = risk.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    r = _tie_averaged(risk, confidence)
    k = np.arange(1, n + 1, dtype=np.float64)
    return k / n, np.cumsum(r) / k


def aurc(risk: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk-coverage curve, (1/n) sum_k selective_risk_k; NaN if empty.

    Args:
        risk: (n,) risk per case.
        confidence: (n,) confidence per case.
    """
    _, sel = risk_coverage_curve(risk, confidence)
    return float(sel.mean()) if sel.size else float("nan")


def excess_aurc(risk: np.ndarray, confidence: np.ndarray) -> float:
    """E-AURC: AURC minus the AURC of the oracle ranking (increasing risk).

    Args:
        risk: (n,) risk per case.
        confidence: (n,) confidence per case.
    """
    r, c = _valid_pairs(risk, confidence)
    if r.size == 0:
        return float("nan")
    return aurc(r, c) - aurc(r, -r)
