"""Stage report end to end on a fake study: evaluate, then tables, figures, md and html."""

from __future__ import annotations

import base64
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import report_fakes as fakes
from PIL import Image
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import InvalidInputError
from mobseg.manifest import Manifest
from mobseg.stages import evaluate
from mobseg.stages.report import ReportParams, run
from mobseg.workspace import Workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    runs = {**fakes.RUNS, **fakes.CONTROL}
    ws = fakes.build_study(tmp_path_factory.mktemp("study") / "work", runs=runs)
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas"))
    rec = run(ws, ReportParams())
    return ws, rec.outputs


def test_writes_tables_figures_and_documents(reported: tuple[Workspace, dict]) -> None:
    ws, out = reported
    root = ws.report_dir
    names = ("splits", "dice", "nll", "calibration", "uncertainty", "failure", "conformal")
    for name in (*names, "truth", "runs"):
        stems = [p for p in (root / "tables").glob(f"table*_{name}.*")]
        assert sorted(p.suffix for p in stems) == [".csv", ".md", ".tex"], name
    assert set(out["figures"]) == {
        "figures/reliability.png",
        "figures/dice_vs_bases.png",
        "figures/risk_coverage.png",
        "figures/case_score_dice.png",
        "figures/variance_truth.png",
        "figures/case_pancreas.png",
        "figures/samples_pancreas.png",
    }
    for fig in out["figures"]:
        with Image.open(root / fig) as im:
            assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400
    rec = Manifest(ws.manifest_path).get("report")
    assert rec is not None and rec.status == "done" and rec.outputs["runs"] == 6


def test_every_run_is_listed_and_missing_cells_are_dashes(
    reported: tuple[Workspace, dict],
) -> None:
    ws, out = reported
    md = Path(out["report_md"]).read_text()
    page = Path(out["report_html"]).read_text()
    for tag in ("diagonal", "mob-b3-r16"):
        for seed in (0, 1):
            row = re.compile(rf"\| Pancreas \| [^|]+ \| {re.escape(tag)} \| {seed} \| 3 \|")
            assert row.search(md), (tag, seed)
            assert f'<td class="label">{tag}</td><td>{seed}</td>' in page
    dice = (ws.report_dir / "tables" / "table2_dice.md").read_text()
    backbone = next(ln for ln in dice.splitlines() if ln.startswith("| Deterministic"))
    assert backbone.split("|")[2].strip() == "-"  # not run -> dash, paper value beside
    assert backbone.split("|")[3].strip() == "*80.50 \u00b1 0.33*"
    mob = next(ln for ln in dice.splitlines() if ln.startswith("| Mixture-of-Bases |"))
    assert "**" in mob.split("|")[2]  # the better fake method is bold
    assert "\u00b1" in mob.split("|")[2]  # two seeds: mean +- std
    captions = ("Figure 1: Reliability", "Figure 2: Risk-coverage", "Figure 3: Learned variance")
    for caption in (*captions, "Figure 4: Dice", "Figure 5: Pancreas"):
        assert caption in md and caption in page


def test_nll_and_calibration_have_a_roi_block_with_the_paper_beside_it(
    reported: tuple[Workspace, dict],
) -> None:
    from mobseg.report.collect import collect

    ws, _ = reported
    nll = (ws.report_dir / "tables" / "table3_nll.md").read_text().splitlines()
    whole = [ln for ln in nll if ln.startswith("| Whole volume |")]
    roi = [ln for ln in nll if ln.startswith("| ROI |")]
    assert len(whole) == len(roi) == 6  # five paper rows and the fine-tuned control
    mob_whole = next(ln for ln in whole if "| Mixture-of-Bases |" in ln).split("|")
    mob_roi = next(ln for ln in roi if "| Mixture-of-Bases |" in ln).split("|")
    assert mob_whole[4].strip() == "-" and mob_roi[4].strip() == "*0.21 ± 0.01*"
    # the numbers are the records' summaries, ROI above whole volume, enough digits
    runs = [r for r in collect(ws).runs if r.tag == "mob-b3-r16"]
    assert all(r.value("nll_roi") > r.value("nll") for r in runs)
    got = [ln.split("|")[3].strip().strip("*") for ln in whole]
    numbers = [t.split(" ")[0] for t in got if t != "-"]
    assert len(set(numbers)) == len(numbers) == 3  # three runs, three different printed means
    assert sum("**" in ln.split("|")[3] for ln in whole) == 1  # one best, no tie
    cal = (ws.report_dir / "tables" / "table4_calibration.md").read_text()
    assert "| ROI | Mixture-of-Bases |" in cal and "*0.014 ± 0.0*" in cal
    assert "table4b" not in " ".join(p.name for p in (ws.report_dir / "tables").iterdir())


