"""Stage ``predict``: inputs, case names, prerequisites, the backbone row, resuming."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_testlib import pretrained_micro_workspace

from mobseg.core.config import HeadConfig
from mobseg.data import nifti
from mobseg.errors import ConfigurationError, InvalidInputError, MissingStageError
from mobseg.manifest import Manifest
from mobseg.stages import predict
from mobseg.workspace import Workspace


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return pretrained_micro_workspace(tmp_path_factory.mktemp("micro_ws"))


@pytest.mark.parametrize(
    ("path", "case"),
    [
        ("imagesTs/s0003_0000.nii.gz", "s0003"),
        ("a/liver.nii.gz", "liver"),
        ("a/b.nii", "b"),
        ("s0000/ct.nii.gz", "s0000"),
    ],
)
def test_case_names(path: str, case: str) -> None:
    assert predict.case_name(Path(path)) == case


def _inputs(src: Path | None, test_dir: Path | None = None, cases: list | None = None) -> dict:
    params = predict.PredictParams("pancreas", input=src)
    return predict.resolve_inputs(params, test_dir, cases or [])


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_inputs_from_a_file_a_folder_and_a_totalsegmentator_folder(tmp_path: Path) -> None:
    f = _touch(tmp_path / "one" / "x_0000.nii.gz")
    assert _inputs(f) == {"x": f}
    a, b = _touch(tmp_path / "dir" / "a.nii.gz"), _touch(tmp_path / "dir" / "b_0000.nii.gz")
    _touch(tmp_path / "dir" / "notes.txt")
    assert _inputs(tmp_path / "dir") == {"a": a, "b": b}
    c = _touch(tmp_path / "ts" / "s0001" / "ct.nii.gz")
    assert _inputs(tmp_path / "ts") == {"s0001": c}


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        _inputs(tmp_path / "no")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no .nii.gz"):
        _inputs(tmp_path / "empty")
    _touch(tmp_path / "dup" / "a.nii.gz")
    _touch(tmp_path / "dup" / "a_0000.nii.gz")
    with pytest.raises(InvalidInputError, match="same case id|case id 'a'"):
        _inputs(tmp_path / "dup")
    with pytest.raises(InvalidInputError, match="test image is missing"):
        _inputs(None, tmp_path, ["s0009"])


def test_needs_the_finetuned_run(micro_ws: Workspace) -> None:
    params = predict.PredictParams("pancreas", head=HeadConfig("mob"), seed=42, device="cpu")
    with pytest.raises(
        MissingStageError, match="mobseg finetune --organ pancreas --method mob --seed 42"
    ):
        predict.run(micro_ws, params)
    with pytest.raises(ConfigurationError, match="--samples"):
        predict.run(micro_ws, predict.PredictParams("pancreas", samples=0, backbone=True))
    with pytest.raises(ConfigurationError, match="--save-samples must be >= 0, got -1"):
        predict.run(micro_ws, predict.PredictParams("pancreas", save_samples=-1, backbone=True))


def test_backbone_on_the_real_ct_keeps_its_geometry(
    micro_ws: Workspace, totalseg_example: Path, tmp_path: Path
) -> None:
    ct = totalseg_example / "s0000" / "ct.nii.gz"
    out = tmp_path / "real"
    params = predict.PredictParams("pancreas", backbone=True, input=ct, out=out, device="cpu")
    study = predict.PredictParams("pancreas", backbone=True, device="cpu")
    study_rec = predict.run(micro_ws, study)
    rec = predict.run(micro_ws, params)
    # a user's output folder has its own record: the test split's stays as it was
    assert rec.key == predict.out_key("pancreas", "backbone", 0, out)
    assert rec.key.startswith("predict/pancreas/backbone/seed0/out-")
    manifest = Manifest(micro_ws.manifest_path)
    assert manifest.get("predict/pancreas/backbone/seed0") == study_rec
    assert rec.outputs["pred_dir"] == str(out) and rec.outputs["cases"] == ["s0000"]
    ref = sitk.ReadImage(str(ct))
    for suffix in ("seg", "prob", "var", "entropy", "mi"):
        img = sitk.ReadImage(str(out / f"s0000_{suffix}.nii.gz"))
        assert (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == (
            ref.GetSize(),
            ref.GetSpacing(),
            ref.GetOrigin(),
            ref.GetDirection(),
        )
    var = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "s0000_var.nii.gz")))
    assert (var == 0).all()


def test_default_input_is_the_test_split_and_interrupted_runs_resume(micro_ws: Workspace) -> None:
    manifest = Manifest(micro_ws.manifest_path)
    prep = manifest.require("prepare/pancreas", "x").outputs
    test_cases = sorted(prep["splits"]["test"]) if "splits" in prep else None
    params = predict.PredictParams("pancreas", backbone=True, seed=7, device="cpu")
    rec = predict.run(micro_ws, params)
    out = micro_ws.prediction_dir("pancreas", "backbone", 0)
    assert rec.outputs["pred_dir"] == str(out) and rec.outputs["maps"] == "quadrature"
    assert rec.outputs["samples"] == 0 and rec.outputs["tta"] is True
    cases = rec.outputs["cases"]
    assert cases and (test_cases is None or sorted(cases) == test_cases)
    raw = Path(prep["raw_dir"]) / "imagesTs"
    for case in cases:
        ref = sitk.ReadImage(str(raw / f"{case}_0000.nii.gz"))
        prob = sitk.ReadImage(str(out / f"{case}_prob.nii.gz"))
        assert prob.GetSize() == ref.GetSize() and prob.GetOrigin() == ref.GetOrigin()
        arr = sitk.GetArrayFromImage(prob)
        assert arr.min() >= 0 and arr.max() <= 1
    # same parameters again: nothing is redone
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert predict.run(micro_ws, params).to_dict() == rec.to_dict()
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # an interrupted run (record still running): complete cases are not redone...
    manifest.start("predict", rec.key, rec.params, rec.inputs)
    assert predict.run(micro_ws, params).status == "done"
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # ... and a case with a missing file is
    manifest.start("predict", rec.key, rec.params, rec.inputs)
    missing = out / f"{cases[0]}_seg.nii.gz"
    missing.unlink()
    rec2 = predict.run(micro_ws, params)
    assert rec2.status == "done" and missing.exists()
    assert rec2.outputs["cases"] == cases
    # ... and so is a case whose segmentation exists but does not read back (a full disk
    # under an older mobseg left such files): the skip check verifies it (issue 14)
    manifest.start("predict", rec.key, rec.params, rec.inputs)
    data = missing.read_bytes()
    missing.write_bytes(data[: len(data) // 2])
    predict.run(micro_ws, params)
    assert missing.read_bytes() != data[: len(data) // 2]
    nifti.verify_nifti_file(missing)


def test_other_options_redo_every_case_and_drop_extra_samples(micro_ws: Workspace) -> None:
    from mobseg.core.config import LossConfig
    from mobseg.stages import finetune

    head = HeadConfig("diagonal")
    ft = finetune.run(
        micro_ws,
        finetune.FinetuneParams(
            "pancreas", head=head, loss=LossConfig(samples=2), seed=11, device="cpu", epochs=1
        ),
    )
    tag = ft.key.split("/")[2]  # diagonal-k2-x<hash>: k and the schedule are not the defaults
    three = predict.PredictParams(
        "pancreas", head=head, seed=11, samples=2, save_samples=3, device="cpu", run=tag
    )
    rec = predict.run(micro_ws, three)
    out = Path(rec.outputs["pred_dir"])
    cases = rec.outputs["cases"]
    assert rec.outputs["saved_samples"] == 3 and "sample2" in rec.outputs["files"]

    def names(case: str) -> list[str]:
        return sorted(f.name for f in out.glob(f"{case}_sample*.nii.gz"))

    for case in cases:
        assert names(case) == [f"{case}_sample{i}.nii.gz" for i in range(3)]
        sample = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_sample0.nii.gz")))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_seg.nii.gz")))
        assert sample.dtype == np.uint8 and sample.shape == seg.shape
        assert set(np.unique(sample)) <= {0, 1}
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    one = replace(three, save_samples=1)
    rec1 = predict.run(micro_ws, one)
    assert rec1.params == one.to_dict() and rec1.outputs["saved_samples"] == 1
    for case in cases:
        assert names(case) == [f"{case}_sample0.nii.gz"]  # no leftovers of the old run
        for suffix in ("seg", "prob", "var", "sample0"):
            path = out / f"{case}_{suffix}.nii.gz"
            assert path.stat().st_mtime_ns != mtimes[path], path  # predicted again


def test_a_variant_run_by_its_tag_and_the_recorded_mixing(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--run finds a run whose tag has a loss suffix and builds the run's own head; the
    mixing recorded in its checkpoint is used unless --inference-mixing overrides it."""
    import torch

    from mobseg.core.config import LossConfig
    from mobseg.stages import finetune

    head = HeadConfig("mob", rank=2, bases=2, partitions=2)
    ft = finetune.run(
        micro_ws,
        finetune.FinetuneParams(
            "pancreas",
            head=head,
            loss=LossConfig(samples=2, mc_loss="logsumexp"),
            seed=12,
            device="cpu",
        ),
    )
    tag = ft.key.split("/")[2]
    assert tag == "mob-b2-r2-p2-lse-k2"
    with pytest.raises(MissingStageError):  # the head alone names the default run
        predict.run(micro_ws, predict.PredictParams("pancreas", head=head, seed=12, device="cpu"))
    # the network's mixing when prediction starts
    from mobseg.nnunet.predictor import HeadPredictor

    used: list[str] = []
    setup = HeadPredictor.setup

    def spy(self, network, *args, **kwargs):
        used.append(network.head.mixing)
        return setup(self, network, *args, **kwargs)

    monkeypatch.setattr(HeadPredictor, "setup", spy)
    # the CLI's default head (mob-b3-r16) with --run: the run's own head is used
    params = predict.PredictParams("pancreas", seed=12, samples=4, device="cpu", run=tag)
    soft = predict.run(micro_ws, params)
    assert soft.key == f"predict/pancreas/{tag}/seed12"
    assert soft.params["head"] == head.to_dict() and soft.outputs["mixing"] == "soft"
    hard = predict.run(micro_ws, replace(params, inference_mixing="hard"))
    assert hard.outputs["mixing"] == "hard" and hard.key == soft.key
    assert used == ["soft", "hard"]
    # a checkpoint that recorded hard mixing is predicted hard without an override
    ckpt_path = Path(ft.outputs["checkpoint_best"])
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["mobseg"]["inference_mixing"] = "hard"
    torch.save(ckpt, ckpt_path)
    again = predict.run(micro_ws, params, force=True)
    assert again.outputs["mixing"] == "hard" and used[-1] == "hard"
    with pytest.raises(Exception, match="mixing mode"):
        predict.run(micro_ws, replace(params, inference_mixing="medium"))


