"""The report's figures (matplotlib, Agg backend, PNG at 150 dpi).

- :func:`reliability_figure`: reliability diagram of every method per organ
  (15 bins summed over seeds, the diagonal, voxels per bin below);
- :func:`dice_vs_bases_figure`: Dice against the number of bases M of the
  mixture-of-bases runs, mean +- 1 std over seeds;
- :func:`risk_coverage_figure`: selective risk (1 - Dice) against coverage
  when the least confident cases are set aside, per uncertainty score;
- :func:`variance_truth_figure`: the learned Var[p] against the annotators'
  variance p*(1 - p*) in the phantom's ambiguity band, binned, per method,
  with the identity line as the target;
- :func:`case_figure`: one test case, one row per method: CT slice with
  ground-truth and predicted contours, the foreground probability and the
  predictive variance over the CT, with colour bars fixed across rows.

Every function returns the written path, or None when there is nothing to
draw (a partial study never fails the report).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobseg.fsutil import atomic_path
from mobseg.report.collect import BACKBONE_LABEL, RowKey, RunResult, StudyResults, mean_std
from mobseg.report.paper import organ_label

log = logging.getLogger(__name__)

DPI = 150

#: Colour of each method (tags of one method share it, line styles differ).
METHOD_COLORS = {
    "backbone": "#000000",
    "deterministic": "#7f7f7f",
    "diagonal": "#1f77b4",
    "lowrank": "#ff7f0e",
    "single-basis": "#2ca02c",
    "mob": "#d62728",
    "ensemble": "#8c564b",
}
LINESTYLES = ("-", "--", ":", "-.")

#: CT display window (abdomen): level 40 HU, width 400 HU.
CT_WINDOW = (-160.0, 240.0)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8.5,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "savefig.dpi": DPI,
        }
    )
    return plt


def _styles(rows: list[RowKey]) -> dict[str, dict[str, Any]]:
    """Colour and line style per tag."""
    used: dict[str, int] = {}
    out = {}
    for key in rows:
        colour_key = "backbone" if key.label == BACKBONE_LABEL else key.method
        i = used.get(colour_key, 0)
        used[colour_key] = i + 1
        out[key.tag] = {
            "color": METHOD_COLORS.get(colour_key, "#9467bd"),
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }
    return out


def _suptitle(fig: Any, text: str, width_in: float, y: float | None = None) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch)."""
    import textwrap

    wrapped = textwrap.fill(text, width=max(40, int(width_in * 11)))
    kw = {} if y is None else {"y": y}
    fig.suptitle(wrapped, fontsize=11, **kw)


