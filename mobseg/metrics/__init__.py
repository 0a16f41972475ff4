"""Metrics of the study (SPEC section 6), streamed over chunks of each case.

One concept per module, each a pure function plus a streaming accumulator
(``update`` per case or chunk, ``merge`` to pool, ``compute``-style getters):

- :mod:`~mobseg.metrics.dice`: Dice of S = (p > 0.5) against G.
- :mod:`~mobseg.metrics.calibration`: ECE, MCE, reliability bins (15 bins).
- :mod:`~mobseg.metrics.probabilistic`: NLL and Brier score.
- :mod:`~mobseg.metrics.uncertainty`: voxel error-detection AUROC/AUPRC
  (binned, any number of voxels) and case-level risk-coverage / AURC.
- :mod:`~mobseg.metrics.ged`: GED^2 and sample diversity (1 - IoU).
- :mod:`~mobseg.metrics.phantom`: error of p against the true p*, and the
  ambiguity band 0.01 < p* < 0.99.
- :mod:`~mobseg.metrics.expected`: NLL and Brier expected under the true law p*.
- :mod:`~mobseg.metrics.variance_match`: Var[p] against p*(1 - p*)
  (correlation, ratio, binned curve).
- :mod:`~mobseg.metrics.case`: all of them for one case in one pass, and the
  pooled ``ALL`` row of a test set.
- :mod:`~mobseg.metrics.io`: reading prediction and mask files, evaluating
  folders, writing the metrics CSV (SPEC section 7).
"""

from mobseg.metrics.calibration import (
    CalibrationAccumulator,
    ReliabilityBins,
    expected_calibration_error,
    maximum_calibration_error,
)
from mobseg.metrics.case import (
    ALL_COLUMNS,
    CASE_COLUMNS,
    CaseResult,
    TestSetAccumulator,
    evaluate_case,
    roi_slices,
)
from mobseg.metrics.dice import DiceAccumulator, dice, segmentation_from_probability
from mobseg.metrics.expected import ExpectedScoreAccumulator, expected_brier, expected_nll
from mobseg.metrics.ged import (
    GedResult,
    OverlapAccumulator,
    diversity_ratio,
    generalized_energy_distance,
    iou_distance,
)
from mobseg.metrics.phantom import (
    ProbabilityErrorAccumulator,
    ambiguity_band,
    probability_error,
)
from mobseg.metrics.probabilistic import (
    ProbabilisticAccumulator,
    binary_entropy,
    brier_score,
    negative_log_likelihood,
)
from mobseg.metrics.uncertainty import (
    ErrorDetectionAccumulator,
    aurc,
    error_detection_auprc,
    error_detection_auroc,
    excess_aurc,
    risk_coverage_curve,
)
from mobseg.metrics.variance_match import (
    VarianceMatchAccumulator,
    variance_correlation,
    variance_ratio,
)

__all__ = [
    "ALL_COLUMNS",
    "CASE_COLUMNS",
    "CalibrationAccumulator",
    "CaseResult",
    "DiceAccumulator",
    "ErrorDetectionAccumulator",
    "ExpectedScoreAccumulator",
    "GedResult",
    "OverlapAccumulator",
    "ProbabilisticAccumulator",
    "ProbabilityErrorAccumulator",
    "ReliabilityBins",
    "TestSetAccumulator",
    "VarianceMatchAccumulator",
    "ambiguity_band",
    "aurc",
    "binary_entropy",
    "brier_score",
    "dice",
    "diversity_ratio",
    "error_detection_auprc",
    "error_detection_auroc",
    "evaluate_case",
    "excess_aurc",
    "expected_brier",
    "expected_calibration_error",
    "expected_nll",
    "generalized_energy_distance",
    "iou_distance",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "probability_error",
    "risk_coverage_curve",
    "roi_slices",
    "segmentation_from_probability",
    "variance_correlation",
    "variance_ratio",
]