def test_against_the_truth_section(reported: tuple[Workspace, dict]) -> None:
    ws, out = reported
    md = Path(out["report_md"]).read_text()
    assert "## Against the truth" in md and "Table 5b: Against the truth" in md
    with open(ws.report_dir / "tables" / "table5b_truth.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert {r["row"] for r in csv_rows} == {
        "Diagonal",
        "Mixture-of-Bases",
        "Deterministic (fine-tuned control)",
    }
    control = {r["metric"]: r for r in csv_rows if r["tag"] == "deterministic"}
    assert control["pstar_var_corr_band"]["mean"] == ""  # zero variance map: no correlation,
    assert float(control["pstar_var_ratio_band"]["mean"]) == 0.0  # ratio 0,
    assert float(control["pstar_nll_band"]["mean"]) > 0  # but the scores against p* exist
    mob = next(r for r in csv_rows if r["tag"] == "mob-b3-r16" and r["metric"] == "pstar_nll_band")
    summaries = [
        Manifest(ws.manifest_path).get(f"evaluate/pancreas/mob-b3-r16/seed{s}") for s in (0, 1)
    ]
    vals = [rec.outputs["summary"]["pstar_nll_band"] for rec in summaries if rec]
    assert float(mob["mean"]) == pytest.approx(sum(vals) / 2)
    assert "has the lowest expected NLL in the ambiguity band" in md


def test_a_study_without_truth_renders_dashes(tmp_path: Path) -> None:
    ws = fakes.build_study(tmp_path / "w", seeds=(0,), source="folder")
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas"))
    rec = run(ws, ReportParams())
    md = Path(rec.outputs["report_md"]).read_text()
    assert "No run was evaluated against a known truth" in md
    assert "figures/variance_truth.png" not in rec.outputs["figures"]
    truth = (ws.report_dir / "tables" / "table5b_truth.md").read_text().splitlines()
    body = [ln.split("|")[3:-2] for ln in truth[2:]]
    assert body and all(c.strip() == "-" for row in body for c in row)


def test_html_is_self_contained(reported: tuple[Workspace, dict]) -> None:
    _, out = reported
    page = Path(out["report_html"]).read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(out["figures"])
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert 'src="figures/' not in page and "<style>" in page


def test_partial_and_empty_studies_never_crash(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "empty").ensure()
    rec = run(ws, ReportParams(out=tmp_path / "out"))
    md = Path(rec.outputs["report_md"]).read_text()
    assert "No evaluated run" in md and "84.91" in md  # paper values still shown
    assert rec.outputs["figures"] == []
    # a run whose CSV vanished: tables still come from the record, figures skip it
    only_mob = {"mob-b3-r16": fakes.RUNS["mob-b3-r16"]}
    ws2 = fakes.build_study(tmp_path / "w2", seeds=(0,), runs=only_mob)
    (r,) = evaluate.run(ws2, evaluate.EvaluateParams(organ="pancreas"))
    (ws2.root / r.outputs["metrics_csv"]).unlink()
    rec2 = run(ws2, ReportParams())
    dice = (ws2.report_dir / "tables" / "table2_dice.md").read_text()
    assert "| Mixture-of-Bases | **" in dice
    assert "figures/risk_coverage.png" not in rec2.outputs["figures"]


def test_case_option(reported: tuple[Workspace, dict], tmp_path: Path) -> None:
    ws, _ = reported
    rec = run(ws, ReportParams(out=tmp_path / "r", case="s0002"))
    assert "case s0002 (chosen with --case)" in Path(rec.outputs["report_md"]).read_text()
    with pytest.raises(InvalidInputError, match="'nope' is not a test case"):
        run(ws, ReportParams(out=tmp_path / "r2", case="nope"))
    result = runner.invoke(app, ["--workdir", str(ws.root), "report", "--case", "nope"])
    assert result.exit_code == 1 and "nope" in result.output


