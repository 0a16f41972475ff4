"""AnnotatorDataset: a uniform random annotator per load, nnU-Net's dataset otherwise."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare

from mobseg.nnunet.annotators import AnnotatorDataset


class FakeDataset:
    """nnU-Net's dataset interface: ``identifiers`` and ``load_case``."""

    identifiers = ["a", "b"]

    def load_case(self, identifier: str):
        seg = np.zeros((1, 2, 3, 4), dtype=np.int16)
        return np.ones((1, 2, 3, 4), np.float32), seg, None, {"case": identifier}


def _files(tmp_path: Path, k: int, shape=(1, 2, 3, 4)) -> list[Path | None]:
    out: list[Path | None] = [None]
    for i in range(1, k):
        path = tmp_path / f"a_a{i}.npy"
        np.save(path, np.full(shape, i, dtype=np.int16))
        out.append(path)
    return out


def test_draws_are_uniform_and_return_that_annotators_mask(tmp_path: Path) -> None:
    ds = AnnotatorDataset(FakeDataset(), {"a": _files(tmp_path, 3)})
    np.random.seed(0)
    got = []
    for _ in range(600):
        data, seg, prev, props = ds.load_case("a")
        got.append(int(np.asarray(seg).max()))  # annotator k's mask holds k (0: the label)
        assert props == {"case": "a"} and prev is None and data.shape == (1, 2, 3, 4)
    assert [k for _, k in ds.draws] == got
    counts = np.bincount(got, minlength=3)
    assert chisquare(counts).pvalue > 1e-3, counts
    # a case without extra annotators keeps its label, and draws nothing
    _, seg, _, _ = ds.load_case("b")
    assert int(np.asarray(seg).max()) == 0 and len(ds.draws) == 600
    assert ds.identifiers == ["a", "b"]


def test_a_stale_cache_is_an_error_and_the_dataset_pickles(tmp_path: Path) -> None:
    ds = AnnotatorDataset(FakeDataset(), {"a": _files(tmp_path, 2, shape=(1, 2, 3, 5))})
    np.random.seed(1)
    with pytest.raises(RuntimeError, match="preprocess the annotators again"):
        for _ in range(50):
            ds.load_case("a")
    again = pickle.loads(pickle.dumps(AnnotatorDataset(FakeDataset(), {})))
    assert again.identifiers == ["a", "b"]
