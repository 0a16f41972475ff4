"""Stage ``finetune``: prerequisites, outputs, skip rule, and resuming an interrupted run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from nnunet_testlib import pretrained_micro_workspace

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.errors import ConfigurationError, MissingStageError
from mobseg.manifest import Manifest
from mobseg.stages import finetune
from mobseg.workspace import Workspace


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return pretrained_micro_workspace(tmp_path_factory.mktemp("micro_ws"))


def _params(method: str, seed: int, **kw) -> finetune.FinetuneParams:
    head = HeadConfig(method, rank=4, bases=2, partitions=2)
    return finetune.FinetuneParams(
        "pancreas", head=head, loss=LossConfig(samples=3), seed=seed, device="cpu", **kw
    )


def test_needs_pretrain_first(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(MissingStageError, match="mobseg pretrain --organ pancreas"):
        finetune.run(ws, _params("mob", 0))


def test_bad_options_are_user_errors(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(ConfigurationError, match="--epochs must be >= 1"):
        finetune.run(ws, _params("mob", 0, epochs=0))
    with pytest.raises(ConfigurationError, match="--lr"):
        finetune.run(ws, _params("mob", 0, lr=0.0))


def test_preset_must_match_the_backbone(micro_ws: Workspace) -> None:
    with pytest.raises(ConfigurationError, match="pretrained with preset 'micro', not 'cpu'"):
        finetune.run(micro_ws, _params("diagonal", 0, preset="cpu"))


def test_outputs_and_no_redo(micro_ws: Workspace) -> None:
    rec = finetune.run(micro_ws, _params("single-basis", 3))
    assert rec.key == "finetune/pancreas/single-basis-r4-k3/seed3"  # k = 3, not the default 5
    out = rec.outputs
    assert out["run_dir"] == str(micro_ws.run_dir("pancreas", "single-basis-r4-k3", 3))
    for name in ("checkpoint_best", "checkpoint_final", "losses_csv", "progress_png"):
        assert Path(out[name]).is_file(), name
    assert not (Path(out["run_dir"]) / "checkpoint_latest.pth").exists()
    assert out["inference_mixing"] == "soft" and out["preset"] == "micro"
    rows = list(csv.DictReader(open(out["losses_csv"])))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert set(rows[0]) >= {"total", "data", "ce", "dice", "kl", "orth", "entropy", "ds"}
    # micro validates every epoch; the best checkpoint is the best Dice
    dices = [float(r["val_dice"]) for r in rows]
    finite = [d for d in dices if not math.isnan(d)]
    if finite:
        assert out["best_val_dice"] == pytest.approx(max(finite))
    ckpt = torch.load(out["checkpoint_final"], map_location="cpu", weights_only=False)
    assert any(k.startswith("head.") for k in ckpt["network_weights"])
    mtime = Path(out["checkpoint_final"]).stat().st_mtime_ns
    again = finetune.run(micro_ws, _params("single-basis", 3))
    assert again.to_dict() == rec.to_dict()
    assert Path(out["checkpoint_final"]).stat().st_mtime_ns == mtime


def test_backbone_is_loaded_and_only_heads_are_new(micro_ws: Workspace) -> None:
    """Fine-tuning starts from the pretrained weights (the first epoch's loss is the backbone's)."""
    pre = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x").outputs
    backbone = torch.load(pre["checkpoint"], map_location="cpu", weights_only=False)
    rec = finetune.run(micro_ws, _params("deterministic", 4, epochs=1, iterations=1))
    ft = torch.load(rec.outputs["checkpoint_final"], map_location="cpu", weights_only=False)
    # one AdamW step at lr 1e-4 from the backbone: every weight stays within a few lr
    for k, v in backbone["network_weights"].items():
        moved = (ft["network_weights"]["backbone." + k].float() - v.float()).abs().max()
        assert moved <= 5e-4, k


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_from_its_checkpoint(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop after the first checkpoint; the rerun continues there and ends where an
    uninterrupted run ends."""
    from mobseg.nnunet.trainer import FinetuneTrainer

    params = _params("mob", 5, epochs=2, iterations=2)
    tag = finetune.run_tag(params, "micro")
    run_dir = micro_ws.run_dir("pancreas", tag, 5)
    original = FinetuneTrainer.save_checkpoint
    calls: list[int] = []

    def stop_after_first(self: FinetuneTrainer, filename: str) -> None:
        original(self, filename)
        if filename.endswith("checkpoint_latest.pth"):
            calls.append(self.current_epoch)
            raise _Interrupt

    monkeypatch.setattr(FinetuneTrainer, "save_checkpoint", stop_after_first)
    with pytest.raises(_Interrupt):
        finetune.run(micro_ws, params)
    monkeypatch.setattr(FinetuneTrainer, "save_checkpoint", original)
    key = "finetune/pancreas/mob-b2-r4-p2-k3/seed5"  # 2 x 2 is the micro preset's schedule
    assert Manifest(micro_ws.manifest_path).get(key).status == "running"
    latest = torch.load(run_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert calls == [1] and latest["current_epoch"] == 1
    first_row = latest["mobseg"]["history"][0]

    rec = finetune.run(micro_ws, params)
    assert rec.status == "done" and rec.attempts == 2 and rec.outputs["epochs"] == 2
    rows = list(csv.DictReader(open(rec.outputs["losses_csv"])))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[0]["total"]) == pytest.approx(first_row["total"], rel=1e-6)
    resumed = torch.load(rec.outputs["checkpoint_final"], map_location="cpu", weights_only=False)

    # the same run without interruption, in another folder
    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.presets import get_preset

    model = pretrained_model(Manifest(micro_ws.manifest_path), "pancreas")
    other = micro_ws.root / "uninterrupted"
    finetune._finetune(params, get_preset("micro"), model, other, "cpu", tag)
    straight = torch.load(other / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for k, v in straight["network_weights"].items():
        torch.testing.assert_close(resumed["network_weights"][k], v, rtol=1e-5, atol=1e-6)


# -- the run's identity: a different objective is a different run ------------------------
def _mob(**loss) -> finetune.FinetuneParams:
    head = HeadConfig("mob", rank=2, bases=2, partitions=2)
    return finetune.FinetuneParams(
        "pancreas", head=head, loss=LossConfig(samples=2, **loss), seed=7, device="cpu"
    )


def test_logsumexp_after_a_finished_mean_run_is_a_new_run(micro_ws: Workspace) -> None:
    """It used to return the mean run's record (same key); now it trains its own run."""
    mean = finetune.run(micro_ws, _mob())
    mtime = Path(mean.outputs["checkpoint_final"]).stat().st_mtime_ns
    lse = finetune.run(micro_ws, _mob(mc_loss="logsumexp"))
    assert mean.key == "finetune/pancreas/mob-b2-r2-p2-k2/seed7"
    assert lse.key == "finetune/pancreas/mob-b2-r2-p2-lse-k2/seed7"
    assert lse.outputs["run_dir"] != mean.outputs["run_dir"]
    assert lse.params["loss"]["mc_loss"] == "logsumexp"
    ckpt = torch.load(lse.outputs["checkpoint_final"], map_location="cpu", weights_only=False)
    assert ckpt["mobseg"]["loss"]["mc_loss"] == "logsumexp"
    # both coexist; the mean run is untouched
    manifest = Manifest(micro_ws.manifest_path)
    assert manifest.get(mean.key).done and manifest.get(lse.key).done
    assert Path(mean.outputs["checkpoint_final"]).stat().st_mtime_ns == mtime
    # antithetic pairs: a third run
    anti = finetune.run(micro_ws, _mob(antithetic=True))
    assert anti.key == "finetune/pancreas/mob-b2-r2-p2-k2-anti/seed7"


def test_the_presets_schedule_is_the_default(micro_ws: Workspace) -> None:
    """--epochs/--iterations equal to the preset's do not change the tag; others do."""
    same = finetune.run_tag(_mob(), "micro")
    explicit = finetune.FinetuneParams(**{**_mob().__dict__, "epochs": 2, "iterations": 2})
    shorter = finetune.FinetuneParams(**{**_mob().__dict__, "epochs": 1})
    faster = finetune.FinetuneParams(**{**_mob().__dict__, "lr": 3e-4})
    assert finetune.run_tag(explicit, "micro") == same
    tags = {same, finetune.run_tag(shorter, "micro"), finetune.run_tag(faster, "micro")}
    assert len(tags) == 3
    assert finetune.run_tag(explicit, "paper") != same  # 2 x 2 is not the paper's 20 x 250


# -- several annotators ------------------------------------------------------------------
def _annotators_all() -> finetune.FinetuneParams:
    head = HeadConfig("diagonal")
    return finetune.FinetuneParams(
        "pancreas", head=head, seed=2, device="cpu", annotators="all", iterations=8
    )


def test_annotator_preprocessing_is_nnunets(micro_ws: Workspace, tmp_path: Path) -> None:
    """Annotator 0 (the label) through our preprocessing equals nnU-Net's stored segmentation."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from mobseg.nnunet.annotators import preprocess_annotators
    from mobseg.nnunet.context import prepared_dataset, pretrained_model
    from mobseg.nnunet.env import setup_nnunet
    from mobseg.nnunet.presets import get_preset

    setup_nnunet(micro_ws, get_preset("micro"))
    manifest = Manifest(micro_ws.manifest_path)
    model = pretrained_model(manifest, "pancreas")
    _, data = prepared_dataset(manifest, "pancreas")
    pm, cm, dataset_json = model.load()
    cases = data.splits["train"][:2]
    images = {c: [data.raw_dir / "imagesTr" / f"{c}_0000.nii.gz"] for c in cases}
    label = {c: data.raw_dir / "labelsTr" / f"{c}.nii.gz" for c in cases}
    segs = preprocess_annotators(
        pm, cm, dataset_json, images, {c: [label[c], label[c]] for c in cases}, tmp_path
    )
    folder = model.plans_file.parent / cm.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder), cases)
    for c in cases:
        assert segs[c][0] is None and segs[c][1] == tmp_path / f"{c}_a1.npy"
        _, stored, _, _ = ds.load_case(c)
        ours = np.load(segs[c][1])
        assert ours.shape == stored.shape and ours.shape[1:] != (32, 32, 32)  # resampled
        np.testing.assert_array_equal(ours, np.asarray(stored[:]))


def test_annotators_all_trains_on_several_annotators(
    micro_ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.presets import get_preset
    from mobseg.nnunet.trainer import FinetuneTrainer

    params = _annotators_all()
    rec = finetune.run(micro_ws, params)
    assert rec.key.startswith("finetune/pancreas/diagonal-annall-x") and rec.done
    assert rec.outputs["annotators"] == "all"
    # The phantom's annotators 1 and 2 replaced by masks that give themselves away:
    # annotator 1 marks nothing, annotator 2 everything (inside the image).
    manifest = Manifest(micro_ws.manifest_path)
    model = pretrained_model(manifest, "pancreas")
    segs = finetune.annotator_segs(micro_ws, manifest, "pancreas", model)
    marked: dict[str, list[Path | None]] = {}
    for case, files in segs.items():
        assert len(files) == 3 and files[0] is None
        real = np.load(files[1])
        for k, fill in ((1, 0), (2, 1)):
            np.save(tmp_path / f"{case}_a{k}.npy", np.where(real >= 0, fill, real).astype(np.int16))
        marked[case] = [None, tmp_path / f"{case}_a1.npy", tmp_path / f"{case}_a2.npy"]
    seen: list[tuple[str, str]] = []
    original = FinetuneTrainer.train_step

    def spy(self: FinetuneTrainer, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        valid = target[target >= 0]
        frac = float((valid > 0).float().mean())
        kind = "none" if frac == 0 else "all" if frac > 0.6 else "label"
        seen.append((str(batch["keys"][0]), kind))
        return original(self, batch)

    monkeypatch.setattr(FinetuneTrainer, "train_step", spy)
    out = tmp_path / "run"
    finetune._finetune(params, get_preset("micro"), model, out, "cpu", "spy", marked)
    assert len(seen) == 16
    kinds = {k for _, k in seen}
    assert kinds == {"none", "all", "label"}, seen
    per_case: dict[str, set[str]] = {}
    for case, kind in seen:
        per_case.setdefault(case, set()).add(kind)
    assert max(len(v) for v in per_case.values()) >= 2, per_case


def test_annotators_all_needs_several_annotators(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mobseg.data import references

    monkeypatch.setattr(references, "reference_masks", lambda ws, organ, case: [Path("a.nii.gz")])
    params = finetune.FinetuneParams(
        "pancreas", head=HeadConfig("diagonal"), seed=9, device="cpu", annotators="all"
    )
    with pytest.raises(ConfigurationError, match="needs several annotators per case"):
        finetune.run(micro_ws, params)


def test_freeze_backbone_trains_the_head_only(micro_ws: Workspace) -> None:
    pre = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x").outputs
    backbone = torch.load(pre["checkpoint"], map_location="cpu", weights_only=False)
    params = _params("diagonal", 5, epochs=1, iterations=2, freeze_backbone=True)
    rec = finetune.run(micro_ws, params)
    # epochs and iterations other than the preset's add the hash after -frozen
    assert rec.key.startswith("finetune/pancreas/diagonal-k3-frozen-x")
    assert rec.params["freeze_backbone"] is True and rec.outputs["freeze_backbone"] is True
    ft = torch.load(rec.outputs["checkpoint_final"], map_location="cpu", weights_only=False)
    weights = ft["network_weights"]
    for k, v in backbone["network_weights"].items():  # bit-identical backbone
        assert torch.equal(weights["backbone." + k], v), k
    # the optimizer holds the head's parameters only, and they received gradients
    head_keys = [k for k in weights if k.startswith("head.")]
    group = ft["optimizer_state"]["param_groups"][0]["params"]
    assert len(group) == len(head_keys) > 0
    state = ft["optimizer_state"]["state"]
    assert state and all(float(s["exp_avg"].abs().max()) > 0 for s in state.values())
    assert ft["mobseg"]["freeze_backbone"] is True
    # the same run without the option is another run (another tag, another folder)
    plain = finetune.run_tag(_params("diagonal", 5, epochs=1, iterations=2), "micro")
    assert "frozen" not in plain and rec.key.split("/")[2] == plain.replace("-x", "-frozen-x")


def test_mc_dropout_variant_trains_with_decoder_dropout(micro_ws: Workspace) -> None:
    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.network import build_network, load_full

    params = _params("deterministic", 6, epochs=1, iterations=1, decoder_dropout=0.1)
    rec = finetune.run(micro_ws, params)
    assert rec.key.startswith("finetune/pancreas/deterministic-mcd0.1-x")
    assert rec.params["decoder_dropout"] == 0.1 and rec.outputs["decoder_dropout"] == 0.1
    ckpt = torch.load(rec.outputs["checkpoint_final"], map_location="cpu", weights_only=False)
    assert ckpt["mobseg"]["decoder_dropout"] == 0.1
    # the weights fit the plain network and the dropout variant alike
    pm, cm, _ = pretrained_model(Manifest(micro_ws.manifest_path), "pancreas").load()
    for rate in (0.0, 0.1):
        load_full(build_network(pm, cm, 1, 2, HeadConfig("deterministic"), False, rate), ckpt)
    with pytest.raises(ConfigurationError, match="dropout-rate"):
        finetune.run(micro_ws, _params("deterministic", 6, decoder_dropout=1.5))


def test_validation_is_one_unmirrored_pass_per_tile(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fine-tuning's whole-volume validation runs the network once per sliding-window tile.

    Mirroring (on by default for ``predict``) would multiply it by up to 8; the
    expected count comes from nnU-Net's own tiling of each validation volume.
    """
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    from mobseg.nnunet import predictor as pred_mod

    forwards, expected, mirroring, hooked = [0], [0], [], set()

    def count_backbone_pass(module, _inputs, _output) -> None:
        if not module.training:
            forwards[0] += 1

    plain_predict = pred_mod.HeadPredictor.predict_parameters

    def recording_predict(self, data, *args, **kwargs):
        backbone = self.network.backbone  # every pass runs it, whatever the head computes
        if id(backbone) not in hooked:
            hooked.add(id(backbone))
            backbone.register_forward_hook(count_backbone_pass)
        mirroring.append(self.use_mirroring)
        patch = list(self.configuration_manager.patch_size)
        shape = [max(s, p) for s, p in zip(data.shape[1:], patch, strict=True)]  # padded to a patch
        tiles = 1
        for steps in compute_steps_for_sliding_window(shape, patch, self.tile_step_size):
            tiles *= len(steps)
        expected[0] += tiles
        return plain_predict(self, data, *args, **kwargs)

    monkeypatch.setattr(pred_mod.HeadPredictor, "predict_parameters", recording_predict)
    finetune.run(micro_ws, _params("lowrank", 11, epochs=1, iterations=1))
    assert mirroring and not any(mirroring)  # one validation, every case unmirrored
    assert expected[0] >= len(mirroring)
    assert forwards[0] == expected[0]
