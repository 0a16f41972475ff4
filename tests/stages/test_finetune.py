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
    assert rec.key == "finetune/pancreas/single-basis-r4/seed3"
    out = rec.outputs
    assert out["run_dir"] == str(micro_ws.run_dir("pancreas", "single-basis-r4", 3))
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
    run_dir = micro_ws.run_dir("pancreas", params.head.tag(), 5)
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
    key = "finetune/pancreas/mob-b2-r4-p2/seed5"
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
    finetune._finetune(params, get_preset("micro"), model, other, "cpu", params.head.tag())
    straight = torch.load(other / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for k, v in straight["network_weights"].items():
        torch.testing.assert_close(resumed["network_weights"][k], v, rtol=1e-5, atol=1e-6)
