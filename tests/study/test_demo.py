"""The demo's spec: the paper's configurations plus the best one and its control."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import report_fakes as fakes

from mobseg.core.config import HeadConfig
from mobseg.manifest import Manifest
from mobseg.stages import evaluate
from mobseg.study import demo
from mobseg.study.grid import RunVariant, expand, run_tag


def test_demo_spec_adds_the_best_configuration_and_a_control_trained_alike(tmp_path: Path) -> None:
    spec = demo.demo_spec(tmp_path, None)
    assert spec.variants == (demo.DEMO_BEST, demo.control_of(demo.DEMO_BEST))
    fine = {j.tag: j.params for j in expand(spec).by_stage("finetune") if j.seed == 0}
    assert len(fine) == 5 + 2
    best = next(p for p in fine.values() if p.loss.mc_loss == "logsumexp")
    assert (best.head.method, best.annotators, best.lr) == (
        demo.DEMO_BEST.method,
        "all",
        demo.DEMO_BEST.lr,
    )
    controls = [p for p in fine.values() if p.head.method == "deterministic"]
    assert sorted((p.annotators, p.lr) for p in controls) == [
        ("0", 1e-4),  # the paper grid's control
        ("all", demo.DEMO_BEST.lr),  # the best configuration's control: same data, same lr
    ]
    paper = demo.demo_spec(tmp_path, None, best=None)
    assert len(expand(paper).by_stage("finetune")) == 5 * demo.DEMO_SEEDS


def test_comparison_reads_the_runs_means_over_seeds(tmp_path: Path) -> None:
    spec = demo.demo_spec(tmp_path, None, seeds=2)
    control = demo.control_of(demo.DEMO_BEST)
    tags = [
        run_tag(spec, "pancreas", spec.head(v.method), v)
        for v in (RunVariant("mob"), demo.DEMO_BEST, control)
    ]
    runs = {
        tags[0]: (HeadConfig("mob"), 1.5, 0.3),
        tags[1]: (HeadConfig(demo.DEMO_BEST.method), 1.2, 0.1),
        # the control: evaluated for seed 0 only below
        tags[2]: (HeadConfig("deterministic"), 1.0, 0.6),
    }
    ws = fakes.build_study(tmp_path / "work", seeds=(0, 1), runs=runs)
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", run=tags[0]))
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", run=tags[1]))
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", run=tags[2], seed=0))
    rows = demo.comparison(ws.root, spec)
    assert [r.tag for r in rows] == tags
    assert [r.seeds for r in rows] == [2, 2, 1]
    man = Manifest(ws.manifest_path)
    for r in rows:
        seeds = range(r.seeds)
        for key, _ in demo.COMPARISON_COLUMNS:
            vals = [
                man.get(f"evaluate/pancreas/{r.tag}/seed{s}").outputs["summary"][key] for s in seeds
            ]
            vals = [v for v in vals if v is not None]
            if vals:
                assert r.values[key] == pytest.approx(sum(vals) / len(vals)), (r.tag, key)
            else:  # e.g. no sample masks, no diversity
                assert math.isnan(r.values[key]), (r.tag, key)
        assert math.isfinite(r.values["pstar_nll_band"]) and r.values["pstar_nll_band"] > 0
    assert "best configuration" in rows[1].label and "control" in rows[2].label
