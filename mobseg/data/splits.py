"""Seeded, deterministic train/val/test splits (SPEC section 1: 80/20, then 80/20).

Given the sorted ids of the included cases and a seed, the ids are permuted
with ``numpy.random.default_rng(seed)``; the first
``n_test = round(test_fraction * n)`` form the test split, the next
``n_val = round(val_fraction * (n - n_test))`` the validation split, the rest
the training split. When a fraction is positive but rounds to zero, one case
is still taken as long as at least two cases (test: three) remain for the
other splits, so tiny data sets still get a validation case. Each split is
returned sorted. The same ids and seed always give the same split, whatever
order the ids come in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mobseg.errors import ConfigurationError


@dataclass(frozen=True)
class Splits:
    """A split of case ids.

    Attributes:
        train: Training ids (sorted).
        val: Validation ids (sorted).
        test: Test ids (sorted).
        seed: The seed used.
        test_fraction: Requested share of test cases.
        val_fraction: Requested share of validation cases among the rest.
    """

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int
    test_fraction: float
    val_fraction: float
    official: dict[str, list[str]] = field(default_factory=dict)

    def of(self, case: str) -> str | None:
        """The split (``train``, ``val``, ``test``) of ``case``, or None."""
        for name in ("train", "val", "test"):
            if case in getattr(self, name):
                return name
        return None

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_dict(self) -> dict[str, object]:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            "method": "numpy default_rng(seed).permutation of the sorted included ids; "
            "first round(test_fraction*n) -> test, next round(val_fraction*rest) -> val",
            "official": {k: list(v) for k, v in self.official.items()},
        }

    def nnunet_folds(self) -> list[dict[str, list[str]]]:
        """nnU-Net's ``splits_final.json`` content: fold 0 = this train/val."""
        return [{"train": list(self.train), "val": list(self.val)}]


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    """Raise ConfigurationError unless both fractions lie in [0, 1)."""
    for name, value in (("--test-fraction", test_fraction), ("--val-fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigurationError(f"{name} must lie in [0, 1), not {value}.")


def make_splits(
    ids: Iterable[str],
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    official: dict[str, str] | None = None,
) -> Splits:
    """Split case ids into train/val/test.

    Args:
        ids: Case ids (unique).
        seed: Seed of the permutation.
        test_fraction: Share of all cases held out for testing, in [0, 1).
        val_fraction: Share of the remaining cases for validation, in [0, 1).
        official: Optional case -> official split, kept for reference.

    Returns:
        The splits.

    Raises:
        ConfigurationError: invalid fractions, duplicate ids, or no case left
            for training.
    """
    check_fractions(test_fraction, val_fraction)
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ConfigurationError("Case ids for the split are not unique.")
    n = len(ordered)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    rest = n - n_test
    n_val = int(round(val_fraction * rest))
    if val_fraction > 0 and n_val == 0 and rest >= 2:
        n_val = 1
    if n - n_test - n_val < 1:
        raise ConfigurationError(
            f"{n} usable case(s) leave none for training with test fraction {test_fraction} "
            f"and validation fraction {val_fraction}.",
            "Use more cases or smaller fractions.",
        )
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in perm]
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test : n_test + n_val])
    train = sorted(shuffled[n_test + n_val :])
    off: dict[str, list[str]] = {}
    if official:
        for case in ordered:
            off.setdefault(official.get(case, "") or "unknown", []).append(case)
    return Splits(train, val, test, seed, test_fraction, val_fraction, off)