def test_failure_and_conformal_tables_hold_the_evaluated_numbers(
    reported: tuple[Workspace, dict],
) -> None:
    import csv

    import numpy as np

    ws, _ = reported
    man = Manifest(ws.manifest_path)
    recs = [r for r in man.find("evaluate", "evaluate/pancreas/mob-b3-r16/")]
    want = np.mean([r.outputs["summary"]["fail_auroc_entropy_boundary"] for r in recs])
    with open(ws.report_dir / "tables" / "table5c_failure.csv", newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["tag"] == "mob-b3-r16" and r["metric"] == "fail_auroc_entropy_boundary"
        ]
    assert len(rows) == 1 and float(rows[0]["mean"]) == pytest.approx(want)
    md = (ws.report_dir / "report.md").read_text()
    assert "Table 5c: Failure detection" in md and "Figure 2b: Case score against Dice" in md
    conformal = (ws.report_dir / "tables" / "table5d_conformal.md").read_text()
    mob = next(ln for ln in conformal.splitlines() if "| Mixture-of-Bases |" in ln)
    cells = [c.strip() for c in mob.split("|")]
    assert cells[3] == "-" and cells[5] != "-"  # no val predictions: no lambda; FNR at 0.5


def _captured_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Keep every matplotlib figure the report saves, by file name."""
    from mobseg.report import figures as figs

    saved: dict[str, object] = {}
    real = figs._save

    def keep(fig: object, path: Path) -> Path:
        saved[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(figs, "_save", keep)
    return saved


def test_case_panels_show_entropy_and_mutual_information(
    reported: tuple[Workspace, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, _ = reported
    saved = _captured_figures(monkeypatch)
    rec = run(ws, ReportParams(out=tmp_path / "r", case="s0001"))
    fig = saved["case_pancreas.png"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]  # type: ignore[attr-defined]
    assert titles[:5] == [
        "CT, ground truth and prediction",
        "Foreground probability p",
        "Predictive variance Var[p]",
        "Predictive entropy H[E p]",
        "Mutual information (epistemic)",
    ]
    # row 0's MI and entropy panels show one run's maps on one slice: the fakes'
    # MI is 0.4 x their entropy, voxel by voxel
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}  # type: ignore[attr-defined]
    mi = axes["Mutual information (epistemic)"].get_images()[-1].get_array()
    ent = axes["Predictive entropy H[E p]"].get_images()[-1].get_array()
    both = ~np.ma.getmaskarray(mi) & ~np.ma.getmaskarray(ent)
    assert both.sum() > 20
    np.testing.assert_allclose(mi.data[both], 0.4 * ent.data[both], rtol=1e-5)
    assert "mutual information" in Path(rec.outputs["report_md"]).read_text()


def test_samples_shown_beside_the_annotators(
    reported: tuple[Workspace, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mobseg.report import figures as figs
    from mobseg.report.collect import collect

    ws, _ = reported
    results = collect(ws)
    run_ = figs.samples_run(results, "pancreas", "s0002")
    assert run_ is not None and run_.tag == "mob-b3-r16" and run_.seed == 0
    names = [p.name for p in figs.sample_masks(run_, "s0002")]
    assert names == [f"s0002_sample{k}.nii.gz" for k in range(len(fakes.SAMPLE_SHIFTS))]
    saved = _captured_figures(monkeypatch)
    rec = run(ws, ReportParams(out=tmp_path / "r", case="s0002"))
    fig = saved["samples_pancreas.png"]
    titles = [ax.get_title() for ax in fig.axes]  # type: ignore[attr-defined]
    # the phantom's three annotators on top, the three saved samples below
    assert titles == ["annotator 0", "annotator 1", "annotator 2"] + [
        "sample 0",
        "sample 1",
        "sample 2",
    ]
    md = Path(rec.outputs["report_md"]).read_text()
    assert "annotators' masks (top row) beside joint samples of mob-b3-r16" in md
    assert "figures/samples_pancreas.png" in rec.outputs["figures"]


def test_no_samples_figure_without_saved_samples(tmp_path: Path) -> None:
    only = {"diagonal": fakes.RUNS["diagonal"]}
    ws = fakes.build_study(tmp_path / "w", seeds=(0,), runs=only)
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas"))
    rec = run(ws, ReportParams())
    assert "figures/case_pancreas.png" in rec.outputs["figures"]
    assert not any("samples_" in f for f in rec.outputs["figures"])
