"""Seeded splits: sizes, disjointness, determinism, edge cases."""

from __future__ import annotations

import pytest

from mobseg.data.splits import make_splits
from mobseg.errors import ConfigurationError

IDS = [f"s{i:04d}" for i in range(941)]  # pancreas after filtering in the paper


def test_sizes_follow_test_then_validation_fraction() -> None:
    s = make_splits(IDS, seed=0)
    assert len(s.test) == round(0.2 * 941) == 188
    assert len(s.val) == round(0.2 * (941 - 188)) == 151
    assert len(s.train) == 941 - 188 - 151
    assert sorted(s.train + s.val + s.test) == sorted(IDS)
    assert not (set(s.train) & set(s.val) or set(s.train) & set(s.test) or set(s.val) & set(s.test))
    assert s.train == sorted(s.train) and s.test == sorted(s.test)
    assert s.counts() == {"train": len(s.train), "val": 151, "test": 188}
    assert s.nnunet_folds() == [{"train": s.train, "val": s.val}]
    assert s.of(s.test[0]) == "test" and s.of("nope") is None


def test_deterministic_and_order_independent_and_seed_dependent() -> None:
    a = make_splits(IDS, seed=5, test_fraction=0.3, val_fraction=0.1)
    b = make_splits(list(reversed(IDS)), seed=5, test_fraction=0.3, val_fraction=0.1)
    c = make_splits(IDS, seed=6, test_fraction=0.3, val_fraction=0.1)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.test != c.test


def test_official_split_is_kept_for_reference() -> None:
    off = {i: ("train" if n % 2 else "test") for n, i in enumerate(IDS[:10])}
    s = make_splits(IDS[:10], seed=0, official=off)
    assert s.official["test"] == [i for n, i in enumerate(IDS[:10]) if n % 2 == 0]
    assert s.to_dict()["official"]["train"] == [i for n, i in enumerate(IDS[:10]) if n % 2]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (3, 1, 1)), (10, (6, 2, 2))],
)
def test_tiny_sets(n: int, expected: tuple[int, int, int]) -> None:
    s = make_splits(IDS[:n], seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == expected


def test_zero_fractions_and_errors() -> None:
    s = make_splits(IDS[:10], seed=0, test_fraction=0.0, val_fraction=0.0)
    assert len(s.train) == 10 and not s.val and not s.test
    with pytest.raises(ConfigurationError, match="none for training"):
        make_splits(IDS[:2], seed=0, test_fraction=0.5, val_fraction=0.9)
    with pytest.raises(ConfigurationError, match="test-fraction"):
        make_splits(IDS, seed=0, test_fraction=1.0)
    with pytest.raises(ConfigurationError, match="val-fraction"):
        make_splits(IDS, seed=0, val_fraction=-0.1)
    with pytest.raises(ConfigurationError, match="not unique"):
        make_splits(["a", "a", "b"], seed=0)