def _save(fig: Any, path: Path) -> Path:
    """Save ``fig`` atomically (verified, fsynced, umask mode) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(
                tmp, dpi=DPI, bbox_inches="tight", facecolor="white", format=path.suffix[1:]
            )
    finally:
        plt.close(fig)
    return path


def reliability_figure(results: StudyResults, path: Path) -> Path | None:
    """Reliability diagram per organ, all methods; bins summed over seeds."""
    organs = results.result_organs()
    rows = results.rows()
    curves = {
        o: [(k, results.pooled_reliability(o, k.tag)) for k in rows if results.group(o, k.tag)]
        for o in organs
    }
    organs = [o for o in organs if any(acc is not None for _, acc in curves[o])]
    if not organs:
        return None
    plt = _plt()
    styles = _styles(rows)
    width = max(6.5, 5.2 * len(organs))
    fig, axes = plt.subplots(
        2,
        len(organs),
        figsize=(width, 7.4),
        gridspec_kw={"height_ratios": [3, 1.1], "hspace": 0.08},
        squeeze=False,
        sharex="col",
    )
    for j, organ in enumerate(organs):
        ax, hx = axes[0, j], axes[1, j]
        ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="Perfect calibration")
        edges = None
        for key, acc in curves[organ]:
            if acc is None:
                continue
            rel = acc.reliability()
            edges = rel.edges
            ok = rel.count > 0
            st = styles[key.tag]
            ax.plot(
                rel.confidence[ok],
                rel.accuracy[ok],
                marker="o",
                ms=3.5,
                lw=1.5,
                label=f"{key.label} (ECE {acc.ece():.3f})",
                **st,
            )
            centers = (rel.edges[:-1] + rel.edges[1:]) / 2
            frac = rel.count / max(int(rel.count.sum()), 1)
            hx.step(centers, np.where(frac > 0, frac, np.nan), where="mid", lw=1.2, **st)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{organ_label(organ)}: reliability (15 bins)")
        ax.set_ylabel("Observed frequency of the organ")
        ax.legend(loc="best", frameon=True, framealpha=0.9)
        hx.set_yscale("log")
        hx.set_ylabel("Share of voxels")
        hx.set_xlabel("Predicted probability of the organ (bin mean)")
        if edges is not None:
            hx.set_xticks(np.linspace(0, 1, 6))
    _suptitle(
        fig,
        "Reliability diagrams: observed organ frequency against predicted probability "
        "(voxels of all test cases and seeds)",
        width,
        y=0.98,
    )
    return _save(fig, path)


_BASES_RE = re.compile(r"-b\d+")


def dice_vs_bases_figure(results: StudyResults, path: Path) -> Path | None:
    """Dice (%) against M for mixture-of-bases runs; mean +- 1 std over seeds."""
    organs = [o for o in results.result_organs() if any(r.bases for r in _mob_runs(results, o))]
    if not organs:
        return None
    plt = _plt()
    width = max(6.5, 5.2 * len(organs))
    fig, axes = plt.subplots(1, len(organs), figsize=(width, 4.6), squeeze=False)
    for j, organ in enumerate(organs):
        ax = axes[0, j]
        families: dict[str, list[tuple[int, float, float, int]]] = {}
        by_tag: dict[str, list[RunResult]] = {}
        for r in _mob_runs(results, organ):
            by_tag.setdefault(r.tag, []).append(r)
        for tag, runs in by_tag.items():
            m, s, n = mean_std([r.value("dice") * 100 for r in runs])
            if n and runs[0].bases:
                families.setdefault(_BASES_RE.sub("", tag), []).append((runs[0].bases, m, s, n))
        for i, (fam, pts) in enumerate(sorted(families.items())):
            pts.sort()
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker="o",
                capsize=4,
                lw=1.5,
                color=METHOD_COLORS["mob"],
                ls=LINESTYLES[i % len(LINESTYLES)],
                label=f"Mixture-of-Bases ({fam.replace('mob-', '')})",
            )
            for xi, yi, p in zip(x, y, pts, strict=True):
                ax.annotate(f"n={p[3]}", (xi, yi), textcoords="offset points", xytext=(6, -12))
        for key in results.rows():
            if key.paper_row is None or key.method == "mob":
                continue
            m, _, n = mean_std([r.value("dice") * 100 for r in results.group(organ, key.tag)])
            if n:
                colour = "backbone" if key.label == BACKBONE_LABEL else key.method
                ax.axhline(m, color=METHOD_COLORS[colour], ls=":", lw=1.2, label=key.label)
        ms = sorted({p[0] for pts in families.values() for p in pts})
        ax.set_xlim(min(ms) - 0.6, max(ms) + 0.6)
        ax.set_xticks(range(min(ms), max(ms) + 1))
        ax.set_xlabel("Number of bases M")
        ax.set_ylabel("Dice (%)")
        ax.set_title(f"{organ_label(organ)}: Dice against M")
        ax.legend(loc="best", framealpha=0.9)
    _suptitle(
        fig,
        "Mixture-of-Bases: Dice against the number of bases (mean \u00b1 1 std over "
        "seeds; n = seeds per point)",
        width,
    )
    fig.tight_layout()
    return _save(fig, path)


def pooled_truth_curve(runs: list[RunResult]) -> tuple[np.ndarray, np.ndarray] | None:
    """Bins of p*(1 - p*) summed over runs: (mean p*(1 - p*), mean Var[p]) of the non-empty bins.

    Each run's ``truth_curve`` holds per bin the count and the two means; the
    pooled mean is the count-weighted mean. None when no run has a curve.
    """
    count = a_sum = v_sum = None
    for r in runs:
        c = r.truth_curve
        if not c:
            continue
        n = np.asarray(c["count"], dtype=np.float64)
        a = np.array([np.nan if x is None else x for x in c["annotator_variance"]])
        v = np.array([np.nan if x is None else x for x in c["model_variance"]])
        if count is None or a_sum is None or v_sum is None:
            count, a_sum, v_sum = np.zeros_like(n), np.zeros_like(n), np.zeros_like(n)
        if n.shape != count.shape:
            continue
        count += n
        a_sum += np.nan_to_num(a) * n
        v_sum += np.nan_to_num(v) * n
    if count is None or a_sum is None or v_sum is None or not (count > 0).any():
        return None
    keep = count > 0
    return a_sum[keep] / count[keep], v_sum[keep] / count[keep]


def variance_truth_figure(results: StudyResults, path: Path) -> Path | None:
    """Per organ: binned mean Var[p] against p*(1 - p*) in the band, one curve per row."""
    rows = results.rows()
    curves = {
        o: [(k, pooled_truth_curve(results.group(o, k.tag))) for k in rows]
        for o in results.result_organs()
    }
    curves = {o: [(k, c) for k, c in cs if c is not None] for o, cs in curves.items()}
    organs = [o for o, cs in curves.items() if cs]
    if not organs:
        return None
    plt = _plt()
    styles = _styles(rows)
    # a grid of configurations (the truth grid: 27 rows) gets its legend beside the axes
    many = max(len(cs) for cs in curves.values()) > 8
    width = max(6.5, (8.6 if many else 5.2) * len(organs))
    height = max(4.8, 0.2 * max(len(cs) for cs in curves.values())) if many else 4.8
    fig, axes = plt.subplots(1, len(organs), figsize=(width, height), squeeze=False)
    for j, organ in enumerate(organs):
        ax = axes[0, j]
        ax.plot([0, 0.25], [0, 0.25], color="#999999", ls="--", lw=1, label="identity (target)")
        for key, (a, v) in curves[organ]:
            ax.plot(a, v, marker="o", ms=3.5, lw=1.5, label=key.label, **styles[key.tag])
        ax.set_xlim(0, 0.25)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("annotators' variance p*(1 - p*)")
        ax.set_ylabel("model's Var[p] (mean per bin)")
        ax.set_title(f"{organ_label(organ)}: ambiguity band")
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, framealpha=0.9)
        else:
            ax.legend(loc="upper left", framealpha=0.9)
    _suptitle(
        fig,
        "Learned Var[p] against the annotators' per-voxel variance p*(1 - p*) in the "
        "ambiguity band (0.01 < p* < 0.99), 10 bins of p*(1 - p*), voxels of all test cases "
        "and seeds pooled",
        width,
    )
    fig.tight_layout()
    return _save(fig, path)


def _mob_runs(results: StudyResults, organ: str) -> list[RunResult]:
    return [r for r in results.runs if r.organ == organ and r.method == "mob"]


def _curve_for_runs(runs: list[RunResult], score: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Seed-averaged selective risk on a coverage grid (step interpolation)."""
    from mobseg.metrics.uncertainty import risk_coverage_curve

    grid = np.linspace(0.0, 1.0, 201)[1:]
    curves = []
    for r in runs:
        if not r.rows:
            continue
        risk = np.array([1.0 - float(row.get("dice", np.nan)) for row in r.rows])
        conf = -np.array([float(row.get(f"mean_{score}_pred", np.nan)) for row in r.rows])
        if np.all(np.isnan(conf)):
            continue
        cov, sel = risk_coverage_curve(risk, conf)
        if cov.size == 0:
            continue
        idx = np.clip(np.searchsorted(cov, grid - 1e-12, side="left"), 0, cov.size - 1)
        curves.append(sel[idx])
    if not curves:
        return None
    return grid, np.mean(curves, axis=0)


