"""The registry of the 117 TotalSegmentator structures."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobseg.data.structures import PAPER_ORGANS, STRUCTURES, resolve_organ
from mobseg.errors import UnknownNameError


def test_117_unique_sorted_names() -> None:
    assert len(STRUCTURES) == 117
    assert len(set(STRUCTURES)) == 117
    assert list(STRUCTURES) == sorted(STRUCTURES)
    assert set(PAPER_ORGANS) <= set(STRUCTURES)


def test_registry_matches_the_real_dataset_layout(totalseg_example: Path) -> None:
    on_disk = {
        p.name.removesuffix(".nii.gz")
        for p in (totalseg_example / "s0000" / "segmentations").iterdir()
    }
    assert on_disk == set(STRUCTURES)


@pytest.mark.parametrize(
    "typed", ["pancreas", " Pancreas ", "adrenal-gland-left", "adrenal gland left"]
)
def test_resolve_accepts_variants(typed: str) -> None:
    assert resolve_organ(typed) in ("pancreas", "adrenal_gland_left")


def test_resolve_suggests_closest() -> None:
    with pytest.raises(UnknownNameError) as info:
        resolve_organ("galbladder")
    assert "'gallbladder'" in str(info.value)
    with pytest.raises(UnknownNameError) as info:
        resolve_organ("adrenal")
    assert "adrenal_gland_left" in str(info.value)
