"""Stage ``report``: the paper's tables and figures from the manifest's runs.

Reads every finished ``evaluate`` record (and the ``prepare`` records), and
writes into ``<out>`` (default ``<workdir>/report``):

- ``tables/table*.{md,tex,csv}``: Table 1 (splits), 2 (Dice), 3 (NLL) and
  4 (ECE/MCE), each with a whole-volume and a region-of-interest block,
  5 (uncertainty quality), 5b (against the truth, phantom), 6 (every run);
  Markdown, LaTeX booktabs and tidy CSV;
- ``figures/*.png``: reliability diagrams, Dice against the number of bases,
  risk-coverage curves, Var[p] against p*(1 - p*) (phantom), and per organ a
  case panel;
- ``report.md`` and the self-contained ``report.html``.

Missing results are "-" cells and figures that cannot be drawn are left out
with a note, so a partial study always gets a report. The record ``report``
lists the files written. The report is always regenerated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mobseg.errors import InvalidInputError, MobsegError
from mobseg.fsutil import atomic_write_text
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import REPORT_KEY
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

TITLE = "Results: structured covariance with learned mixture-of-bases (mobseg)"


@dataclass(frozen=True)
class ReportParams:
    """Options of ``mobseg report``.

    Attributes:
        out: Output folder; None = ``<workdir>/report``.
        case: Case shown in the case panels; None = chosen automatically (the
            case whose Dice, averaged over the shown runs, is the median one).
    """

    out: Path | None = None
    case: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"out": None if self.out is None else str(self.out), "case": self.case}


def _version() -> str:
    try:
        return metadata.version("mobseg")
    except metadata.PackageNotFoundError:
        return "(development)"


def _check_case(results: Any, case: str) -> None:
    organs = results.result_organs()
    for organ in organs:
        info = results.organs.get(organ)
        if info and info.raw_dir and (info.raw_dir / "labelsTs" / f"{case}.nii.gz").is_file():
            return
    raise InvalidInputError(
        f"Case {case!r} is not a test case of any evaluated organ "
        f"({', '.join(organs) or 'none evaluated'}).",
        hint="Leave out --case to choose one automatically.",
    )


def _samples_figure(
    ws: Workspace, results: Any, organ: str, case: str, path: Path
) -> tuple[Path, str] | None:
    """The saved samples beside the annotators' masks of ``case``; (path, run tag) or None."""
    from mobseg.data.references import reference_masks
    from mobseg.report import figures as figs

    run = figs.samples_run(results, organ, case)
    if run is None:
        return None
    drawn = figs.samples_figure(results, organ, case, reference_masks(ws, organ, case), path)
    return None if drawn is None else (drawn, run.tag)