def risk_coverage_figure(results: StudyResults, path: Path) -> Path | None:
    """Risk-coverage curves per organ (columns) and uncertainty score (rows)."""
    organs = results.result_organs()
    rows = results.rows()
    scores = (("var", "Var[p]"), ("entropy", "entropy H"))
    data: dict[tuple[str, str], list[tuple[RowKey, np.ndarray, np.ndarray, float]]] = {}
    for o in organs:
        for score, _ in scores:
            for key in rows:
                group = results.group(o, key.tag)
                curve = _curve_for_runs(group, score)
                if curve is None:
                    continue
                aurc, _, _ = mean_std([r.value(f"aurc_{score}") for r in group])
                data.setdefault((o, score), []).append((key, curve[0], curve[1], aurc))
    organs = [o for o in organs if any((o, s) in data for s, _ in scores)]
    if not organs:
        return None
    plt = _plt()
    styles = _styles(rows)
    width = max(7.0, 5.4 * len(organs))
    fig, axes = plt.subplots(2, len(organs), figsize=(width, 8.4), squeeze=False, sharex=True)
    for j, organ in enumerate(organs):
        for i, (score, name) in enumerate(scores):
            ax = axes[i, j]
            for key, cov, sel, aurc in data.get((organ, score), []):
                ax.step(
                    cov,
                    sel * 100,
                    where="post",
                    lw=1.6,
                    label=f"{key.label} (AURC {aurc * 100:.2f})",
                    **styles[key.tag],
                )
            ax.set_xlim(0, 1)
            top = max((float(np.nanmax(ln.get_ydata())) for ln in ax.lines), default=1.0)
            # headroom for the legend above the curves
            ax.set_ylim(0, max(top, 1e-3) * (1.2 + 0.1 * len(ax.lines)))
            ax.set_title(f"{organ_label(organ)}: confidence = \u2212 mean {name} over prediction")
            ax.set_ylabel("Selective risk, 1 \u2212 Dice (%)")
            if i == 1:
                ax.set_xlabel("Coverage (fraction of test cases kept)")
            if ax.lines:
                ax.legend(loc="upper left", framealpha=0.9)
            else:
                ax.text(0.5, 0.5, "no uncertainty maps", ha="center", transform=ax.transAxes)
    _suptitle(
        fig,
        "Risk-coverage: mean risk of the cases kept when the least confident are set aside "
        "(averaged over seeds; AURC in %, lower is better)",
        width,
    )
    fig.tight_layout()
    return _save(fig, path)


