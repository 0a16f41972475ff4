"""Shared fixtures.

``totalseg_example`` is the real CT of ``../shared/data/totalseg_example``
(next to the project checkout, or at ``$MOBSEG_SHARED``); tests that use it
are skipped when it is absent, as in a user's clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("MOBSEG_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def totalseg_example() -> Path:
    """Folder of the real example in TotalSegmentator layout (meta.csv, s0000/)."""
    path = shared_dir() / "data" / "totalseg_example"
    if not (path / "s0000" / "ct.nii.gz").exists():
        pytest.skip("../shared/data/totalseg_example is not available")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests from reading or writing the user's nnU-Net or mobseg folders."""
    for name in ("MOBSEG_WORKDIR", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOBSEG_TEST_TMP", str(tmp_path))
