"""Helpers for the nnU-Net tests: hand-written micro plans, stub networks, a cached workspace.

Everything here is small: a 3-stage plain U-Net with (4, 8, 16) features and a
16^3 patch, built from a plans dict written by hand (no nnU-Net planning), and
stub "networks" whose logit samples are known functions of the input, so the
Monte-Carlo predictor can be checked against brute force.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from mobseg.nnunet.synthetic import managers as synthetic_managers
from mobseg.nnunet.synthetic import plans_dict
from mobseg.workspace import Workspace

#: Foreground intensity statistics of the micro plans (CT-like).
MICRO_INTENSITY = {
    "max": 1500.0,
    "mean": 40.0,
    "median": 40.0,
    "min": -1000.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 1200.0,
    "std": 300.0,
}


def micro_plans(
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    transpose_forward: tuple[int, int, int] = (0, 1, 2),
    patch: tuple[int, int, int] = (16, 16, 16),
) -> dict[str, Any]:
    """An nnU-Net plans dict for a micro 3d_fullres configuration: a 3-stage plain
    U-Net with (4, 8, 16) features, one convolution per stage, batch 2."""
    return plans_dict(
        (4, 8, 16),
        patch,
        batch_size=2,
        spacing=spacing,
        transpose_forward=transpose_forward,
        convs_per_stage=1,
        median_shape=32,
        name="Dataset990_micro",
        plans_name="microPlans",
        intensity=MICRO_INTENSITY,
    )


DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "pancreas": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def model_folder(
    root: Path,
    labels: dict[str, object] | None = None,
    classes: int | None = None,
    plans: dict | None = None,
    name: str = "nnUNetTrainer__microPlans__3d_fullres",
    seed: int = 0,
) -> Path:
    """An nnU-Net results folder (plans.json, dataset.json, fold_0's checkpoint) of the
    micro plans, with random weights for ``classes`` outputs (default: the labels)."""
    labels = labels or {"background": 0, "pancreas": 1}
    plans = plans or micro_plans()
    folder = root / "Dataset990_micro" / name
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    from mobseg.nnunet.network import build_backbone

    torch.manual_seed(seed)
    pm, cm = managers(plans)
    net = build_backbone(pm, cm, 1, classes or len(labels), deep_supervision=True)
    torch.save(
        {"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 7},
        folder / "fold_0" / "checkpoint_final.pth",
    )
    return folder


def nnunet_raw_dataset(
    root: Path, n: int = 5, name: str = "Dataset123_Two"
) -> tuple[Path, dict[str, np.ndarray]]:
    """imagesTr/labelsTr with labels liver (1) and pancreas (2), 12^3 voxels of 2 mm."""
    ds = root / name
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(n):
        case = f"abdomen_{i:03d}"
        ct = sitk.GetImageFromArray(rng.normal(0, 100, (12, 12, 12)).astype(np.int16))
        ct.SetSpacing((2.0, 2.0, 2.0))
        ct.SetOrigin((float(i), -3.0, 5.0))
        lab = np.zeros((12, 12, 12), np.uint8)
        lab[2:5, 3:9, 3:9] = 1
        lab[6 : 8 + i % 3, 4:8, 4:8] = 2
        img = sitk.GetImageFromArray(lab)
        img.CopyInformation(ct)
        sitk.WriteImage(ct, str(ds / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(img, str(ds / "labelsTr" / f"{case}.nii.gz"))
        labels[case] = lab
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "pancreas": 2}}
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    return ds, labels


def managers(plans: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """nnU-Net's PlansManager and the 3d_fullres ConfigurationManager of ``plans``
    (default: :func:`micro_plans`)."""
    return synthetic_managers(plans or micro_plans())


# -- stub distributions and networks -------------------------------------------------
class StubDist:
    """A logit distribution whose k samples are fixed tensors (for brute-force checks).

    Its per-voxel covariance is that of the k samples.

    ``rsample(c)`` returns the next c of the k given samples (cycling), and
    records every requested chunk size.
    """

    def __init__(self, mean: torch.Tensor, samples: torch.Tensor | None, log: list) -> None:
        self.mean = mean
        self.samples = samples  # (k, B, C, *sp) or None for a point mass
        self.is_deterministic = samples is None
        self.device = mean.device
        self._next = 0
        self.log = log

    def voxel_covariance(self) -> torch.Tensor:
        """(B, *sp, C, C) covariance of the k given samples (population), zero for a point mass."""
        c = self.mean.shape[1]
        if self.samples is None:
            return torch.zeros((*self.mean.shape[:1], *self.mean.shape[2:], c, c))
        dev = (self.samples - self.samples.mean(0, keepdim=True)).movedim(2, -1)  # (k, B, *sp, C)
        return torch.einsum("k...i,k...j->...ij", dev, dev) / self.samples.shape[0]

    def difference_variance(self) -> torch.Tensor:
        cov = self.voxel_covariance()
        return cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]

    def rsample(self, k: int, generator: Any = None, antithetic: bool = False) -> torch.Tensor:
        assert self.samples is not None
        self.log.append(k)
        n = self.samples.shape[0]
        idx = [(self._next + i) % n for i in range(k)]
        self._next += k
        return self.samples[idx]


def stub_logits(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and k samples for an input patch x (B, 1, *sp); samples depend on the tile.

    mu = (0, sin(x)); sample i adds (0, s_i * (1 + t)) with s_i = (i - (k-1)/2) / 2
    and t = |x at the tile's first voxel| / 100, a tile-specific offset, so
    overlapping tiles disagree and stitching matters.
    """
    mu = torch.cat([torch.zeros_like(x), torch.sin(x)], dim=1)
    t = x[:, :1, :1, :1, :1].abs() / 100.0
    s = [(i - (k - 1) / 2.0) / 2.0 for i in range(k)]
    extra = torch.stack(
        [torch.cat([torch.zeros_like(x), torch.ones_like(x) * si * (1 + t)], dim=1) for si in s]
    )
    return mu, mu[None] + extra


class StubNet(nn.Module):
    """Stand-in for :class:`StochasticUNet` in predictor tests."""

    def __init__(self, k: int, point_mass: bool = False) -> None:
        super().__init__()
        self.k = k
        self.point_mass = point_mass
        self.decoder = nn.Module()
        self.decoder.deep_supervision = False
        self.calls = 0
        self.chunks: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, stochastic: bool = False) -> Any:
        self.calls += 1
        mu, samples = stub_logits(x, self.k)
        if not stochastic:
            return mu
        return mu, StubDist(mu, None if self.point_mass else samples, self.chunks)

    def marginal_parameters(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`StochasticUNet.marginal_parameters`: from this stub's own forward."""
        from mobseg.core.inference import marginal_parameters

        return marginal_parameters(self(x, stochastic=True)[1])


class RampNet(StubNet):
    """A stub that sees mirroring: mu_1 = x + ramp / 10 along the first spatial axis, and two
    samples mu_1 +- (ramp / 20 + offset), so a flipped pass differs from the plain one."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__(2)
        self.offset = offset

    def forward(self, x: torch.Tensor, stochastic: bool = False) -> Any:
        self.calls += 1
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1).expand_as(x)
        mu = torch.cat([torch.zeros_like(x), x + ramp / 10], dim=1)
        extra = torch.zeros((2, *mu.shape), dtype=mu.dtype)
        extra[0, :, 1] += ramp[:, 0] / 20 + self.offset
        extra[1, :, 1] -= ramp[:, 0] / 20 + self.offset
        return mu, StubDist(mu, mu[None] + extra, self.chunks)


# -- a pretrained micro workspace, built once per test session -----------------------
_CACHE: dict[str, Workspace] = {}
_LOCK = threading.Lock()


def pretrained_micro_workspace(root: Path) -> Workspace:
    """A workspace with a prepared 6-case 32^3 phantom and a micro backbone (cached).

    Built on first use under ``root`` (prepare -> pretrain with the ``micro``
    preset); later calls in the same session return the same workspace. Tests
    must not ``force`` its pretrain and should use their own method/seed keys.
    """
    with _LOCK:
        if "ws" in _CACHE:
            return _CACHE["ws"]
        from mobseg.stages import prepare, pretrain

        ws = Workspace(root).ensure()
        names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA")
        saved = {k: os.environ.pop(k, None) for k in names}
        try:
            prepare.run(
                ws,
                prepare.PrepareParams(
                    organ="pancreas", source="phantom", num_cases=6, size=32, seed=0
                ),
            )
            pretrain.run(ws, pretrain.PretrainParams("pancreas", preset="micro", device="cpu"))
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
        _CACHE["ws"] = ws
        return ws


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