#: Case scores of the failure figure: (metrics column, label).
CASE_SCORE_PANELS: tuple[tuple[str, str], ...] = (
    ("mean_entropy_pred", "mean entropy H over the predicted organ"),
    ("mean_entropy_boundary", "mean entropy H over its boundary band"),
)


def case_score_figure(results: StudyResults, path: Path) -> Path | None:
    """Case score against Dice, per organ (columns) and score (rows); one point per case x seed.

    The figure of the failure-detection analysis (Table 5c): a score that flags
    failed cases puts the low-Dice cases on the right.
    """
    organs = results.result_organs()
    rows = results.rows()
    data: dict[tuple[str, str], list[tuple[RowKey, np.ndarray, np.ndarray, float]]] = {}
    for o in organs:
        for score, _ in CASE_SCORE_PANELS:
            for key in rows:
                group = results.group(o, key.tag)
                xs = [float(row.get(score, np.nan)) for r in group for row in r.rows]
                ys = [float(row.get("dice", np.nan)) for r in group for row in r.rows]
                x, y = np.array(xs), np.array(ys)
                ok = np.isfinite(x) & np.isfinite(y)
                if not ok.any():
                    continue
                label = "fail_auroc_" + score[len("mean_") :]
                auc, _, _ = mean_std([r.value(label) for r in group])
                data.setdefault((o, score), []).append((key, x[ok], y[ok], auc))
    organs = [o for o in organs if any((o, s) in data for s, _ in CASE_SCORE_PANELS)]
    if not organs:
        return None
    plt = _plt()
    styles = _styles(rows)
    width = max(7.0, 5.4 * len(organs))
    fig, axes = plt.subplots(len(CASE_SCORE_PANELS), len(organs), figsize=(width, 8.4))
    axes = np.asarray(axes).reshape(len(CASE_SCORE_PANELS), len(organs))
    markers = ("o", "s", "^", "D", "v", "P", "X")
    for j, organ in enumerate(organs):
        for i, (score, name) in enumerate(CASE_SCORE_PANELS):
            ax = axes[i, j]
            for n, (key, x, y, auc) in enumerate(data.get((organ, score), [])):
                text = "n/a" if not np.isfinite(auc) else f"{auc:.2f}"
                ax.scatter(
                    x,
                    y * 100,
                    s=18,
                    alpha=0.75,
                    marker=markers[n % len(markers)],
                    color=styles[key.tag]["color"],
                    label=f"{key.label} (failure AUROC {text})",
                )
            ax.set_title(f"{organ_label(organ)}: {name}")
            ax.set_xlabel("Case score (nats)")
            ax.set_ylabel("Dice (%)")
            if ax.collections:
                ax.legend(loc="lower left", framealpha=0.9)
    _suptitle(
        fig,
        "Case-level uncertainty against Dice: one point per test case and seed; a score "
        "that flags failures puts the low-Dice cases on the right",
        width,
    )
    fig.tight_layout()
    return _save(fig, path)