def test_split_val_predicts_the_validation_cases_under_their_own_key(micro_ws: Workspace) -> None:
    from mobseg.nnunet.context import prepared_dataset

    manifest = Manifest(micro_ws.manifest_path)
    _, data = prepared_dataset(manifest, "pancreas")
    assert data.splits["val"]  # the micro split has validation cases
    params = predict.PredictParams("pancreas", backbone=True, device="cpu", split="val")
    rec = predict.run(micro_ws, params)
    out = micro_ws.prediction_dir("pancreas", "backbone", 0) / "val"
    assert rec.key == "predict/pancreas/backbone/seed0/val" and rec.params["split"] == "val"
    assert rec.outputs["pred_dir"] == str(out) and sorted(rec.outputs["cases"]) == sorted(
        data.splits["val"]
    )
    for case in data.splits["val"]:
        ref = sitk.ReadImage(str(data.raw_dir / "imagesTr" / f"{case}_0000.nii.gz"))
        prob = sitk.ReadImage(str(out / f"{case}_prob.nii.gz"))
        assert prob.GetSize() == ref.GetSize() and prob.GetOrigin() == ref.GetOrigin()
    # the test split's record keeps its parameters (no split field) and key
    assert "split" not in predict.PredictParams("pancreas").to_dict()
    with pytest.raises(ConfigurationError, match="--split and --input"):
        predict.run(micro_ws, replace(params, input=out))
    from mobseg.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        predict.run(micro_ws, replace(params, split="train"))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def test_mc_dropout_run_is_predicted_as_a_mixture_of_passes(
    micro_ws: Workspace, tmp_path: Path
) -> None:
    from mobseg.stages import finetune

    ft = finetune.run(
        micro_ws,
        finetune.FinetuneParams(
            "pancreas",
            head=HeadConfig("deterministic"),
            seed=21,
            device="cpu",
            epochs=1,
            iterations=1,
            decoder_dropout=0.5,
        ),
    )
    tag = ft.key.split("/")[2]
    assert "-mcd0.5" in tag
    params = predict.PredictParams(
        "pancreas", seed=21, run=tag, device="cpu", tta=False, passes=3, save=("prob", "logits")
    )
    rec = predict.run(micro_ws, params)
    assert rec.key == f"predict/pancreas/{tag}/seed21"
    assert rec.outputs["passes"] == 3 and rec.outputs["decoder_dropout"] == 0.5
    assert rec.outputs["seconds_per_case"] > 0
    assert "logit_var_between" in rec.outputs["files"]
    out = Path(rec.outputs["pred_dir"])
    case = rec.outputs["cases"][0]
    var = _read(out / f"{case}_logit_var.nii.gz")
    between = _read(out / f"{case}_logit_var_between.nii.gz")
    # a point-mass head: the whole variance is the passes' spread, and dropout makes one
    np.testing.assert_allclose(var, between, rtol=1e-5, atol=1e-6)
    assert between.max() > 0
    assert _read(out / f"{case}_prob.nii.gz").max() <= 1
    with pytest.raises(ConfigurationError, match="--passes"):
        predict.run(micro_ws, replace(params, passes=0))


