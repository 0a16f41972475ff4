"""``mobseg adopt``: a model trained by nnU-Net's own trainer becomes the backbone.

The slow test trains a micro model with ``nnUNetTrainer`` itself (instantiated
directly, as nnU-Net's command would after looking it up), adopts its results
folder through the CLI, fine-tunes a mob head and predicts. The other adopts a
two-label model derived from it and checks the binary backbone against the
trained one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_testlib import model_folder, nnunet_raw_dataset
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import MissingStageError
from mobseg.manifest import Manifest
from mobseg.stages import adopt
from mobseg.workspace import Workspace

LABELS3 = {"background": 0, "liver": 1, "pancreas": 2}

runner = CliRunner()
HEAD = ["--method", "mob", "--rank", "4", "--bases", "2", "--partitions", "2", "--samples", "3"]
TAG = "mob-b2-r4-p2-k3"


def _ok(work: Path, *args: str) -> str:
    result = runner.invoke(app, ["--workdir", str(work), "--quiet", *args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def _train_with_nnunet(work: Path) -> Path:
    """Prepare a 6-case phantom, plan it (micro plan) and train nnU-Net's own trainer."""
    phantom = ["--source", "phantom", "--num-cases", "6", "--size", "32"]
    _ok(work, "prepare", "--organ", "pancreas", *phantom)
    from mobseg.nnunet.context import prepared_dataset
    from mobseg.nnunet.env import setup_nnunet
    from mobseg.nnunet.planning import plan_and_preprocess
    from mobseg.nnunet.presets import get_preset

    ws = Workspace(work)
    preset = get_preset("micro")
    setup_nnunet(ws, preset)
    _, data = prepared_dataset(Manifest(ws.manifest_path), "pancreas")
    split = {"train": data.splits["train"], "val": data.splits["val"]}
    planned = plan_and_preprocess(data.dataset_id, data.dataset_name, preset.plan, 1, split)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = json.loads(planned.plans_file.read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((planned.plans_file.parent / "dataset.json").read_text())
    trainer = nnUNetTrainer(
        plans=plans,
        configuration=planned.configuration,
        fold=0,
        dataset_json=dataset_json,
        device=torch.device("cpu"),
    )
    assert type(trainer) is nnUNetTrainer
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 2
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    folder = Path(trainer.output_folder_base)
    assert folder.name == f"nnUNetTrainer__{planned.plans_identifier}__3d_fullres"
    return folder


@pytest.mark.slow
def test_adopt_a_model_trained_by_nnunet_then_finetune_and_predict(tmp_path: Path) -> None:
    work = tmp_path / "work"
    model = _train_with_nnunet(work)
    # a user's copy of the results folder, outside mobseg's workdir
    mine = tmp_path / "nnUNet_results" / model.parent.name / model.name
    shutil.copytree(model, mine)
    _ok(work, "adopt", "--organ", "pancreas", "--model", str(mine), "--preset", "micro")
    manifest = Manifest(work / "manifest.json")
    rec = manifest.require("pretrain/pancreas", "x")
    assert rec.outputs["adopted_from"] == str(mine)
    assert rec.outputs["trainer_class"] == "nnUNetTrainer"
    assert rec.outputs["plans_identifier"] == f"mobsegAdopted_{model.name.split('__')[1]}"
    # the backbone is the trained model's weights, unchanged
    ours = torch.load(rec.outputs["checkpoint"], weights_only=False)["network_weights"]
    theirs = torch.load(mine / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert ours.keys() == theirs["network_weights"].keys()
    assert all(torch.equal(ours[k], theirs["network_weights"][k]) for k in ours)
    # adopting again is a no-op; the same preprocessed data serve fine-tuning
    _ok(work, "adopt", "--organ", "pancreas", "--model", str(mine), "--preset", "micro")
    assert manifest.require("pretrain/pancreas", "x").finished == rec.finished

    _ok(work, "finetune", "--organ", "pancreas", *HEAD, "--device", "cpu")
    _ok(work, "predict", "--organ", "pancreas", "--run", TAG, "--samples", "4", "--device", "cpu")
    pred = manifest.require(f"predict/pancreas/{TAG}/seed0", "x")
    prep = manifest.require("prepare/pancreas", "x").outputs
    for case in pred.outputs["cases"]:
        ref = sitk.ReadImage(str(Path(prep["raw_dir"]) / "imagesTs" / f"{case}_0000.nii.gz"))
        prob = sitk.ReadImage(str(Path(pred.outputs["pred_dir"]) / f"{case}_prob.nii.gz"))
        assert prob.GetSize() == ref.GetSize() and prob.GetSpacing() == ref.GetSpacing()
        p = sitk.GetArrayFromImage(prob)
        assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1

    # a two-label model: liver (1) and pancreas (2); the organ's rows are the trained ones
    two = tmp_path / "nnUNet_results" / "Dataset991_two" / model.name
    shutil.copytree(model, two)
    ds = json.loads((two / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "liver": 1, "pancreas": 2}
    (two / "dataset.json").write_text(json.dumps(ds))
    state = dict(theirs["network_weights"])
    for k, v in list(state.items()):
        if ".seg_layers." in k:
            state[k] = torch.cat([v[:1], torch.randn_like(v[:1]), v[1:]])
    torch.save({**theirs, "network_weights": state}, two / "fold_0" / "checkpoint_final.pth")
    result = runner.invoke(
        app, ["--workdir", str(work), "adopt", "--organ", "spleen", "--model", str(two)]
    )
    assert result.exit_code == 1  # no prepared spleen, but first: the label is not named
    assert "none is named 'spleen'" in result.output and "--label" in result.output
    _ok(work, "adopt", "--organ", "pancreas", "--model", str(two), "--preset", "micro")
    rec2 = manifest.require("pretrain/pancreas", "x")
    assert (rec2.outputs["label"], rec2.outputs["label_value"], rec2.outputs["num_classes"]) == (
        "pancreas",
        2,
        3,
    )
    binary = torch.load(rec2.outputs["checkpoint"], weights_only=False)["network_weights"]
    assert all(torch.equal(binary[k], theirs["network_weights"][k]) for k in binary)
    # the fine-tuned run was built on the other backbone: it is redone on this one
    _ok(work, "finetune", "--organ", "pancreas", *HEAD, "--device", "cpu")
    assert manifest.require(f"finetune/pancreas/{TAG}/seed0", "x").finished > rec2.finished


def test_adopt_checks_the_model_then_needs_the_organs_prepared_data(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "work").ensure()
    folder = model_folder(tmp_path)
    with pytest.raises(MissingStageError, match="mobseg prepare --organ pancreas"):
        adopt.run(ws, adopt.AdoptParams("pancreas", folder, preset="micro"))
    # the model's own problems come first, before any data is looked at
    from mobseg.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="no fold 1"):
        adopt.run(ws, adopt.AdoptParams("pancreas", folder, fold="1", preset="micro"))
    assert not (ws.root / "nnunet" / "adopted").exists()
    assert Manifest(ws.manifest_path).get("pretrain/pancreas") is None


def test_adopt_prepares_the_models_own_raw_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the user's nnU-Net folders hold the model's raw dataset (liver 1, pancreas 2)
    raw_root = tmp_path / "nnUNet_raw"
    raw, labels = nnunet_raw_dataset(raw_root, n=5, name="Dataset990_micro")
    monkeypatch.setenv("nnUNet_raw", str(raw_root))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    folder = model_folder(tmp_path / "nnUNet_results", LABELS3)
    ws = Workspace(tmp_path / "work").ensure()
    rec = adopt.run(ws, adopt.AdoptParams("pancreas", folder, preset="micro"))
    manifest = Manifest(ws.manifest_path)
    prep = manifest.require("prepare/pancreas", "x")
    assert prep.outputs["source"] == "nnunet" and prep.outputs["source_dir"] == str(raw.resolve())
    assert rec.inputs["prepare"] == "prepare/pancreas"
    assert (rec.outputs["label"], rec.outputs["label_value"]) == ("pancreas", 2)
    # preprocessed with the model's plans, for every training and validation case
    marker = json.loads(
        (
            Path(rec.outputs["plans_file"]).parent
            / "mobseg_mobsegAdopted_microPlans_3d_fullres.json"
        ).read_text()
    )
    splits = json.loads(Path(prep.outputs["splits_json"]).read_text())
    assert sorted(marker["cases"]) == sorted(splits["train"] + splits["val"])
    assert Path(marker["preprocessed_dir"]).name == "mobsegAdopted_microPlans_3d_fullres"
    # nnU-Net's trainer needs the fingerprint (the model folder has none: extracted)
    fingerprint = json.loads(
        (Path(rec.outputs["plans_file"]).parent / "dataset_fingerprint.json").read_text()
    )
    assert len(fingerprint["spacings"]) == len(splits["train"]) + len(splits["val"])


def _users_nnunet_dataset(root: Path, scratch: Path) -> Path:
    """A user's nnU-Net raw dataset (imagesTr/labelsTr, every case labelled) of the phantom."""
    phantom = ["--source", "phantom", "--num-cases", "6", "--size", "32"]
    _ok(scratch, "prepare", "--organ", "pancreas", *phantom)
    raw = Path(
        Manifest(scratch / "manifest.json").require("prepare/pancreas", "x").outputs["raw_dir"]
    )
    ds = root / "Dataset777_Pancreas"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for split in ("Tr", "Ts"):
        for img in sorted((raw / f"images{split}").glob("*_0000.nii.gz")):
            case = img.name[: -len("_0000.nii.gz")]
            shutil.copy(img, ds / "imagesTr" / img.name)
            shutil.copy(
                raw / f"labels{split}" / f"{case}.nii.gz", ds / "labelsTr" / f"{case}.nii.gz"
            )
    labels = {"background": 0, "pancreas": 1}
    n = len(list((ds / "imagesTr").iterdir()))
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n}
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    return ds


@pytest.mark.slow
def test_howto_from_an_adopted_model_to_maps_of_the_example_ct(
    tmp_path: Path, totalseg_example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/own-data.md's commands, on the real example CT (skipped when it is absent)."""
    ds = _users_nnunet_dataset(tmp_path / "nnUNet_raw", tmp_path / "scratch")
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / f"nnUNet_{name}"))
    # the user's existing model: nnU-Net's own trainer on their dataset
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from mobseg.nnunet.planning import plan_and_preprocess
    from mobseg.nnunet.presets import get_preset

    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds / "imagesTr").glob("*.nii.gz"))
    planned = plan_and_preprocess(
        777, ds.name, get_preset("micro").plan, 1, {"train": cases[:-1], "val": cases[-1:]}
    )
    plans = {**json.loads(planned.plans_file.read_text()), "continue_training": False}
    dataset_json = json.loads((planned.plans_file.parent / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 2
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    model = Path(trainer.output_folder_base)

    # the how-to: adopt (prepares $nnUNet_raw's dataset), fine-tune, predict the CT
    work = tmp_path / "work"
    _ok(work, "adopt", "--organ", "pancreas", "--model", str(model), "--preset", "micro")
    _ok(work, "finetune", "--organ", "pancreas", "--method", "mob", "--device", "cpu")
    ct = totalseg_example / "s0000" / "ct.nii.gz"
    out = tmp_path / "maps"
    _ok(work, "predict", "-m", "pancreas/mob-b3-r16", "-i", str(ct), "-o", str(out))
    ref = sitk.ReadImage(str(ct))
    for suffix in ("seg", "prob", "var", "entropy", "mi"):
        img = sitk.ReadImage(str(out / f"s0000_{suffix}.nii.gz"))
        assert img.GetSize() == ref.GetSize() and img.GetOrigin() == ref.GetOrigin()
    var = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "s0000_var.nii.gz")))
    assert var.min() >= 0 and np.isfinite(var).all()
