"""The report's tables: one model, rendered as Markdown, LaTeX (booktabs), HTML and CSV.

Tables (SPEC section 1, the paper's tables, plus ours):

1. split counts per organ, beside the paper's;
2. Dice (%) per method and organ, mean +- std over seeds, beside the paper's;
3. NLL, a whole-volume block and a region-of-interest block, the paper's
   values beside the ROI block (docs/metrics.md says why);
4. ECE and MCE (15 bins), the same two blocks, the paper's pancreas values
   beside the ROI block;
5. uncertainty quality (error-detection AUROC/AUPRC, AURC, GED^2, p* error);
5b. against the truth (phantom): metrics against p* in the ambiguity band;
6. every evaluated run.

Cells of our numbers hold mean, sample std (ddof = 1) and the number of
seeds; with one seed only the mean is shown. The best mean of each of our
columns (per block) is bold. Numbers get as many decimals as it takes for
different means to print differently (:func:`fit_decimals`), so only real
ties are bold together. Missing results are "-". The CSV files are tidy (one
number per line) for further analysis.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mobseg.report.collect import BASELINES_GROUP, RunResult, StudyResults, mean_std
from mobseg.report.paper import (
    PAPER_CALIBRATION,
    PAPER_DICE,
    PAPER_NLL,
    PAPER_SPLITS,
    organ_label,
)

DASH = "-"
PM = "\u00b1"


@dataclass
class Cell:
    """One table cell: a literal text, or a number with spread.

    Attributes:
        text: Literal text (labels, published values with ``+-`` as ``±``).
        mean: Our mean (already scaled), or None for a text cell.
        std: Sample standard deviation over seeds (NaN when n < 2).
        n: Number of seeds behind the mean.
        decimals: Digits after the point.
        bold: Best of its column.
        paper: A published value (rendered in a muted style).
    """

    text: str | None = None
    mean: float | None = None
    std: float = float("nan")
    n: int = 0
    decimals: int = 2
    bold: bool = False
    paper: bool = False

    @property
    def numeric(self) -> bool:
        return self.mean is not None and math.isfinite(self.mean)

    def plain(self) -> str:
        """The text with ``±``, without markup."""
        if self.text is not None:
            return self.text
        if self.mean is None or not math.isfinite(self.mean):
            return DASH
        out = f"{self.mean:.{self.decimals}f}"
        if self.n > 1 and math.isfinite(self.std):
            out += f" {PM} {self.std:.{self.decimals}f}"
        return out

    def rounded(self) -> float | None:
        return round(self.mean, self.decimals) if self.numeric and self.mean is not None else None


@dataclass
class Table:
    """A rendered-anywhere table.

    Attributes:
        name: File stem, e.g. ``table2_dice``.
        title: Short title ("Table 2: Dice (%)").
        caption: One or two sentences under the title.
        columns: Header texts.
        rows: Cells, one list per row (first cell = row label).
        records: Tidy rows for the CSV file.
        rules: Row indices before which a rule is drawn (groups).
        label_columns: Leading text columns (left-aligned); the rest are right-aligned.
    """

    name: str
    title: str
    caption: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    rules: set[int] = field(default_factory=set)
    label_columns: int = 1

    def column_texts(self, index: int) -> list[str]:
        """The plain texts of one column (tests and figures use them)."""
        return [row[index].plain() for row in self.rows]


def mark_best(rows: Sequence[Sequence[Cell]], col: int, higher_is_better: bool) -> None:
    """Bold the best finite mean(s) of column ``col`` (ties after rounding)."""
    vals = [r[col].rounded() for r in rows]
    finite = [v for v in vals if v is not None]
    if not finite:
        return
    best = max(finite) if higher_is_better else min(finite)
    for r, v in zip(rows, vals, strict=True):
        if v is not None and v == best:
            r[col].bold = True


def fit_decimals(cells: Sequence[Cell], minimum: int, maximum: int = 6) -> None:
    """Give ``cells`` the fewest decimals (>= minimum) at which different means differ.

    Means equal at ``maximum`` decimals count as equal (a real tie). All cells
    of the column get the same number of decimals.
    """
    values = [c.mean for c in cells if c.numeric and c.mean is not None]
    if not values:
        return
    maximum = max(maximum, minimum)
    distinct = len({round(v, maximum) for v in values})
    d = minimum
    for d in range(minimum, maximum + 1):
        if len({round(v, d) for v in values}) == distinct:
            break
    for c in cells:
        if c.text is None:
            c.decimals = d


#: The two regions of Tables 3 and 4: (column suffix, label).
REGIONS: tuple[tuple[str, str], ...] = (("", "Whole volume"), ("_roi", "ROI"))

#: The region whose block the paper's values stand beside.
PAPER_REGION = "_roi"


def _paper_cell(value: tuple[str, str] | None) -> Cell:
    if value is None:
        return Cell(text=DASH, paper=True)
    return Cell(text=f"{value[0]} {PM} {value[1]}", paper=True)


def _seeds_text(counts: list[int]) -> str:
    c = sorted({n for n in counts if n > 0})
    if not c:
        return DASH
    return str(c[0]) if len(c) == 1 else f"{c[0]}-{c[-1]}"


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def metric_table(
    results: StudyResults,
    *,
    name: str,
    title: str,
    caption: str,
    metric: str,
    scale: float,
    decimals: int,
    higher_is_better: bool,
    paper: dict[str, dict[str, tuple[str, str]]] | None,
    regions: Sequence[tuple[str, str]] = (("", ""),),
) -> Table:
    """Rows = methods, columns = organs (ours, then the paper's beside it).

    With several ``regions`` ((suffix, label) pairs, e.g. :data:`REGIONS`) the
    rows come in one block per region (a leading "Region" column; metric
    ``<metric><suffix>``); the paper's values then stand only beside the
    :data:`PAPER_REGION` block.
    """
    organs = results.organ_names()
    blocks = len(regions) > 1
    lead = 2 if blocks else 1
    columns = ["Region", "Method"] if blocks else ["Method"]
    for o in organs:
        columns.append(organ_label(o))
        if paper is not None:
            columns.append(f"{organ_label(o)} (paper)")
    columns.append("Seeds")
    table = Table(name, title, caption, columns, label_columns=lead)
    step = 2 if paper is not None else 1
    for suffix, region_label in regions:
        start = len(table.rows)
        if start:
            table.rules.add(start)
        quote = not blocks or suffix == PAPER_REGION
        keys = results.rows()
        for i, key in enumerate(keys):
            if key.group == BASELINES_GROUP and (i == 0 or keys[i - 1].group != key.group):
                table.rules.add(len(table.rows))  # the sampling-based baselines below a rule
            row = [Cell(text=region_label)] if blocks else []
            row.append(Cell(text=key.label))
            ns = []
            for o in organs:
                values = [r.value(metric + suffix) for r in results.group(o, key.tag)]
                m, s, n = mean_std(values)
                cell = Cell(mean=m * scale, std=s * scale, n=n, decimals=decimals)
                row.append(cell)
                ns.append(n)
                pv = None
                if paper is not None:
                    pv = paper.get(key.paper_row or "", {}).get(o) if quote else None
                    row.append(_paper_cell(pv))
                record = {"table": name, "row": key.label, "tag": key.tag, "organ": o}
                if blocks:
                    record["region"] = region_label
                record.update(
                    metric=metric + suffix,
                    mean=m * scale,
                    std=s * scale,
                    n=n,
                    paper_mean=_float_or_nan(pv[0]) if pv else float("nan"),
                    paper_std=_float_or_nan(pv[1]) if pv else float("nan"),
                    _cell=cell,
                )
                table.records.append(record)
            row.append(Cell(text=_seeds_text(ns)))
            table.rows.append(row)
        block = table.rows[start:]
        for i in range(len(organs)):
            col = lead + i * step
            fit_decimals([r[col] for r in block], decimals)
            mark_best(block, col, higher_is_better)
    _flag_best_records(table)
    return table


def _flag_best_records(table: Table) -> None:
    """Replace each record's cell reference by its bold flag (column ``best``)."""
    for rec in table.records:
        cell = rec.pop("_cell", None)
        if cell is not None:
            rec["best"] = int(cell.bold)


def splits_table(results: StudyResults) -> Table:
    """Table 1: cases per split after filtering, ours beside the paper's."""
    name = "table1_splits"
    table = Table(
        name,
        "Table 1: Data splits",
        "Cases per split after dropping scans in which the organ is absent "
        "(excluded), ours beside the paper's (train/val/test).",
        ["Organ", "Train", "Val", "Test", "Excluded", "Paper train", "Paper val", "Paper test"],
    )
    for organ in results.organ_names():
        info = results.organs.get(organ)
        counts = (info.counts if info else None) or {}
        row = [Cell(text=organ_label(organ))]
        for k in ("train", "val", "test", "excluded"):
            v = counts.get(k)
            row.append(Cell(text=str(int(v)) if isinstance(v, (int, float)) else DASH))
        pv = PAPER_SPLITS.get(organ)
        for i in range(3):
            row.append(Cell(text=str(pv[i]) if pv else DASH, paper=True))
        table.rows.append(row)
        rec: dict[str, Any] = {"table": name, "organ": organ}
        for k in ("train", "val", "test", "excluded"):
            rec[k] = counts.get(k, "")
        for i, k in enumerate(("paper_train", "paper_val", "paper_test")):
            rec[k] = pv[i] if pv else ""
        table.records.append(rec)
    return table


def calibration_table(results: StudyResults) -> Table:
    """Table 4: ECE and MCE per organ (15 bins), whole volume and ROI blocks.

    The paper's pancreas values stand beside the ROI block.
    """
    organs = results.organ_names()
    name = "table4_calibration"
    caption = (
        "Expected and maximum calibration error of the foreground probability "
        "(15 equal-width bins, pooled over the test set), over the whole volume and in the "
        "region of interest (bounding box of ground truth or prediction plus a margin); "
        "the paper reports them for the pancreas only, shown beside the ROI block."
    )
    columns = ["Region", "Method"]
    for o in organs:
        columns += [f"{organ_label(o)} ECE", f"{organ_label(o)} MCE"]
    paper_organs = [o for o in organs if o in PAPER_CALIBRATION]
    for o in paper_organs:
        columns += [f"{organ_label(o)} ECE (paper)", f"{organ_label(o)} MCE (paper)"]
    table = Table(name, "Table 4: ECE and MCE", caption, columns, label_columns=2)
    for suffix, region_label in REGIONS:
        start = len(table.rows)
        if start:
            table.rules.add(start)
        for key in results.rows():
            row = [Cell(text=region_label), Cell(text=key.label)]
            for o in organs:
                for metric in ("ece", "mce"):
                    vals = [r.value(metric + suffix) for r in results.group(o, key.tag)]
                    m, s, n = mean_std(vals)
                    cell = Cell(mean=m, std=s, n=n, decimals=3)
                    row.append(cell)
                    table.records.append(
                        {
                            "table": name,
                            "row": key.label,
                            "tag": key.tag,
                            "organ": o,
                            "region": region_label,
                            "metric": metric + suffix,
                            "mean": m,
                            "std": s,
                            "n": n,
                            "_cell": cell,
                        }
                    )
            for o in paper_organs:
                pv = PAPER_CALIBRATION[o].get(key.paper_row or "")
                if suffix != PAPER_REGION:
                    pv = None
                row += [
                    _paper_cell(pv["ece"] if pv else None),
                    _paper_cell(pv["mce"] if pv else None),
                ]
            table.rows.append(row)
        block = table.rows[start:]
        for i in range(2 * len(organs)):
            fit_decimals([r[2 + i] for r in block], 3)
            mark_best(block, 2 + i, higher_is_better=False)
    _flag_best_records(table)
    return table


#: (summary key, header, decimals, higher is better; None = no best marked) of Table 5.
UNCERTAINTY_COLUMNS: tuple[tuple[str, str, int, bool | None], ...] = (
    ("auroc_var", "AUROC (Var)", 3, True),
    ("auprc_var", "AUPRC (Var)", 3, True),
    ("auroc_entropy", "AUROC (H)", 3, True),
    ("aurc_var", "AURC (Var)", 3, False),
    ("aurc_entropy", "AURC (H)", 3, False),
    ("ged2", "GED\u00b2", 3, False),
    ("diversity", "Sample div.", 3, None),
    ("reference_diversity", "Annotator div.", 3, None),
    ("pstar_mae", "|p - p*|", 4, False),
)


def uncertainty_table(results: StudyResults) -> Table:
    """Table 5: quality of the uncertainty, ours only (rows: organ x method)."""
    return organ_method_table(
        results,
        "table5_uncertainty",
        "Table 5: Quality of the uncertainty",
        "Voxel error detection (errors = prediction differs from the ground truth; score "
        "Var[p] or predictive entropy H), case-level area under the risk-coverage curve "
        "(risk 1 - Dice, confidence = minus the mean uncertainty over the predicted organ; "
        "lower is better), GED\u00b2 against several reference masks (1 - IoU), the mean "
        "distance between distinct model samples and between distinct annotators (sample "
        "and annotator diversity, 1 - IoU; a good model's matches the annotators', so no "
        "best is marked; '-' without saved samples), and the mean absolute error of p "
        "against the phantom's true probability p*. Not in the paper.",
        UNCERTAINTY_COLUMNS,
    )


#: Columns of Table 5c: (summary key, header, decimals, higher is better).
FAILURE_TABLE_COLUMNS: tuple[tuple[str, str, int, bool | None], ...] = (
    ("fail_auroc_var_pred", "AUROC Var (organ)", 3, True),
    ("fail_auroc_entropy_pred", "AUROC H (organ)", 3, True),
    ("fail_auroc_mi_pred", "AUROC MI (organ)", 3, True),
    ("fail_auroc_var_boundary", "AUROC Var (band)", 3, True),
    ("fail_auroc_entropy_boundary", "AUROC H (band)", 3, True),
    ("fail_auroc_volume_cv", "AUROC vol. CV", 3, True),
    ("fail_spearman_entropy_pred", "\u03c1 H (organ)", 3, True),
    ("fail_spearman_entropy_boundary", "\u03c1 H (band)", 3, True),
    ("n_failed", "Failed cases", 0, None),
)

#: Columns of Table 5d: (summary key, header, decimals, higher is better).
CONFORMAL_TABLE_COLUMNS: tuple[tuple[str, str, int, bool | None], ...] = (
    ("crc_alpha", "\u03b1", 2, None),
    ("crc_lambda", "\u03bb", 4, None),
    ("fnr", "FNR at p > 0.5", 3, False),
    ("crc_fnr", "FNR at \u03bb", 3, None),
    ("crc_extra_volume", "Extra volume", 3, False),
    ("crc_n_cal", "Calibration cases", 0, None),
)


def failure_table(results: StudyResults) -> Table:
    """Table 5c: from voxel to subject, case scores flagging failed cases."""
    return organ_method_table(
        results,
        "table5c_failure",
        "Table 5c: Failure detection from case-level uncertainty",
        "A test case has failed when its Dice is below the 10th percentile of the split's "
        "Dice. AUROC of flagging failed cases with a case score (the mean Var[p], entropy H "
        "or mutual information over the predicted organ, or over its boundary band of 2 "
        "voxels; the coefficient of variation of the predicted volume over the saved "
        "samples) and Spearman's \u03c1 of the score with 1 - Dice; mean \u00b1 std over "
        "seeds; '-' where undefined (no such map, constant score). Higher is better. Not in "
        "the paper.",
        FAILURE_TABLE_COLUMNS,
    )


def conformal_table(results: StudyResults) -> Table:
    """Table 5d: conformal risk control of the organ's false-negative rate."""
    return organ_method_table(
        results,
        "table5d_conformal",
        "Table 5d: Conformal risk control of the false-negative rate",
        "The threshold \u03bb of the organ mask {p \u2265 \u03bb} calibrated on the "
        "validation split so that the expected share of organ voxels left out (FNR) is at "
        "most \u03b1 (conformal risk control, Angelopoulos et al. 2022); the FNR of the "
        "default mask p > 0.5 and the achieved FNR at \u03bb on the test split (mean over "
        "cases), and the extra predicted volume at \u03bb relative to p > 0.5. Runs "
        "without validation predictions (`mobseg predict --split val`) show '-'. Not in "
        "the paper.",
        CONFORMAL_TABLE_COLUMNS,
    )


def organ_method_table(
    results: StudyResults,
    name: str,
    title: str,
    caption: str,
    columns: Sequence[tuple[str, str, int, bool | None]],
    config_columns: Sequence[str] = (),
) -> Table:
    """Rows: organ x method with results; columns: summary numbers, mean \u00b1 std over seeds.

    Args:
        results: The study.
        name, title, caption: The table's.
        columns: (summary key, header, decimals, higher is better or None = no best).
        config_columns: Columns of each row's fine-tuning configuration
            (:func:`training_cells`) between the method and the numbers.
    """
    lead = 2 + len(config_columns)
    table = Table(
        name,
        title,
        caption,
        ["Organ", "Method", *config_columns] + [c[1] for c in columns] + ["Seeds"],
        label_columns=lead,
    )
    for organ in results.result_organs():
        start = len(table.rows)
        if start:
            table.rules.add(start)
        for key in results.rows():
            group = results.group(organ, key.tag)
            if not group:
                continue
            config = training_cells(group) if config_columns else {}
            row = [Cell(text=organ_label(organ)), Cell(text=key.label)]
            row += [Cell(text=config[c]) for c in config_columns]
            for metric, header, dec, _ in columns:
                m, s, n = mean_std([r.value(metric) for r in group])
                cell = Cell(mean=m, std=s, n=n, decimals=dec)
                row.append(cell)
                table.records.append(
                    {
                        "table": name,
                        "row": key.label,
                        "tag": key.tag,
                        "organ": organ,
                        **{c.lower(): config[c] for c in config_columns},
                        "metric": metric,
                        "column": header,
                        "mean": m,
                        "std": s,
                        "n": n,
                        "_cell": cell,
                    }
                )
            row.append(Cell(text=str(len(group))))
            table.rows.append(row)
        block = table.rows[start:]
        for i, (_, _, dec, higher) in enumerate(columns):
            fit_decimals([r[lead + i] for r in block], dec)
            if higher is not None:
                mark_best(block, lead + i, higher)
    _flag_best_records(table)
    return table


def runs_table(results: StudyResults) -> Table:
    """Table 6: every evaluated run, with its pooled headline numbers."""
    name = "table6_runs"
    table = Table(
        name,
        "Table 6: Evaluated runs",
        "Every run in the manifest that was evaluated: test cases, mean Dice over cases "
        "(cases where prediction and ground truth are both empty are excluded and counted), "
        "and the pooled NLL and ECE.",
        ["Organ", "Method", "Tag", "Seed", "Cases", "Empty (NaN Dice)", "Dice (%)", "NLL", "ECE"],
        label_columns=3,
    )
    order = {k.tag: i for i, k in enumerate(results.rows())}
    runs = sorted(
        results.runs,
        key=lambda r: (results.organ_names().index(r.organ), order.get(r.tag, 99), r.seed),
    )
    labels = {k.tag: k.label for k in results.rows()}
    for r in runs:
        n_cases = r.value("n_cases")
        n_nan = r.value("n_nan_dice")
        table.rows.append(
            [
                Cell(text=organ_label(r.organ)),
                Cell(text=labels.get(r.tag, r.tag)),
                Cell(text=r.tag),
                Cell(text=str(r.seed)),
                Cell(text=DASH if math.isnan(n_cases) else str(int(n_cases))),
                Cell(text=DASH if math.isnan(n_nan) else str(int(n_nan))),
                Cell(mean=r.value("dice") * 100, n=1, decimals=2),
                Cell(mean=r.value("nll"), n=1, decimals=3),
                Cell(mean=r.value("ece"), n=1, decimals=3),
            ]
        )
        table.records.append(
            {
                "table": name,
                "organ": r.organ,
                "method": r.method,
                "tag": r.tag,
                "seed": r.seed,
                **{k: r.summary.get(k) for k in ("n_cases", "n_nan_dice", "dice", "nll", "ece")},
            }
        )
    return table


def cost_table(results: StudyResults) -> Table:
    """Table 7: every method by group, with the cost of its prediction.

    Per organ: seconds per case of the prediction (``seconds_per_case`` of its
    predict records, mean over seeds) and that time relative to the
    deterministic prediction's in the same study (:meth:`StudyResults.cost`).
    """
    name = "table7_cost"
    organs = results.result_organs()
    columns = ["Group", "Method"]
    for o in organs:
        columns += [f"{organ_label(o)} s/case", f"{organ_label(o)} cost (x det.)"]
    table = Table(
        name,
        "Table 7: Methods by group and the cost of their prediction",
        "Seconds per test case of each prediction (preprocessing, every pass, stitching and "
        "export; an ensemble adds its members' times), mean over seeds, and the same "
        "relative to the deterministic prediction (the backbone, else the fine-tuned "
        "control) measured in this study. Covariance heads need one pass per tile; MC "
        "dropout T, TTA mixtures the mirrored passes, ensembles one prediction per member.",
        columns,
        label_columns=2,
    )
    previous = None
    for key in results.rows():
        if not any(results.group(o, key.tag) for o in organs):
            continue
        if previous is not None and key.group != previous:
            table.rules.add(len(table.rows))
        previous = key.group
        row = [Cell(text=key.group), Cell(text=key.label)]
        for o in organs:
            secs, cost = results.seconds_per_case(o, key.tag), results.cost(o, key.tag)
            row += [Cell(mean=secs, n=1, decimals=2), Cell(mean=cost, n=1, decimals=2)]
            table.records.append(
                {
                    "table": name,
                    "group": key.group,
                    "row": key.label,
                    "tag": key.tag,
                    "organ": o,
                    "seconds_per_case": secs,
                    "cost": cost,
                }
            )
        table.rows.append(row)
    return table


#: (summary key, header, decimals, higher is better; None = no best marked) of Table 5b.
TRUTH_COLUMNS: tuple[tuple[str, str, int, bool | None], ...] = (
    ("pstar_mae_band", "|p - p*|", 4, False),
    ("pstar_rmse_band", "RMSE", 4, False),
    ("pstar_nll_band", "NLL*", 3, False),
    ("pstar_brier_band", "Brier*", 3, False),
    ("pstar_var_corr_band", "corr(Var, p*(1-p*))", 3, True),
    ("pstar_var_ratio_band", "Var ratio", 3, None),
    ("ged2", "GED\u00b2", 3, False),
    ("diversity_ratio", "Div. ratio", 3, None),
)


#: The training configuration shown beside each row of Table 5b.
TRUTH_CONFIG_COLUMNS: tuple[str, ...] = ("Objective", "Noise", "Annotators", "lr")


def training_cells(runs: Sequence[RunResult]) -> dict[str, str]:
    """The texts of :data:`TRUTH_CONFIG_COLUMNS` for one row's runs ('-' = unknown or n/a).

    The runs of a row share their tag, hence their configuration; the first
    run with a known one speaks for them.
    """
    training = next((r.training for r in runs if r.training), None) or {}
    lr = training.get("lr")
    return {
        "Objective": str(training.get("objective") or DASH),
        "Noise": str(training.get("noise") or DASH),
        "Annotators": str(training.get("annotators") or DASH),
        "lr": f"{lr:g}" if isinstance(lr, (int, float)) else DASH,
    }


def truth_table(results: StudyResults) -> Table:
    """Table 5b: every method against the phantom's true label law p*, in the ambiguity band."""
    return organ_method_table(
        results,
        "table5b_truth",
        "Table 5b: Against the truth",
        "Phantom only (elsewhere the truth is unknown and the cells are '-'). Inside the "
        "ambiguity band (voxels with 0.01 < p* < 0.99): mean |p - p*| and its RMSE; NLL* and "
        "Brier*, the NLL and two-class Brier score of p expected under labels drawn from p* "
        "(their minimum, reached by p = p*, is the entropy of p* and 2 p*(1 - p*)); the "
        "Pearson correlation of the model's Var[p] with the annotators' per-voxel variance "
        "p*(1 - p*) and the ratio of their means (target 1; '-' without a variance map, "
        "and a correlation of '-' for a zero one); GED\u00b2 against all K annotators (1 - IoU) "
        "and the sample diversity over the annotator diversity (target 1). Mean \u00b1 std "
        "over seeds; lower is better except for the correlation; no best is marked for the "
        "ratios. Objective, noise, annotators and learning rate are the run's fine-tuning "
        "('-' where they do not apply, e.g. the backbone); every configuration is a row of "
        "its own, after its method's paper row.",
        TRUTH_COLUMNS,
        config_columns=TRUTH_CONFIG_COLUMNS,
    )


def all_tables(results: StudyResults) -> list[Table]:
    """Every table of the report, in order."""
    tables = [
        splits_table(results),
        metric_table(
            results,
            name="table2_dice",
            title="Table 2: Dice (%)",
            caption="Dice of the predicted organ (argmax of the mean probability) per test "
            "case, averaged over cases; mean \u00b1 std over seeds. Higher is better.",
            metric="dice",
            scale=100.0,
            decimals=2,
            higher_is_better=True,
            paper=PAPER_DICE,
        ),
        metric_table(
            results,
            name="table3_nll",
            title="Table 3: Negative log-likelihood",
            caption="Mean over the test voxels of -ln p(true class) (nats per voxel, "
            "probabilities floored at 1e-8), over the whole volume and in the region of "
            "interest (bounding box of ground truth or prediction plus a margin); mean "
            "\u00b1 std over seeds. Lower is better. The paper's values stand beside the "
            "ROI block, the variant they compare with (see docs/metrics.md).",
            metric="nll",
            scale=1.0,
            decimals=3,
            higher_is_better=False,
            paper=PAPER_NLL,
            regions=REGIONS,
        ),
        calibration_table(results),
        uncertainty_table(results),
        failure_table(results),
        conformal_table(results),
        truth_table(results),
        runs_table(results),
        cost_table(results),
    ]
    return tables


# -- renderers ---------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """GitHub-flavoured Markdown: title in bold, the table, the caption in italics."""

    def cell(c: Cell) -> str:
        t = _md_escape(c.plain())
        if c.bold:
            return f"**{t}**"
        return f"*{t}*" if c.paper and t != DASH else t

    lines = [
        "| " + " | ".join(_md_escape(c) for c in table.columns) + " |",
        "| "
        + " | ".join(
            ["---"] * table.label_columns + ["---:"] * (len(table.columns) - table.label_columns)
        )
        + " |",
    ]
    for row in table.rows:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


_LATEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials; ``±`` becomes ``$\\pm$`` and ``²`` ``$^2$``."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace(PM, r"$\pm$").replace("\u00b2", r"$^2$").replace("*", r"$^*$")


def _strip_number(title: str) -> str:
    """'Table 2: Dice (%)' -> 'Dice (%)' (LaTeX numbers tables itself)."""
    return re.sub(r"^Table \w+:\s*", "", title)


def to_latex(table: Table) -> str:
    """A booktabs table environment (needs ``\\usepackage{booktabs}``)."""

    def cell(c: Cell) -> str:
        t = latex_escape(c.plain())
        if c.bold:
            return rf"\textbf{{{t}}}"
        return rf"\textit{{{t}}}" if c.paper and c.plain() != DASH else t

    spec = "l" * table.label_columns + "r" * (len(table.columns) - table.label_columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(_strip_number(table.title))}. {latex_escape(table.caption)}}}",
        rf"\label{{tab:{table.name}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(table.rows):
        if i in table.rules:
            lines.append(r"\midrule")
        lines.append(" & ".join(cell(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """An HTML table with a caption (styles come from the page's CSS)."""

    def cell(c: Cell, left: bool) -> str:
        cls = ["label"] if left else []
        if c.paper:
            cls.append("paper")
        if c.bold:
            cls.append("best")
        attr = f' class="{" ".join(cls)}"' if cls else ""
        t = html.escape(c.plain())
        return f"<td{attr}>{f'<b>{t}</b>' if c.bold else t}</td>"

    head = "".join(
        f'<th class="paper">{html.escape(c)}</th>'
        if "(paper)" in c or c.startswith("Paper ")
        else f"<th>{html.escape(c)}</th>"
        for c in table.columns
    )
    body = []
    for i, row in enumerate(table.rows):
        cls = ' class="rule"' if i in table.rules else ""
        cells = "".join(cell(c, j < table.label_columns) for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<table id="{table.name}">'
        f"<caption><b>{html.escape(table.title)}.</b> {html.escape(table.caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def to_csv(table: Table) -> str:
    """Tidy CSV of the table's records (numbers unrounded, NaN as empty)."""
    keys: list[str] = []
    for rec in table.records:
        for k in rec:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.10g}"
        return str(v)

    for rec in table.records:
        writer.writerow([fmt(rec.get(k)) for k in keys])
    return buf.getvalue()


RENDERERS: dict[str, Callable[[Table], str]] = {
    "md": to_markdown,
    "tex": to_latex,
    "csv": to_csv,
}