def test_tta_mixture_gets_its_own_key_and_adds_the_mirror_spread(
    micro_ws: Workspace, tmp_path: Path
) -> None:
    base = predict.PredictParams(
        "pancreas", backbone=True, device="cpu", save=("logits",), out=tmp_path / "plain"
    )
    plain = predict.run(micro_ws, base, key="predict/pancreas/backbone/seed0/plain-logits")
    mix = predict.run(micro_ws, replace(base, tta_mixture=True, out=tmp_path / "mix"))
    # its own tag; with --out also its own output key (never the test split's record)
    assert mix.key.startswith("predict/pancreas/backbone-ttamix/seed0/out-")
    assert mix.outputs["tta_mixture"] is True and mix.params["tta_mixture"] is True
    assert "tta_mixture" not in plain.params  # the default's record stays as it was
    case = plain.outputs["cases"][0]
    m_plain = _read(tmp_path / "plain" / f"{case}_logit_mean.nii.gz")
    m_mix = _read(tmp_path / "mix" / f"{case}_logit_mean.nii.gz")
    np.testing.assert_allclose(m_mix, m_plain, atol=1e-4)  # the same passes, averaged
    assert not (tmp_path / "plain" / f"{case}_logit_var_between.nii.gz").exists()
    var = _read(tmp_path / "mix" / f"{case}_logit_var.nii.gz")
    between = _read(tmp_path / "mix" / f"{case}_logit_var_between.nii.gz")
    np.testing.assert_allclose(var, between, rtol=1e-5, atol=1e-6)  # point mass: all spread
    assert _read(tmp_path / "plain" / f"{case}_logit_var.nii.gz").max() == 0
    with pytest.raises(ConfigurationError, match="needs a run fine-tuned with --mc-dropout"):
        predict.run(micro_ws, replace(base, passes=2, out=tmp_path / "p2"))
    with pytest.raises(ConfigurationError, match="--no-tta"):
        predict.run(micro_ws, replace(base, tta_mixture=True, tta=False))