def build(ws: Workspace, params: ReportParams) -> dict[str, Any]:
    """Write every table, figure and document; returns the outputs of the record."""
    from mobseg.report import document as doc
    from mobseg.report import figures as figs
    from mobseg.report.collect import collect
    from mobseg.report.paper import organ_label
    from mobseg.report.tables import RENDERERS, all_tables

    out = Path(params.out) if params.out is not None else ws.report_dir
    out = out if out.is_absolute() else Path.cwd() / out
    results = collect(ws)
    if params.case is not None:
        _check_case(results, params.case)
    if not results.runs:
        log.warning("No evaluated run in the manifest; the report shows the paper's values only.")
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)

    tables = {}
    table_files: list[str] = []
    for t in all_tables(results):
        files = {}
        for ext, render in RENDERERS.items():
            rel = f"tables/{t.name}.{ext}"
            atomic_write_text(out / rel, render(t))
            files[ext] = rel
            table_files.append(rel)
        tables[t.name] = doc.TableBlock(t, files)

    notes: list[str] = []

    def figure(name: str, draw: Any, *args: Any) -> Any:
        try:
            return draw(*args)
        except (MobsegError, OSError, RuntimeError, ValueError) as exc:
            log.warning("Figure %s not drawn: %s", name, exc)
            notes.append(f"The figure {name} could not be drawn ({exc}).")
            return None

    fig_dir = out / "figures"
    reliability = figure(
        "reliability", figs.reliability_figure, results, fig_dir / "reliability.png"
    )
    bases = figure(
        "dice_vs_bases", figs.dice_vs_bases_figure, results, fig_dir / "dice_vs_bases.png"
    )
    risk = figure(
        "risk_coverage", figs.risk_coverage_figure, results, fig_dir / "risk_coverage.png"
    )
    case_scores = figure(
        "case_score_dice", figs.case_score_figure, results, fig_dir / "case_score_dice.png"
    )
    truth_fig = figure(
        "variance_truth", figs.variance_truth_figure, results, fig_dir / "variance_truth.png"
    )
    cases = []
    for organ in results.result_organs():
        got = figure(
            f"case_{organ}",
            figs.case_figure,
            results,
            organ,
            params.case,
            fig_dir / f"case_{organ}.png",
        )
        if got is not None:
            cases.append((organ, got[0], got[1]))
    samples = []
    for organ, _, case in cases:
        drawn = figure(
            f"samples_{organ}",
            _samples_figure,
            ws,
            results,
            organ,
            case,
            fig_dir / f"samples_{organ}.png",
        )
        if drawn is not None:
            samples.append((organ, drawn[0], case, drawn[1]))

    def fig_block(path: Path | None, caption: str) -> list[doc.Block]:
        if path is None:
            return []
        return [doc.Figure(path, caption, str(path.relative_to(out)))]

    blocks: list[doc.Block] = [*doc.introduction(results, _version())]
    blocks += [doc.Heading("Data"), *doc.data_section(results), tables["table1_splits"]]
    blocks += [doc.Heading("Segmentation accuracy"), *doc.accuracy_section(results)]
    blocks.append(tables["table2_dice"])
    blocks += [doc.Heading("Calibration"), *doc.calibration_section(results)]
    blocks += [tables["table3_nll"], tables["table4_calibration"]]
    blocks += fig_block(
        reliability,
        "Figure 1: Reliability diagrams. Each point is one of 15 equal-width bins of the "
        "predicted organ probability (x: mean prediction in the bin, y: observed share of "
        "organ voxels), voxels of every test case and seed pooled; the dashed diagonal is "
        "perfect calibration. Lower panels: share of voxels per bin (log scale).",
    )
    blocks += [doc.Heading("Quality of the uncertainty"), *doc.uncertainty_section(results)]
    blocks.append(tables["table5_uncertainty"])
    blocks += fig_block(
        risk,
        "Figure 2: Risk-coverage curves. Test cases are kept in order of decreasing confidence "
        "(minus the mean Var[p], top, or entropy, bottom, over the predicted organ); the curve "
        "is the mean 1 - Dice of the kept cases, averaged over seeds. A flat, low curve means "
        "the uncertainty flags the bad cases.",
    )
    blocks += [doc.Heading("From voxel to subject"), tables["table5c_failure"]]
    blocks += fig_block(
        case_scores,
        "Figure 2b: Case score against Dice. Each point is one test case of one seed; x: the "
        "mean predictive entropy over the predicted organ (top) or over its boundary band "
        "(bottom); y: Dice. The legend gives the AUROC of flagging the cases below the 10th "
        "percentile of Dice (mean over seeds).",
    )
    blocks += [doc.Heading("Conformal risk control"), tables["table5d_conformal"]]
    blocks += [doc.Heading("Against the truth"), *doc.truth_section(results)]
    blocks.append(tables["table5b_truth"])
    blocks += fig_block(
        truth_fig,
        "Figure 3: Learned variance against the truth. Voxels of the ambiguity band "
        "(0.01 < p* < 0.99) in 10 bins of the annotators' variance p*(1 - p*); per bin the "
        "mean of the model's Var[p] against the mean p*(1 - p*), test cases and seeds pooled. "
        "The dashed identity is a model whose spread matches the annotators'; a curve near "
        "zero is a model that is confident where the annotators disagree.",
    )
    if bases is not None:
        blocks += [doc.Heading("Number of bases")]
        blocks += fig_block(
            bases,
            f"Figure {4 if truth_fig is not None else 3}: Dice of the mixture-of-bases model "
            "against the number of bases M "
            "(mean \u00b1 1 std over seeds; n = seeds per point); dotted lines: the other "
            "methods' mean Dice.",
        )
    first_case = 2 + (truth_fig is not None) + (bases is not None)
    if cases:
        blocks.append(doc.Heading("Example cases"))
        for i, (organ, path, case) in enumerate(cases):
            chosen = "chosen with --case" if params.case else "its median-Dice case"
            blocks += fig_block(
                path,
                f"Figure {first_case + 1 + i}: {organ_label(organ)}, case {case} ({chosen}). "
                "One row per "
                "method (lowest seed): CT (window -160..240 HU) with ground truth (green) and "
                "prediction (red, dashed); the organ probability; the predictive variance; the "
                "predictive entropy; the mutual information between the label and the model's "
                "sample (its epistemic part). Colour bars are shared by all rows.",
            )
        n_fig = first_case + len(cases)
        for i, (organ, path, case, tag) in enumerate(samples):
            blocks += fig_block(
                path,
                f"Figure {n_fig + 1 + i}: {organ_label(organ)}, case {case}: the annotators' "
                f"masks (top row) beside joint samples of {tag} that predict saved "
                "(`--save-samples`, bottom row), on one slice. Samples that vary where and "
                "as much as the annotators do are what the covariance model is for.",
            )
    blocks += [doc.Heading("Cost of prediction"), tables["table7_cost"]]
    blocks += [doc.Heading("Runs"), tables["table6_runs"]]
    if notes:
        blocks += [doc.Heading("Notes"), doc.Paragraph(" ".join(notes))]

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, doc.render_markdown(TITLE, blocks))
    atomic_write_text(html_path, doc.render_html(TITLE, blocks))
    figures = [p for p in (reliability, bases, risk, case_scores, truth_fig) if p is not None]
    figures += [c[1] for c in cases] + [s[1] for s in samples]
    return {
        "report_md": str(md_path),
        "report_html": str(html_path),
        "tables": table_files,
        "figures": [str(p.relative_to(out)) for p in figures],
        "runs": len(results.runs),
        "out_dir": str(out),
    }


def run(ws: Workspace, params: ReportParams, force: bool = True) -> StageRecord:
    """Write tables, figures, report.md and report.html; record them as ``report``.

    Raises:
        InvalidInputError: ``--case`` names no test case of an evaluated organ.
    """
    manifest = Manifest(ws.manifest_path)
    if not manifest.writable():  # an archived (read-only) study: report elsewhere, unrecorded
        outputs = build(ws, params)
        log.info("The workdir %s is read-only; the report is not recorded there.", ws.root)
        return StageRecord(
            stage="report", key=REPORT_KEY, params=params.to_dict(), outputs=outputs, status="done"
        )
    with manifest.running("report", REPORT_KEY, params.to_dict()) as outputs:
        outputs.update(build(ws, params))
    rec = manifest.get(REPORT_KEY)
    if rec is None:  # pragma: no cover - written just above
        raise RuntimeError("the report record vanished")
    return rec
