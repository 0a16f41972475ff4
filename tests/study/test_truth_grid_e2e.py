"""The truth grid at micro scale through ``mobseg study`` with the real stages: slow, end to end.

Both objectives, both annotator choices, a stochastic head and the deterministic control
trained alike (lr 3e-3 for all), one seed, on a tiny phantom.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.manifest import Manifest
from mobseg.study import grid

ARGS = [
    "study",
    "--grid",
    "truth",
    "--preset",
    "micro",
    "--device",
    "cpu",
    "--methods",
    "deterministic,mob",
    "--noises",
    "voxel",
    "--seeds",
    "1",
    "--num-cases",
    "6",
    "--size",
    "32",
    "--samples",
    "2",
    "--save-samples",
    "3",
    "--lr",
    "3e-3",
]


@pytest.mark.slow
def test_truth_grid_at_micro_scale(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["--workdir", str(work), *ARGS], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output

    spec = grid.load_spec(work)
    assert spec is not None and spec.objectives == ("mean", "logsumexp")
    assert spec.annotators == ("0", "all") and spec.lr == 3e-3
    plan = grid.expand(spec)
    tags = {j.tag for j in plan.by_stage("finetune")}
    # deterministic x {0, all} + mob x {mean, logsumexp} x {0, all}
    assert len(tags) == 6
    assert sum("-lse" in t for t in tags) == 2 and sum("-annall" in t for t in tags) == 3
    records = Manifest(work / "manifest.json").records()
    assert all(records[k].done for k in plan.jobs), [k for k in plan.jobs if not records[k].done]
    for tag in tags:
        params = records[f"finetune/pancreas/{tag}/seed0"].params
        assert params["lr"] == 3e-3  # the control is trained alike
        assert params["annotators"] == ("all" if "-annall" in tag else "0")

    report = records["report"].outputs
    md = Path(report["report_md"])
    md = md if md.is_absolute() else work / md
    text = md.read_text()
    assert "## Against the truth" in text
    with open(work / "report" / "tables" / "table5b_truth.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    listed = {r["tag"] for r in rows}
    assert listed == tags | {"backbone"}  # every configuration, and the backbone
    for tag in tags | {"backbone"}:
        assert tag in text
        mine = {r["metric"]: r for r in rows if r["tag"] == tag}
        labels = {r["row"] for r in rows if r["tag"] == tag}
        assert len(labels) == 1
        for metric in ("pstar_mae_band", "pstar_nll_band", "pstar_brier_band", "ged2"):
            assert math.isfinite(float(mine[metric]["mean"])), (tag, metric)
        if tag != "backbone":
            assert mine["pstar_nll_band"]["annotators"] == ("all" if "-annall" in tag else "0")
            assert mine["pstar_nll_band"]["lr"] == "0.003"
    assert len({r["row"] for r in rows}) == len(listed)  # one label per configuration
