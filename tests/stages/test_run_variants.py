"""Runs that differ in one option that changes the model coexist through evaluate and report.

The tags come from the finetune stage's own naming (:func:`mobseg.stages.finetune.run_tag`);
the predictions are the report fakes' (no training).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import report_fakes as fakes

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.manifest import Manifest
from mobseg.stages import evaluate, finetune
from mobseg.stages.report import ReportParams, run

MOB = HeadConfig("mob")


def _tag(head: HeadConfig = MOB, annotators: str = "0", **loss) -> str:
    params = finetune.FinetuneParams(
        "pancreas", head=head, loss=LossConfig(**loss), annotators=annotators
    )
    return finetune.run_tag(params, "paper")


#: name -> (tag, head): the paper's mob and one run per option it differs in.
VARIANTS = {
    "paper": (_tag(), MOB),
    "mc_loss": (_tag(mc_loss="logsumexp"), MOB),
    "samples": (_tag(samples=8), MOB),
    "antithetic": (_tag(samples=6, antithetic=True), MOB),
    "noise": (_tag(HeadConfig("mob", noise="block")), HeadConfig("mob", noise="block")),
    "partitions": (_tag(HeadConfig("mob", partitions=2)), HeadConfig("mob", partitions=2)),
    "annotators": (_tag(annotators="all"), MOB),
    "sb-partitions": (
        _tag(HeadConfig("single-basis", noise="block", partitions=2)),
        HeadConfig("single-basis", noise="block", partitions=2),
    ),
    "sb-block": (
        _tag(HeadConfig("single-basis", noise="block")),
        HeadConfig("single-basis", noise="block"),
    ),
}


def test_the_variants_have_distinct_tags() -> None:
    tags = [t for t, _ in VARIANTS.values()]
    assert len(set(tags)) == len(tags)
    assert VARIANTS["paper"][0] == "mob-b3-r16"
    assert VARIANTS["mc_loss"][0] == "mob-b3-r16-lse"


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory):
    runs = {tag: (head, 1.0 + 0.1 * i, 0.5) for i, (tag, head) in enumerate(VARIANTS.values())}
    ws = fakes.build_study(tmp_path_factory.mktemp("variants") / "work", seeds=(0,), runs=runs)
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas"))
    return ws, run(ws, ReportParams()).outputs


def test_every_variant_is_evaluated_and_reported(reported) -> None:
    ws, out = reported
    manifest = Manifest(ws.manifest_path)
    md = Path(out["report_md"]).read_text()
    for name, (tag, _) in VARIANTS.items():
        rec = manifest.get(f"evaluate/pancreas/{tag}/seed0")
        assert rec is not None and rec.done, name
        row = re.compile(rf"\| Pancreas \| [^|]+ \| {re.escape(tag)} \| 0 \| 3 \|")
        assert row.search(md), name
    # the variants are rows of their own in the method tables, the paper's mob is the paper row
    import csv

    path = next(iter((ws.report_dir / "tables").glob("table*_dice.csv")))
    rows = {r["tag"]: r for r in csv.DictReader(path.open())}
    for name, (tag, _) in VARIANTS.items():
        assert rows[tag]["n"] == "1", name
        assert (rows[tag]["paper_mean"] != "") == (name == "paper"), name
    assert rows["mob-b3-r16"]["row"] == "Mixture-of-Bases"


def test_evaluate_selects_one_run_by_its_tag(reported) -> None:
    ws, _ = reported
    tag = VARIANTS["mc_loss"][0]
    recs = evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", run=tag))
    assert [r.key for r in recs] == [f"evaluate/pancreas/{tag}/seed0"]
    by_head = evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas", head=MOB))
    assert [r.key for r in by_head] == ["evaluate/pancreas/mob-b3-r16/seed0"]


def test_a_variant_alone_is_not_the_papers_row() -> None:
    from mobseg.report.collect import row_keys

    lse = VARIANTS["mc_loss"][0]
    rows = row_keys({(lse, "mob", 3)}, {lse})
    paper = [r for r in rows if r.paper_row == "Mixture-of-Bases"]
    assert [r.tag for r in paper] == ["mob-b3-r16"]  # empty paper row, the variant its own row
    assert any(r.tag == lse and r.paper_row is None for r in rows)
    alone = row_keys({("mob-b5-r16", "mob", 5)})  # an ablation alone still stands in
    assert [r.tag for r in alone if r.paper_row == "Mixture-of-Bases"] == ["mob-b5-r16"]


# -- the truth grid's configurations in Table 5b ------------------------------------------
def _truth_runs() -> dict[str, tuple[finetune.FinetuneParams, float, float]]:
    """Tag -> (the fine-tuning's params, quality, shift) of a slice of the truth grid at lr 3e-3,
    with its deterministic controls trained alike."""
    out = {}
    configs = [
        ("deterministic", "mean", "voxel", "0"),
        ("deterministic", "mean", "voxel", "all"),
        ("mob", "mean", "voxel", "0"),
        ("mob", "logsumexp", "voxel", "all"),
        ("mob", "logsumexp", "block", "all"),
        ("diagonal", "logsumexp", "voxel", "0"),
    ]
    for i, (method, mc_loss, noise, annotators) in enumerate(configs):
        params = finetune.FinetuneParams(
            "pancreas",
            head=HeadConfig(method, noise=noise),
            loss=LossConfig(mc_loss=mc_loss if method != "deterministic" else "mean"),
            lr=3e-3,
            annotators=annotators,
        )
        out[finetune.run_tag(params, "paper")] = (params, 1.0 + 0.1 * i, 0.5 - 0.1 * i)
    return out


def test_every_truth_grid_configuration_is_a_row_of_table_5b(tmp_path: Path) -> None:
    import csv

    runs = _truth_runs()
    assert len(runs) == 6
    ws = fakes.build_study(
        tmp_path / "work", seeds=(0,), runs={t: (p.head, q, s) for t, (p, q, s) in runs.items()}
    )
    man = Manifest(ws.manifest_path)
    for tag, (params, _, _) in runs.items():  # the records the finetune stage writes
        with man.running("finetune", f"finetune/pancreas/{tag}/seed0", params.to_dict()):
            pass
    evaluate.run(ws, evaluate.EvaluateParams(organ="pancreas"))
    out = run(ws, ReportParams()).outputs
    with open(ws.report_dir / "tables" / "table5b_truth.csv", newline="") as fh:
        recs = [r for r in csv.DictReader(fh) if r["metric"] == "pstar_nll_band"]
    by_tag = {r["tag"]: r for r in recs}
    assert set(by_tag) == set(runs)  # every configuration, once
    assert len({r["row"] for r in recs}) == len(recs)  # each with its own label
    for tag, (params, _, _) in runs.items():
        r = by_tag[tag]
        assert tag in r["row"] or tag == "deterministic", r["row"]
        assert r["annotators"] == params.annotators and r["lr"] == "0.003"
        stochastic = params.head.method != "deterministic"
        assert r["objective"] == (params.loss.mc_loss if stochastic else "-")
        assert r["noise"] == (params.head.noise if params.head.method == "mob" else "-")
        assert r["n"] == "1" and float(r["mean"]) > 0  # finite band NLL
    # grouped by method: the controls first, then diagonal, then mob
    order = [r["tag"] for r in recs]
    methods = [runs[t][0].head.method for t in order]
    assert methods == sorted(methods, key=["deterministic", "diagonal", "mob"].index)
    md = Path(out["report_md"]).read_text()
    assert "| Objective | Noise | Annotators | lr |" in md
    block_lse = next(t for t in runs if "-block-lse-annall" in t)
    assert re.search(rf"\| [^|]*{re.escape(block_lse)}[^|]*\| logsumexp \| block \| all \|", md)
