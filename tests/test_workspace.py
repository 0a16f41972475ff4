"""Workspace paths and the nnU-Net environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mobseg.workspace import Workspace


def test_workdir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Workspace.from_option(None).root == tmp_path / "mobseg_work"
    monkeypatch.setenv("MOBSEG_WORKDIR", str(tmp_path / "env"))
    assert Workspace.from_option(None).root == tmp_path / "env"
    assert Workspace.from_option(tmp_path / "opt").root == tmp_path / "opt"


def test_nnunet_env_defaults_inside_workdir_and_keeps_user_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "mine"))
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    ws = Workspace(tmp_path / "w")
    env = ws.configure_nnunet_env()
    assert env["nnUNet_raw"] == str(ws.nnunet_raw) and ws.nnunet_raw.is_dir()
    assert env["nnUNet_preprocessed"] == str(ws.nnunet_preprocessed)
    assert env["nnUNet_results"] == str(tmp_path / "mine")
    assert env["nnUNet_def_n_proc"] == str(os.cpu_count())
    assert os.environ["nnUNet_raw"] == str(ws.nnunet_raw)


def test_stage_folders_are_inside_the_root(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for path in (
        ws.data_dir("pancreas"),
        ws.run_dir("pancreas", "mob-b3-r16", 0),
        ws.prediction_dir("pancreas", "diagonal", 1),
        ws.report_dir,
        ws.downloads,
    ):
        assert tmp_path in path.parents
    assert ws.run_dir("pancreas", "mob-b3-r16", 2).parts[-4:] == (
        "runs",
        "pancreas",
        "mob-b3-r16",
        "seed2",
    )
