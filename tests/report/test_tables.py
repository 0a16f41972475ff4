"""Report tables: aggregation over seeds, best in bold, paper columns, renderers."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from mobseg.report.collect import RunResult, StudyResults, row_keys
from mobseg.report.paper import PAPER_DICE
from mobseg.report.tables import (
    Cell,
    all_tables,
    latex_escape,
    metric_table,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)


def _run(organ: str, tag: str, method: str, seed: int, **summary: float) -> RunResult:
    bases = int(tag.split("-b")[1].split("-")[0]) if method == "mob" else None
    return RunResult(organ, tag, seed, method, bases, dict(summary))


def _results() -> StudyResults:
    res = StudyResults()
    for seed, (d_mob, d_diag) in enumerate([(0.84, 0.80), (0.86, 0.81), (0.85, 0.79)]):
        res.runs.append(_run("pancreas", "mob-b3-r16", "mob", seed, dice=d_mob, nll=0.2, ece=0.01))
        res.runs.append(_run("pancreas", "diagonal", "diagonal", seed, dice=d_diag, nll=0.3))
    res.runs.append(_run("pancreas", "mob-b5-r16", "mob", 0, dice=0.83, nll=0.25))
    return res


def _dice_table(res: StudyResults):  # type: ignore[no-untyped-def]
    return metric_table(
        res,
        name="t",
        title="Table 2: Dice (%)",
        caption="c",
        metric="dice",
        scale=100,
        decimals=2,
        higher_is_better=True,
        paper=PAPER_DICE,
    )


def test_mean_and_sample_std_over_seeds_and_best_bold() -> None:
    table = _dice_table(_results())
    labels = table.column_texts(0)
    assert labels[:5] == [
        "Deterministic (nnU-Net backbone)",
        "Diagonal",
        "Diagonal + Low-rank",
        "Single-Basis",
        "Mixture-of-Bases",
    ]
    assert labels[5] == "Mixture-of-Bases (M=5, mob-b5-r16)"
    mob = table.rows[4][1]
    assert mob.mean == pytest.approx(85.0)
    assert mob.std == pytest.approx(np.std([84, 86, 85], ddof=1))
    assert mob.n == 3 and mob.plain() == "85.00 \u00b1 1.00" and mob.bold
    assert not table.rows[1][1].bold
    assert table.rows[5][1].plain() == "83.00"  # one seed: mean only
    assert table.rows[0][1].plain() == "-"  # backbone not run
    assert table.rows[0][2].plain() == "80.50 \u00b1 0.33" and table.rows[0][2].paper
    assert table.rows[5][2].plain() == "-"  # ablation row has no published value
    assert table.columns == ["Method", "Pancreas", "Pancreas (paper)", "Seeds"]


def test_renderers_markdown_latex_html_csv() -> None:
    table = _dice_table(_results())
    md = to_markdown(table)
    assert "| **85.00 \u00b1 1.00** |" in md and "*80.37 \u00b1 0.38*" in md
    tex = to_latex(table)
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\midrule" in tex
    assert r"\textbf{85.00 $\pm$ 1.00}" in tex
    assert r"\caption{Dice (\%). c}" in tex  # LaTeX numbers the table itself
    assert tex.count(r"\\") == 1 + len(table.rows)
    page = to_html(table)
    assert "<b>85.00 \u00b1 1.00</b>" in page and 'class="paper"' in page
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    mob = next(r for r in rows if r["tag"] == "mob-b3-r16")
    assert float(mob["mean"]) == pytest.approx(85.0) and mob["best"] == "1"
    assert float(mob["paper_mean"]) == 84.91 and mob["n"] == "3"
    backbone = next(r for r in rows if r["tag"] == "backbone")
    assert backbone["mean"] == "" and backbone["n"] == "0"


def test_latex_escaping() -> None:
    assert latex_escape("a_b & 5% #1 \u00b1 GED\u00b2") == r"a\_b \& 5\% \#1 $\pm$ GED$^2$"
    assert Cell(mean=float("nan")).plain() == "-"


def test_canonical_rows_and_ablation_rows() -> None:
    # the default tag of a method carries the paper's row; a sole other tag takes its place
    rows = row_keys({("lowrank-r4", "lowrank", None), ("mob-b3-r16", "mob", 3)})
    by_tag = {r.tag: r for r in rows}
    assert by_tag["lowrank-r4"].paper_row == "Diagonal + Low-rank"
    assert by_tag["mob-b3-r16"].paper_row == "Mixture-of-Bases"
    present = {("mob-b3-r16", "mob", 3), ("mob-b1-r16", "mob", 1)}
    rows = row_keys(present | {("deterministic", "deterministic", None)})
    labels = [r.label for r in rows]
    assert "Deterministic (fine-tuned control)" in labels
    # several fine-tuned controls (the truth grid's annotator choices): one label each
    controls = row_keys(
        {("deterministic-annall", "deterministic", None), ("deterministic", "deterministic", None)}
    )
    assert [r.label for r in controls if r.tag.startswith("deterministic")] == [
        "Deterministic (fine-tuned control)",
        "Deterministic (fine-tuned control, deterministic-annall)",
    ]
    assert labels.index("Mixture-of-Bases") < labels.index("Mixture-of-Bases (M=1, mob-b1-r16)")
    assert {r.tag for r in rows if r.paper_row} == {
        "backbone",
        "diagonal",
        "lowrank-r16",
        "single-basis-r16",
        "mob-b3-r16",
    }


def test_empty_results_give_dashes_and_paper_values() -> None:
    tables = {t.name: t for t in all_tables(StudyResults())}
    dice = tables["table2_dice"]
    assert dice.columns[1:9:2] == ["Pancreas", "Gallbladder", "Duodenum", "AG (L)"]
    assert all(c == "-" for c in dice.column_texts(1))
    assert dice.column_texts(2)[4] == "84.91 \u00b1 0.32"
    splits = tables["table1_splits"]
    assert splits.column_texts(1) == ["-"] * 4 and splits.column_texts(5)[0] == "648"
    assert tables["table6_runs"].rows == []
    assert "table4b_calibration_roi" not in tables


def test_uncertainty_table_shows_diversities_without_a_best() -> None:
    from mobseg.report.tables import uncertainty_table

    res = StudyResults()
    for seed, (ged, div) in enumerate([(0.20, 0.10), (0.22, 0.14)]):
        common = {"reference_diversity": 0.3, "auroc_var": 0.9}
        res.runs.append(
            _run("pancreas", "mob-b3-r16", "mob", seed, ged2=ged, diversity=div, **common)
        )
        res.runs.append(
            _run("pancreas", "diagonal", "diagonal", seed, ged2=0.3, diversity=0.05, **common)
        )
    table = uncertainty_table(res)
    col = {name: i for i, name in enumerate(table.columns)}
    assert table.columns.index("Sample div.") == col["GED\u00b2"] + 1
    rows = {r[1].text: r for r in table.rows}
    mob, diag = rows["Mixture-of-Bases"], rows["Diagonal"]
    assert mob[col["Sample div."]].plain() == "0.120 \u00b1 0.028"
    assert mob[col["Annotator div."]].plain() == "0.300 \u00b1 0.000"
    assert mob[col["GED\u00b2"]].bold and not diag[col["GED\u00b2"]].bold  # lower is better
    assert not any(r[col["Sample div."]].bold or r[col["Annotator div."]].bold for r in table.rows)


def test_nll_blocks_get_the_digits_that_separate_different_means() -> None:
    from mobseg.report.tables import REGIONS, fit_decimals

    res = StudyResults()
    # whole-volume NLL 0.00412 vs 0.00438 (equal at 3 decimals), ROI 0.21 vs 0.25
    for tag, method, nll, roi in (
        ("mob-b3-r16", "mob", 0.00412, 0.21),
        ("diagonal", "diagonal", 0.00438, 0.25),
    ):
        res.runs.append(_run("pancreas", tag, method, 0, nll=nll, nll_roi=roi))
    table = metric_table(
        res,
        name="t3",
        title="Table 3: NLL",
        caption="c",
        metric="nll",
        scale=1.0,
        decimals=3,
        higher_is_better=False,
        paper=None,
        regions=REGIONS,
    )
    assert table.columns[:3] == ["Region", "Method", "Pancreas"] and table.label_columns == 2
    rows = {(r[0].text, r[1].text): r[2] for r in table.rows}
    mob, diag = rows[("Whole volume", "Mixture-of-Bases")], rows[("Whole volume", "Diagonal")]
    assert (mob.plain(), diag.plain()) == ("0.0041", "0.0044") and mob.bold and not diag.bold
    mob_roi, diag_roi = rows[("ROI", "Mixture-of-Bases")], rows[("ROI", "Diagonal")]
    assert (mob_roi.plain(), diag_roi.plain()) == ("0.210", "0.250") and mob_roi.bold
    assert sorted(table.rules) == [5]  # one rule between the two blocks of the five paper rows
    # equal means stay a tie (bold together) however many digits are tried
    cells = [Cell(mean=0.1234567891), Cell(mean=0.1234567892), Cell(text="x")]
    fit_decimals(cells, 2)
    assert cells[0].decimals == 2 and cells[2].decimals == 2


def test_truth_table_is_dashes_without_phantom_results_and_marks_best_with_them() -> None:
    from mobseg.report.tables import truth_table

    res = StudyResults()
    for seed in (0, 1):
        res.runs.append(_run("pancreas", "mob-b3-r16", "mob", seed, dice=0.8))
    empty = truth_table(res)
    assert len(empty.rows) == 1 and all(c.plain() == "-" for c in empty.rows[0][2:-1])
    for seed, (nll, corr) in enumerate([(0.30, 0.8), (0.32, 0.9)]):
        res.runs[seed].summary.update(pstar_nll_band=nll, pstar_var_corr_band=corr)
    res.runs.append(
        _run(
            "pancreas",
            "deterministic",
            "deterministic",
            0,
            pstar_nll_band=0.5,
            pstar_var_ratio_band=0.0,
        )
    )
    table = truth_table(res)
    col = {h: i for i, h in enumerate(table.columns)}
    rows = {r[1].text: r for r in table.rows}
    mob, control = rows["Mixture-of-Bases"], rows["Deterministic (fine-tuned control)"]
    assert mob[col["NLL*"]].plain() == "0.310 \u00b1 0.014" and mob[col["NLL*"]].bold
    assert control[col["NLL*"]].plain() == "0.500" and not control[col["NLL*"]].bold
    assert control[col["Var ratio"]].plain() == "0.000" and not control[col["Var ratio"]].bold
    assert control[col["corr(Var, p*(1-p*))"]].plain() == "-"


def test_baseline_rows_are_grouped_after_the_heads_with_their_cost() -> None:
    from mobseg.report.collect import BASELINES_GROUP, HEADS_GROUP
    from mobseg.report.tables import cost_table

    present = {
        ("mob-b3-r16", "mob", 3),
        ("mob-b3-r16-frozen", "mob", 3),
        ("deterministic", "deterministic", None),
        ("deterministic-mcd0.1", "deterministic", None),
        ("deterministic-ttamix", "deterministic", None),
        ("ensemble-deterministic", "ensemble", None),
    }
    rows = row_keys(present, {"mob-b3-r16-frozen", "deterministic-mcd0.1"})
    groups = [r.group for r in rows]
    first = groups.index(BASELINES_GROUP)
    assert set(groups[:first]) == {HEADS_GROUP} and set(groups[first:]) == {BASELINES_GROUP}
    labels = [r.label for r in rows[first:]]
    assert labels == [
        "MC dropout (deterministic-mcd0.1)",
        "TTA mixture (deterministic)",
        "Deep ensemble (deterministic)",
    ]
    assert "Mixture-of-Bases (M=3, mob-b3-r16-frozen)" in [r.label for r in rows[:first]]

    res = StudyResults()
    secs = {"backbone": [2.0, 2.0], "deterministic": [3.0], "deterministic-mcd0.1": [19.0, 21.0]}
    secs |= {"ensemble-deterministic": [15.0], "mob-b3-r16": [None]}
    for tag, values in secs.items():
        method = {"mob-b3-r16": "mob", "ensemble-deterministic": "ensemble"}.get(
            tag, "deterministic"
        )
        for seed, v in enumerate(values):
            run = _run("pancreas", tag, method, seed, dice=0.8)
            run.seconds_per_case = v
            res.runs.append(run)
    assert res.cost("pancreas", "deterministic-mcd0.1") == pytest.approx(10.0)
    assert res.cost("pancreas", "ensemble-deterministic") == pytest.approx(7.5)
    assert np.isnan(res.cost("pancreas", "mob-b3-r16"))  # not recorded
    table = cost_table(res)
    by_label = {r[1].text: r for r in table.rows}
    assert by_label["MC dropout (deterministic-mcd0.1)"][0].text == BASELINES_GROUP
    assert by_label["MC dropout (deterministic-mcd0.1)"][3].plain() == "10.00"
    assert by_label["Deterministic (nnU-Net backbone)"][3].plain() == "1.00"
    assert by_label["Mixture-of-Bases"][3].plain() == "-"
    baseline_start = [r[0].text for r in table.rows].index(BASELINES_GROUP)
    assert baseline_start in table.rules
    # without a backbone, the fine-tuned control is the reference
    res.runs = [r for r in res.runs if r.tag != "backbone"]
    assert res.cost("pancreas", "deterministic-mcd0.1") == pytest.approx(20.0 / 3.0)
