"""Published files honour the umask (tempfile alone makes them 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.data import nifti
from mobseg.manifest import Manifest, StageRecord
from mobseg.metrics.io import atomic_write_text


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_writer_honours_the_umask(tmp_path: Path, umask: int) -> None:
    import torch

    from mobseg.nnunet.trainer import atomic_torch_save

    expected = 0o666 & ~umask
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8))
    written = [
        nifti.write_image(img, tmp_path / "seg.nii.gz"),
        nifti.atomic_write_json(tmp_path / "a.json", {"k": 1}),
    ]
    atomic_write_text(tmp_path / "metrics.csv", "case\n")
    Manifest(tmp_path / "manifest.json").put(StageRecord(stage="s", key="s/1"))
    Manifest(tmp_path / "manifest.json").put(StageRecord(stage="s", key="s/2"))
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pth")
    written += [tmp_path / n for n in ("metrics.csv", "manifest.json", "manifest.json.bak")]
    written.append(tmp_path / "c.pth")
    # oracle: a file made by plain open() under the same umask
    (tmp_path / "plain").write_text("x")
    assert _mode(tmp_path / "plain") == expected
    assert {p.name: _mode(p) for p in written} == {p.name: expected for p in written}
