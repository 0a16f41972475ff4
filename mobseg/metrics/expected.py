"""NLL and Brier score of p expected under the true label law p* (phantom only).

The phantom draws every voxel's label t_n ~ Bernoulli(p*_n). Scoring p
against one drawn mask adds the noise of that draw; the *expected* score over
the true law removes it. With the definitions of
:mod:`mobseg.metrics.probabilistic` (SPEC section 6, two classes,
p = foreground probability):

    NLL*   = (1/N) sum_n E_t[-ln max(p(t_n), 1e-8)]
           = (1/N) sum_n -( p*_n ln max(p_n, 1e-8) + (1 - p*_n) ln max(1 - p_n, 1e-8) ),

    Brier* = (1/N) sum_n E_t[sum_c (p_c - [t_n = c])^2] = (1/N) sum_n 2 E_t[(p_n - t_n)^2]
           = (1/N) sum_n 2 ( (p_n - p*_n)^2 + p*_n (1 - p*_n) ).

The Brier line uses E[(p - t)^2] = p^2 - 2 p p* + p* = (p - p*)^2 + p*(1 - p*)
(t^2 = t) and the factor 2 of the two-class sum (foreground and background
terms are equal). Both are minimised by p = p*: NLL* then equals the mean
binary entropy of p* (in nats, 0 ln 0 = 0) and Brier* equals
2 mean p*(1 - p*), the irreducible parts; the excess over them is the mean
KL divergence KL(p* || p) and 2 mean (p - p*)^2. Per-voxel terms are
evaluated in float32 (the precision of the files) and summed in float64, as
in :mod:`mobseg.metrics.probabilistic`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobseg.metrics._common import check_probability, check_same_shape, flat_chunks
from mobseg.metrics.probabilistic import NLL_FLOOR, ProbabilisticAccumulator


@dataclass
class ExpectedScoreAccumulator(ProbabilisticAccumulator):
    """Streaming sums of the expected NLL and Brier terms under p*.

    The sums, ``merge``, ``nll()`` and ``brier()`` are those of
    :class:`ProbabilisticAccumulator`; only the per-voxel terms differ.

    Attributes:
        nll_sum: sum_n -(p*_n ln max(p_n, 1e-8) + (1 - p*_n) ln max(1 - p_n, 1e-8)).
        brier_sum: sum_n 2 ((p_n - p*_n)^2 + p*_n (1 - p*_n)).
        n: number of voxels.
    """

    def update(self, prob: np.ndarray, true_prob: np.ndarray) -> ExpectedScoreAccumulator:
        """Add voxels.

        Args:
            prob: Predicted foreground probability p, any shape, in [0, 1].
            true_prob: The true probability p*, same shape, in [0, 1].

        Returns:
            self.

        Raises:
            ValueError: shapes differ, or a probability is NaN or outside [0, 1].
        """
        check_same_shape(prob=prob, true_prob=true_prob)
        for p, q in flat_chunks(np.asarray(prob), np.asarray(true_prob)):
            check_probability(p)
            check_probability(q, "true probability p*")
            self._add(p, q)
        return self

    def _add(self, p: np.ndarray, q: np.ndarray) -> None:
        """Add one validated flat chunk."""
        one, floor = np.float32(1), np.float32(NLL_FLOOR)
        p32 = np.clip(p.astype(np.float32, copy=False), 0, one)
        q32 = np.clip(q.astype(np.float32, copy=False), 0, one)
        log_bg = np.log(np.maximum(one - p32, floor))
        log_fg = np.log(np.maximum(p32, floor))
        # -(q ln p + (1 - q) ln(1 - p)) = -(ln(1 - p) + q (ln p - ln(1 - p)))
        log_fg -= log_bg
        log_fg *= q32
        log_fg += log_bg
        self.nll_sum -= float(log_fg.sum(dtype=np.float64))
        # 2 ((p - q)^2 + q (1 - q))
        diff = p32 - q32
        diff *= diff
        spread = one - q32
        spread *= q32
        diff += spread
        self.brier_sum += 2.0 * float(diff.sum(dtype=np.float64))
        self.n += int(p.size)


def expected_nll(prob: np.ndarray, true_prob: np.ndarray) -> float:
    """Mean over voxels of the NLL of p expected under t ~ Bernoulli(p*).

    Args:
        prob: Predicted foreground probability, any shape.
        true_prob: The true probability p*, same shape.
    """
    return ExpectedScoreAccumulator().update(prob, true_prob).nll()


def expected_brier(prob: np.ndarray, true_prob: np.ndarray) -> float:
    """Mean over voxels of the two-class Brier score expected under t ~ Bernoulli(p*).

    Args:
        prob: Predicted foreground probability, any shape.
        true_prob: The true probability p*, same shape.
    """
    return ExpectedScoreAccumulator().update(prob, true_prob).brier()