# -- case panels -------------------------------------------------------------------
@dataclass
class _Volumes:
    ct: np.ndarray  # (z, y, x) LPS-oriented
    gt: np.ndarray
    spacing: tuple[float, float, float]  # x, y, z mm


def _read_lps(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import SimpleITK as sitk

    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    sp = img.GetSpacing()
    return sitk.GetArrayFromImage(img), (float(sp[0]), float(sp[1]), float(sp[2]))


def _case_rows(results: StudyResults, organ: str) -> list[tuple[RowKey, RunResult]]:
    """One run per table row (lowest seed with a prediction folder), at most 6."""
    out = []
    for key in results.rows():
        runs = [r for r in results.group(organ, key.tag) if r.pred_dir is not None]
        if runs:
            out.append((key, runs[0]))
    return out[:6]


def choose_case(results: StudyResults, organ: str) -> str | None:
    """A typical case: mean Dice over the shown runs closest to the median of those means.

    Cases with an undefined Dice (empty ground truth and prediction) are skipped.
    """
    per_case: dict[str, list[float]] = {}
    for _, run in _case_rows(results, organ):
        for row in run.rows:
            d = float(row.get("dice", np.nan))
            if not math.isnan(d):
                per_case.setdefault(str(row["case"]), []).append(d)
    if not per_case:
        return None
    means = {c: float(np.mean(v)) for c, v in per_case.items()}
    median = float(np.median(list(means.values())))
    return min(sorted(means), key=lambda c: abs(means[c] - median))


def case_figure(
    results: StudyResults, organ: str, case: str | None, path: Path
) -> tuple[Path, str] | None:
    """Case panels of ``organ`` (``case`` or an automatically chosen one).

    Returns:
        (path, case) or None when the organ has no raw data or predictions.
    """
    info = results.organs.get(organ)
    shown = _case_rows(results, organ)
    if info is None or info.raw_dir is None or not shown:
        return None
    case = case or choose_case(results, organ)
    if case is None:
        return None
    ct_path = info.raw_dir / "imagesTs" / f"{case}_0000.nii.gz"
    gt_path = info.raw_dir / "labelsTs" / f"{case}.nii.gz"
    if not (ct_path.is_file() and gt_path.is_file()):
        log.warning("Case %s of %s: no CT or label in %s.", case, organ, info.raw_dir)
        return None
    ct, spacing = _read_lps(ct_path)
    gt, _ = _read_lps(gt_path)
    vols = _Volumes(ct.astype(np.float32), gt.astype(bool), spacing)
    preds = []
    for key, run in shown:
        if run.pred_dir is None:
            continue
        prob_path = run.pred_dir / f"{case}_prob.nii.gz"
        if not prob_path.is_file():
            continue
        prob, _ = _read_lps(prob_path)
        maps = {}
        for name in ("var", "entropy", "mi"):
            map_path = prob_path.with_name(f"{case}_{name}.nii.gz")
            maps[name] = _read_lps(map_path)[0] if map_path.is_file() else None
        dice = next(
            (float(r["dice"]) for r in run.rows if str(r.get("case")) == case), float("nan")
        )
        preds.append((key, run, prob.astype(np.float32), maps, dice))
    if not preds:
        return None
    _draw_case(vols, preds, organ, case, path)
    return path, case


def _crop_box(mask2d: np.ndarray, shape: tuple[int, int], margin: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask2d)
    if ys.size == 0:
        return slice(0, shape[0]), slice(0, shape[1])
    h = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    m = max(margin, int(0.6 * h))
    return (
        slice(max(0, ys.min() - m), min(shape[0], ys.max() + m + 1)),
        slice(max(0, xs.min() - m), min(shape[1], xs.max() + m + 1)),
    )


#: The uncertainty maps of the case panels: file suffix, column title, colour-bar label.
UNCERTAINTY_PANELS: tuple[tuple[str, str, str], ...] = (
    ("var", "Predictive variance Var[p]", "Var[p] (probability\u00b2)"),
    ("entropy", "Predictive entropy H[E p]", "entropy (nats)"),
    ("mi", "Mutual information (epistemic)", "mutual information (nats)"),
)


def _shared_max(preds: list, name: str, z: int, ys: slice, xs: slice, floor: float) -> float:
    """The largest value of map ``name`` on the shown slice over all rows (``floor`` if none)."""
    top = max(
        (float(np.nanmax(p[3][name][z, ys, xs])) for p in preds if p[3].get(name) is not None),
        default=0.0,
    )
    return top if top > 0 else floor


def _draw_case(
    vols: _Volumes,
    preds: list[tuple[RowKey, RunResult, np.ndarray, dict[str, np.ndarray | None], float]],
    organ: str,
    case: str,
    path: Path,
) -> None:
    plt = _plt()
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    area = vols.gt.sum(axis=(1, 2))
    if area.max() == 0:  # organ absent: the slice where the predictions are largest
        area = sum((p[2] > 0.5).sum(axis=(1, 2)) for p in preds)
    z = int(np.argmax(area))
    union = vols.gt[z].copy()
    for p in preds:
        union |= p[2][z] > 0.5
    ys, xs = _crop_box(union, vols.gt.shape[1:], margin=10)
    sx, sy, sz = vols.spacing
    ny, nx = ys.stop - ys.start, xs.stop - xs.start
    extent = (0.0, nx * sx, ny * sy, 0.0)
    ct = vols.ct[z, ys, xs]
    gt = vols.gt[z, ys, xs]
    floors = {"var": 0.25, "entropy": math.log(2.0), "mi": math.log(2.0)}
    norms = {
        name: Normalize(0.0, _shared_max(preds, name, z, ys, xs, floors[name]))
        for name, _, _ in UNCERTAINTY_PANELS
    }
    n = len(preds)
    ncol = 2 + len(UNCERTAINTY_PANELS)
    fig, axes = plt.subplots(
        n, ncol, figsize=(4.0 * ncol, 3.3 * n + 1.6), squeeze=False, layout="constrained"
    )
    norm_p = Normalize(0.0, 1.0)
    ctk = {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1], "extent": extent}
    yy = (np.arange(ny) + 0.5) * sy
    xx = (np.arange(nx) + 0.5) * sx
    im0 = im1 = None
    ims: dict[str, Any] = {}
    for i, (key, _run, prob, maps, dice) in enumerate(preds):
        p = prob[z, ys, xs]
        a0, a1 = axes[i][:2]
        im0 = a0.imshow(ct, **ctk)
        if gt.any():
            a0.contour(xx, yy, gt.astype(float), levels=[0.5], colors="#00e000", linewidths=1.8)
        if (p > 0.5).any():
            a0.contour(xx, yy, p, levels=[0.5], colors="#ff2020", linewidths=1.5, linestyles="--")
        dice_txt = "n/a" if math.isnan(dice) else f"{dice * 100:.1f} %"
        a0.set_ylabel(f"{key.label}\nDice {dice_txt}\n\nA \u2192 P (mm)", fontsize=10)
        a1.imshow(ct, **ctk)
        im1 = a1.imshow(
            np.ma.masked_less(p, 0.01), cmap="viridis", norm=norm_p, alpha=0.85, extent=extent
        )
        for j, (name, title, _) in enumerate(UNCERTAINTY_PANELS):
            ax = axes[i][2 + j]
            ax.imshow(ct, **ctk)
            m = maps.get(name)
            if m is not None:
                ims[name] = ax.imshow(
                    np.ma.masked_less(m[z, ys, xs], norms[name].vmax * 0.01),
                    cmap="magma",
                    norm=norms[name],
                    alpha=0.9,
                    extent=extent,
                )
            else:
                ax.text(0.5, 0.5, f"no {name} map", color="w", ha="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(title)
        for a in axes[i]:
            a.grid(False)
            a.tick_params(labelsize=8)
        if i == 0:
            a0.set_title("CT, ground truth and prediction")
            a1.set_title("Foreground probability p")
    bar = {"location": "bottom", "shrink": 0.85, "aspect": 28, "pad": 0.01}
    cb0 = fig.colorbar(im0, ax=axes[:, 0], **bar)
    cb0.set_label("CT (HU), window -160..240")
    cb1 = fig.colorbar(im1, ax=axes[:, 1], **bar)
    cb1.set_label("p(organ), same scale in every row")
    for j, (name, _, label) in enumerate(UNCERTAINTY_PANELS):
        if name in ims:
            cb = fig.colorbar(ims[name], ax=axes[:, 2 + j], **bar)
            cb.set_label(f"{label}, same scale in every row")
    for a in axes[-1]:
        a.set_xlabel("R \u2192 L (mm)", fontsize=9)
    handles = [
        Line2D([0], [0], color="#00e000", lw=1.8, label="ground truth"),
        Line2D([0], [0], color="#ff2020", lw=1.5, ls="--", label="prediction (p > 0.5)"),
    ]
    axes[0, 0].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85)
    _suptitle(
        fig,
        f"{organ_label(organ)}, case {case}: axial slice {z} of {vols.gt.shape[0]} "
        f"(largest ground-truth area), voxel spacing {sx:.3g} x {sy:.3g} x {sz:.3g} mm",
        4.0 * ncol,
    )
    _save(fig, path)


