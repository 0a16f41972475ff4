"""The variance figure with as many rows as the truth grid has configurations."""

from __future__ import annotations

from pathlib import Path

from mobseg.report.collect import RunResult, StudyResults
from mobseg.report.figures import variance_truth_figure


def _curve(scale: float) -> dict:
    a = [0.01 + 0.024 * i for i in range(10)]
    return {"count": [5] * 10, "annotator_variance": a, "model_variance": [scale * x for x in a]}


def test_a_truth_grid_of_rows_gets_every_curve_and_a_legend_beside_the_axes(tmp_path: Path) -> None:
    from PIL import Image

    res = StudyResults()
    tags = [f"mob-b3-r16-v{i}" for i in range(12)] + ["deterministic", "deterministic-annall"]
    for i, tag in enumerate(tags):
        method = "deterministic" if tag.startswith("deterministic") else "mob"
        run = RunResult("pancreas", tag, 0, method, 3 if method == "mob" else None, {})
        run.truth_curve, run.variant = _curve(0.05 * i), method == "mob"
        res.runs.append(run)
    path = variance_truth_figure(res, tmp_path / "many.png")
    assert path is not None and path.is_file()
    few = StudyResults(runs=res.runs[:3])
    small = variance_truth_figure(few, tmp_path / "few.png")
    assert small is not None
    (w_many, h_many), (w_few, _) = Image.open(path).size, Image.open(small).size
    assert w_many > w_few * 1.3  # the legend of 14 rows stands beside the axes
    assert h_many > 0
