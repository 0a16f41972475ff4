"""Deep ensemble: the total-variance and entropy split against pooled samples, the stage,
its evaluation and its report row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import report_fakes as fakes
import SimpleITK as sitk
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import ConfigurationError, MissingStageError
from mobseg.manifest import Manifest
from mobseg.stages import ensemble, evaluate
from mobseg.stages.ensemble import EnsembleAccumulator, EnsembleParams
from mobseg.workspace import Workspace

runner = CliRunner()


def _h(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-300, 1 - 1e-16)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def test_total_variance_and_entropy_split_match_the_pooled_mixture() -> None:
    """Members with Gaussian logits: their maps from S draws each; the ensemble's maps
    from the accumulator equal the moments of all M*S draws pooled (the mixture)."""
    rng = np.random.default_rng(0)
    shape, draws, members = (5, 6), 4000, 4
    pooled = []
    acc = EnsembleAccumulator(shape)
    within = []
    for _ in range(members):
        mu = rng.normal(0, 2, shape)
        sd = rng.uniform(0.1, 2.0, shape)
        p = 1 / (1 + np.exp(-(mu + sd * rng.normal(size=(draws, *shape)))))
        pm = p.mean(0)
        h = _h(pm)
        mi = h - _h(p).mean(0)
        acc.add(pm, p.var(0), h, mi)
        pooled.append(p)
        within.append(p.var(0))
    allp = np.concatenate(pooled)
    maps = acc.maps()
    np.testing.assert_allclose(maps["prob"], allp.mean(0), atol=1e-12)
    np.testing.assert_allclose(maps["var"], allp.var(0), atol=1e-10)  # law of total variance
    np.testing.assert_allclose(maps["var_within"], np.mean(within, 0), atol=1e-12)
    np.testing.assert_allclose(
        maps["var_between"], np.var([q.mean(0) for q in pooled], axis=0), atol=1e-12
    )
    np.testing.assert_allclose(maps["entropy"], _h(allp.mean(0)), atol=1e-10)
    np.testing.assert_allclose(maps["expected_entropy"], _h(allp).mean(0), atol=1e-10)
    np.testing.assert_allclose(maps["mi"], _h(allp.mean(0)) - _h(allp).mean(0), atol=1e-10)
    member_h = np.mean([_h(q.mean(0)) for q in pooled], axis=0)
    np.testing.assert_allclose(maps["mi_between"], _h(allp.mean(0)) - member_h, atol=1e-10)
    assert (maps["mi"] >= maps["mi_between"] - 1e-12).all()  # the within part is >= 0
    np.testing.assert_array_equal(maps["seg"], (allp.mean(0) > 0.5).astype(np.uint8))


def test_point_mass_members_have_no_within_part() -> None:
    acc = EnsembleAccumulator((3,))
    for p in ([0.2, 0.9, 0.5], [0.4, 0.7, 0.5]):
        acc.add(np.array(p), np.zeros(3), _h(np.array(p)), np.zeros(3))
    maps = acc.maps()
    np.testing.assert_allclose(maps["var"], [0.01, 0.01, 0.0])
    np.testing.assert_allclose(maps["var_within"], 0.0)
    np.testing.assert_allclose(maps["mi"], maps["mi_between"])
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))


@pytest.fixture
def control_study(tmp_path: Path) -> Workspace:
    ws = fakes.build_study(tmp_path / "work", seeds=(0, 1, 2), runs=fakes.CONTROL)
    for seed in (0, 1, 2):  # predict writes MI maps; the fakes do not
        d = ws.prediction_dir("pancreas", "deterministic", seed)
        for case in fakes.CASES:
            fakes.write(np.zeros(fakes.SHAPE, np.float32), d / f"{case}_mi.nii.gz")
    man = Manifest(ws.manifest_path)
    for seed in (0, 1, 2):  # the fakes' records list no cases
        man.update(
            f"predict/pancreas/deterministic/seed{seed}",
            lambda r: (r.outputs.__setitem__("cases", list(fakes.CASES)), r)[1],
        )
    return ws


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_stage_writes_the_ensemble_folder_and_it_is_evaluated_and_reported(
    control_study: Workspace,
) -> None:
    ws = control_study
    rec = ensemble.run(ws, EnsembleParams("pancreas"))
    assert rec.key == "predict/pancreas/ensemble-deterministic/seed0"
    assert rec.params["seeds"] == [0, 1, 2] and rec.params["ensemble"] is True
    out = Path(rec.outputs["pred_dir"])
    case = fakes.CASES[1]
    probs = [
        _read(ws.prediction_dir("pancreas", "deterministic", s) / f"{case}_prob.nii.gz")
        for s in (0, 1, 2)
    ]
    p = _read(out / f"{case}_prob.nii.gz")
    np.testing.assert_allclose(p, np.mean(probs, 0), atol=1e-6)
    np.testing.assert_allclose(_read(out / f"{case}_var.nii.gz"), np.var(probs, 0), atol=1e-6)
    assert sorted(x.name for x in out.glob(f"{case}_sample*.nii.gz")) == [
        f"{case}_sample{k}.nii.gz" for k in range(3)
    ]
    ref = sitk.ReadImage(
        str(ws.prediction_dir("pancreas", "deterministic", 0) / f"{case}_prob.nii.gz")
    )
    img = sitk.ReadImage(str(out / f"{case}_prob.nii.gz"))
    assert img.GetSpacing() == ref.GetSpacing() and img.GetOrigin() == ref.GetOrigin()
    # same parameters: reused; evaluated like any method
    assert ensemble.run(ws, EnsembleParams("pancreas")).attempts == rec.attempts
    recs = evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", run="ensemble-deterministic"))
    assert [r.params["method"] for r in recs] == ["ensemble"]
    assert recs[0].outputs["summary"]["volume_cv"] is not None  # members as samples
    from mobseg.report.collect import collect

    results = collect(ws)
    row = next(k for k in results.rows() if k.tag == "ensemble-deterministic")
    assert row.label == "Deep ensemble (deterministic)" and row.method == "ensemble"


def test_members_are_checked(control_study: Workspace) -> None:
    with pytest.raises(ConfigurationError, match=">= 2 finished"):
        ensemble.run(control_study, EnsembleParams("pancreas", member="mob-b3-r16"))
    with pytest.raises(MissingStageError, match="seed7"):
        ensemble.run(control_study, EnsembleParams("pancreas", seeds=(0, 7)))
    with pytest.raises(ConfigurationError, match="cannot be ensembles"):
        ensemble.run(control_study, EnsembleParams("pancreas", member="ensemble-x"))


def test_cli_predict_method_ensemble(control_study: Workspace) -> None:
    args = ["--workdir", str(control_study.root), "predict", "--organ", "pancreas"]
    res = runner.invoke(app, [*args, "--method", "ensemble", "--member-seeds", "0,2"])
    assert res.exit_code == 0, res.output
    rec = Manifest(control_study.manifest_path).get("predict/pancreas/ensemble-deterministic/seed0")
    assert rec is not None and rec.params["seeds"] == [0, 2]
    res = runner.invoke(app, [*args, "--method", "ensemble", "--member-seeds", "a"])
    assert res.exit_code == 1 and "comma-separated" in res.output


def test_ensemble_cost_is_the_members_cost_plus_its_own(control_study: Workspace) -> None:
    man = Manifest(control_study.manifest_path)
    for seed, secs in ((0, 1.0), (1, 2.0), (2, 4.0)):
        man.update(
            f"predict/pancreas/deterministic/seed{seed}",
            lambda r, s=secs: (r.outputs.__setitem__("seconds_per_case", s), r)[1],
        )
    rec = ensemble.run(control_study, EnsembleParams("pancreas"), force=True)
    own = rec.outputs["seconds_per_case"] - 7.0
    assert 0.0 < own < 30.0  # combining three members' maps per case


def test_ensemble_cost_is_unknown_when_a_member_has_none(control_study: Workspace) -> None:
    rec = ensemble.run(control_study, EnsembleParams("pancreas"))
    assert rec.outputs["seconds_per_case"] is None