@pytest.mark.slow
def test_cli_finetune_mc_dropout_then_predict(micro_ws: Workspace) -> None:
    """``mobseg finetune --mc-dropout`` + ``mobseg predict --run``: T passes by default."""
    from typer.testing import CliRunner

    from mobseg.cli import app

    def cli(*args: str):
        res = CliRunner().invoke(app, ["--workdir", str(micro_ws.root), *args])
        assert res.exit_code == 0, res.output
        return res

    common = ["--organ", "pancreas", "--method", "deterministic", "--seed", "23"]
    cli(
        "finetune", *common, "--mc-dropout", "--epochs", "1", "--iterations", "1", "--device", "cpu"
    )
    manifest = Manifest(micro_ws.manifest_path)
    tag = next(
        r.key.split("/")[2]
        for r in manifest.find("finetune", "finetune/pancreas/")
        if "/seed23" in r.key
    )
    assert "-mcd0.1" in tag
    cli(
        "predict",
        "--organ",
        "pancreas",
        "--run",
        tag,
        "--seed",
        "23",
        "--no-tta",
        "--device",
        "cpu",
    )
    rec = manifest.get(f"predict/pancreas/{tag}/seed23")
    assert rec is not None and rec.done
    assert rec.outputs["passes"] == predict.DEFAULT_PASSES and rec.outputs["decoder_dropout"] == 0.1
    out = Path(rec.outputs["pred_dir"])
    case = rec.outputs["cases"][0]
    assert (out / f"{case}_logit_var_between.nii.gz").is_file()
    assert _read(out / f"{case}_var.nii.gz").max() > 0  # the deterministic head, made uncertain