# -- samples beside the annotators -----------------------------------------------------
def sample_masks(run: RunResult, case: str, limit: int = 8) -> list[Path]:
    """The joint sample masks ``<case>_sample<k>.nii.gz`` that predict saved, k ascending."""
    if run.pred_dir is None:
        return []
    found = []
    for k in range(limit):
        p = run.pred_dir / f"{case}_sample{k}.nii.gz"
        if not p.is_file():
            break
        found.append(p)
    return found


def samples_run(results: StudyResults, organ: str, case: str) -> RunResult | None:
    """The run whose saved samples are shown: mob first, then any other stochastic one."""
    candidates = [
        run
        for key, run in _case_rows(results, organ)
        if run.method != "deterministic" and sample_masks(run, case)
    ]
    candidates.sort(key=lambda r: (r.method != "mob", r.tag))
    return candidates[0] if candidates else None


def samples_figure(
    results: StudyResults,
    organ: str,
    case: str,
    annotators: list[Path],
    path: Path,
    limit: int = 5,
) -> Path | None:
    """The model's saved joint samples beside the annotators' masks of one case.

    Top row: up to ``limit`` annotators' masks; bottom row: up to ``limit``
    saved samples of :func:`samples_run`; all on the same axial slice (the
    largest area of the annotators' union) and crop, over the CT. This is the
    paper's visual argument: a good model's samples vary like the annotators.

    Returns:
        The path, or None when the case has no saved samples or no annotator.
    """
    info = results.organs.get(organ)
    run = samples_run(results, organ, case)
    if info is None or info.raw_dir is None or run is None or not annotators:
        return None
    ct_path = info.raw_dir / "imagesTs" / f"{case}_0000.nii.gz"
    if not ct_path.is_file():
        return None
    ct, spacing = _read_lps(ct_path)
    raters = [_read_lps(p)[0] > 0 for p in annotators[:limit]]
    samples = [_read_lps(p)[0] > 0 for p in sample_masks(run, case)[:limit]]
    union = np.zeros_like(raters[0])
    for m in raters + samples:
        if m.shape != union.shape:
            raise ValueError(f"case {case}: a mask's shape {m.shape} is not the CT's {ct.shape}")
        union |= m
    z = int(np.argmax(union.sum(axis=(1, 2))))
    ys, xs = _crop_box(union[z], union.shape[1:], margin=10)
    sx, sy, _ = spacing
    ny, nx = ys.stop - ys.start, xs.stop - xs.start
    extent = (0.0, nx * sx, ny * sy, 0.0)
    yy, xx = (np.arange(ny) + 0.5) * sy, (np.arange(nx) + 0.5) * sx
    plt = _plt()
    ncol = max(len(raters), len(samples))
    fig, axes = plt.subplots(
        2, ncol, figsize=(2.8 * ncol + 0.6, 6.6), squeeze=False, layout="constrained"
    )
    ctk = {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1], "extent": extent}
    rows = (("annotator", raters, "#00e000"), ("sample", samples, "#ff8c00"))
    for r, (what, masks, colour) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.grid(False)
            ax.tick_params(labelsize=7)
            if c >= len(masks):
                ax.axis("off")
                continue
            ax.imshow(ct[z, ys, xs], **ctk)
            m = masks[c][z, ys, xs]
            ax.imshow(
                np.ma.masked_equal(m.astype(float), 0.0),
                cmap="autumn",
                alpha=0.35,
                extent=extent,
                vmin=0,
                vmax=1,
            )
            if m.any():
                ax.contour(xx, yy, m.astype(float), levels=[0.5], colors=colour, linewidths=1.4)
            ax.set_title(f"{what} {c}", fontsize=10)
    axes[0][0].set_ylabel("annotators' masks", fontsize=10)
    axes[1][0].set_ylabel(f"samples of {run.tag}\n(seed {run.seed})", fontsize=10)
    _suptitle(
        fig,
        f"{organ_label(organ)}, case {case}: annotators (top) and the model's joint samples "
        f"(bottom), axial slice {z} of {union.shape[0]}",
        2.8 * ncol + 0.6,
    )
    return _save(fig, path)
