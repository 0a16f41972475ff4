"""The study grid: expansion, counts, dependencies, parsing and the saved spec."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from mobseg.core.config import METHOD_NAMES, HeadConfig, LossConfig, RunConfig
from mobseg.errors import ConfigurationError, UnknownNameError
from mobseg.manifest import StageRecord
from mobseg.stages.evaluate import EvaluateParams
from mobseg.stages.finetune import FinetuneParams
from mobseg.stages.predict import PredictParams
from mobseg.stages.pretrain import PretrainParams
from mobseg.study import grid
from mobseg.study.grid import ExtraPrediction, Plan, StudySpec, expand

PAPER_ORGANS = ("pancreas", "gallbladder", "duodenum", "adrenal_gland_left")


def _tags() -> list[str]:
    return ["deterministic", "diagonal", "lowrank-r16", "single-basis-r16", "mob-b3-r16"]


def test_paper_grid_counts_by_stage() -> None:
    plan = expand(StudySpec())
    counts = Counter(j.stage for j in plan)
    main = 4 * 5 * 5  # organs x methods x seeds
    ablation = (5 - 1) * 5  # M in 1..5 on pancreas, M = 3 shared with the main grid
    assert counts["finetune"] == main + ablation == 120
    assert counts["predict"] == main + ablation + 4  # + the backbone of each organ
    assert counts["evaluate"] == counts["predict"]
    assert counts["prepare"] == counts["pretrain"] == 4
    assert counts["report"] == 1
    assert len(plan) == 4 + 4 + 120 + 124 + 124 + 1


def test_paper_grid_finetune_keys_are_the_brute_force_set() -> None:
    expected = {
        f"finetune/{o}/{t}/seed{s}"
        for o, t, s in itertools.product(PAPER_ORGANS, _tags(), range(5))
    }
    expected |= {f"finetune/pancreas/mob-b{m}-r16/seed{s}" for m in (1, 2, 4, 5) for s in range(5)}
    got = {j.key for j in expand(StudySpec()).by_stage("finetune")}
    assert got == expected


def test_ablation_without_mob_in_the_grid_counts_every_m() -> None:
    spec = StudySpec(methods=("diagonal",), seeds=2, ablation_bases=(1, 3))
    plan = expand(spec)
    fine = [j.key for j in plan.by_stage("finetune")]
    assert len(fine) == 4 * 1 * 2 + 2 * 2
    assert "finetune/pancreas/mob-b3-r16/seed1" in fine


def test_ablation_organ_outside_the_grid_is_prepared_and_pretrained() -> None:
    spec = StudySpec(organs=("gallbladder",), methods=("mob",), seeds=1, ablation_bases=(2,))
    plan = expand(spec)
    assert [j.key for j in plan.by_stage("prepare")] == ["prepare/gallbladder", "prepare/pancreas"]
    assert "pretrain/pancreas" in plan
    assert plan["finetune/pancreas/mob-b2-r16/seed0"].deps == ("pretrain/pancreas",)
    # The ablation organ gets no backbone row of its own: it is not a grid organ.
    assert "predict/pancreas/backbone/seed0" not in plan


def test_dependencies_come_first_and_chain_the_stages() -> None:
    plan = expand(StudySpec(seeds=2))
    seen: set[str] = set()
    for job in plan:
        assert set(job.deps) <= seen, job.key
        seen.add(job.key)
    assert plan["pretrain/duodenum"].deps == ("prepare/duodenum",)
    assert plan["finetune/duodenum/diagonal/seed1"].deps == ("pretrain/duodenum",)
    assert plan["predict/duodenum/diagonal/seed1"].deps == ("finetune/duodenum/diagonal/seed1",)
    assert plan["evaluate/duodenum/diagonal/seed1"].deps == ("predict/duodenum/diagonal/seed1",)
    assert plan["predict/duodenum/backbone/seed0"].deps == ("pretrain/duodenum",)
    assert plan["predict/duodenum/backbone/seed0"].params.backbone
    assert plan["evaluate/duodenum/backbone/seed0"].runner.endswith(":evaluate_backbone")
    assert plan["evaluate/duodenum/diagonal/seed1"].runner == ""
    report = plan["report"]
    assert set(report.deps) == {j.key for j in plan.by_stage("evaluate")}
    assert report.after_any and report.refresh


def test_params_carry_the_spec() -> None:
    spec = StudySpec(
        organs=("pancreas",),
        methods=("mob",),
        seeds=1,
        ablation_bases=(),
        preset="cpu",
        device="cpu",
        num_gpus=4,
        epochs=3,
        iterations=7,
        train_samples=4,
        samples=9,
        rank=8,
        bases=2,
        partitions=2,
        source="phantom",
        num_cases=12,
        size=32,
    )
    plan = expand(spec)
    pre = plan["prepare/pancreas"].params
    assert (pre.source, pre.num_cases, pre.size) == ("phantom", 12, 32)
    pt = plan["pretrain/pancreas"].params
    assert isinstance(pt, PretrainParams)
    assert (pt.preset, pt.num_gpus, pt.device) == ("cpu", 4, "cpu")
    assert plan["pretrain/pancreas"].gpus == 4
    head = HeadConfig("mob", rank=8, bases=2, partitions=2)
    # k = 4 and the 3 x 7 schedule (the cpu preset's is 4 x 25) are part of the run's identity
    tag = RunConfig(head, LossConfig(samples=4), epochs=3, iterations=7).tag()
    assert tag.startswith("mob-b2-r8-p2-k4-x") and len(tag) == len("mob-b2-r8-p2-k4-x") + 8
    ft = plan[f"finetune/pancreas/{tag}/seed0"].params
    assert isinstance(ft, FinetuneParams)
    assert (ft.epochs, ft.iterations, ft.loss.samples, ft.preset) == (3, 7, 4, "cpu")
    pr = plan[f"predict/pancreas/{tag}/seed0"].params
    assert isinstance(pr, PredictParams)
    assert (pr.samples, pr.head, pr.tag) == (9, head, tag)
    ev = plan[f"evaluate/pancreas/{tag}/seed0"].params
    assert isinstance(ev, EvaluateParams)
    assert (ev.organ, ev.seed, ev.head, ev.tag) == ("pancreas", 0, head, tag)


def test_prepare_keeps_its_defaults_unless_the_spec_sets_them() -> None:
    from mobseg.stages.prepare import PrepareParams

    pre = expand(StudySpec(organs=("pancreas",), ablation_bases=()))["prepare/pancreas"].params
    assert (pre.num_cases, pre.size) == (PrepareParams("x").num_cases, PrepareParams("x").size)


def test_no_backbone_and_no_report() -> None:
    plan = expand(StudySpec(seeds=1, ablation_bases=(), backbone=False, report=False))
    assert not any("backbone" in k for k in plan.jobs)
    assert "report" not in plan
    assert len(plan.by_stage("evaluate")) == 4 * 5


def test_extra_prediction_depends_on_its_run(tmp_path: Path) -> None:
    extra = ExtraPrediction(input=tmp_path / "ct.nii.gz", out=tmp_path / "ex" / "s0000")
    spec = StudySpec(organs=("pancreas",), seeds=1, ablation_bases=(), extra_predictions=(extra,))
    plan = expand(spec)
    key = "predict/pancreas/mob-b3-r16/seed0/s0000"
    assert plan[key].deps == ("finetune/pancreas/mob-b3-r16/seed0",)
    job = plan[key]
    assert job.runner == "mobseg.study.adapters:predict_outside" and job.params.key == key
    assert job.params.params.input == extra.input and job.params.params.out == extra.out
    assert job.params.params.head.tag() == "mob-b3-r16" and not job.params.params.backbone
    assert plan[key].tag is None  # not a run of the grid
    assert key not in plan["report"].deps


def test_extra_prediction_of_a_run_outside_the_grid_is_refused(tmp_path: Path) -> None:
    extra = ExtraPrediction(input=tmp_path, out=tmp_path, method="mob", seed=3)
    spec = StudySpec(organs=("pancreas",), seeds=1, ablation_bases=(), extra_predictions=(extra,))
    with pytest.raises(ConfigurationError, match="seed 3"):
        expand(spec)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1..5", (1, 2, 3, 4, 5)),
        ("1,2,4", (1, 2, 4)),
        ("2..3,5", (2, 3, 5)),
        ("3", (3,)),
        ("1-3", (1, 2, 3)),
        ("1..3,2", (1, 2, 3)),
        ("none", ()),
        ("", ()),
    ],
)
def test_parse_bases(text: str, values: tuple[int, ...]) -> None:
    assert grid.parse_bases(text) == values


@pytest.mark.parametrize("text", ["5..1", "a", "1..", "1;2"])
def test_parse_bases_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError, match="bases-ablation"):
        grid.parse_bases(text)


def test_names_are_split_and_resolved() -> None:
    assert grid.resolve_organs(["pancreas,duodenum", "gallbladder"]) == (
        "pancreas",
        "duodenum",
        "gallbladder",
    )
    assert grid.resolve_organs(None) == PAPER_ORGANS
    assert grid.resolve_methods(["mob", "diagonal,mob"]) == ("mob", "diagonal")
    assert grid.resolve_methods([]) == METHOD_NAMES
    with pytest.raises(UnknownNameError, match="pancreas"):
        grid.resolve_organs(["pancreaas"])
    with pytest.raises(UnknownNameError, match="mob"):
        grid.resolve_methods(["mobb"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seeds": 0}, "--seeds"),
        ({"organs": ()}, "organ"),
        ({"ablation_bases": (0, 1)}, "bases-ablation"),
        ({"num_gpus": 0}, "num-gpus"),
        ({"lr": 0.0}, "--lr"),
        ({"objectives": ()}, "objective"),
        ({"annotators": ()}, "annotator"),
        ({"antithetic": True}, "even --train-samples"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        StudySpec(**kwargs)


def test_spec_round_trips_through_the_saved_file(tmp_path: Path) -> None:
    extra = ExtraPrediction(input=tmp_path / "ct.nii.gz", out=tmp_path / "out", seed=1)
    spec = StudySpec(
        organs=("duodenum",),
        methods=("mob", "diagonal"),
        seeds=2,
        ablation_bases=(1,),
        extra_predictions=(extra,),
        preset="cpu",
        num_cases=5,
        lr=3e-3,
        objectives=("mean", "logsumexp"),
        noises=("block",),
        annotators=("all", "0"),
        variants=(grid.RunVariant("lowrank", mc_loss="logsumexp", annotators="all", lr=1e-2),),
    )
    assert grid.load_spec(tmp_path) is None
    path = grid.save_spec(tmp_path, spec)
    assert path == tmp_path / "study" / "spec.json"
    assert grid.load_spec(tmp_path) == spec
    path.write_text("{not json", encoding="utf-8")
    assert grid.load_spec(tmp_path) is None


def _rec(key: str, status: str, plan: Plan | None = None) -> StageRecord:
    """A record of ``key``; with ``plan``, a prediction's params are the job's (as predict
    records them)."""
    params = {}
    if plan is not None and key.startswith("predict/"):
        params = plan[key].params.to_dict()
    return StageRecord(stage=key.split("/")[0], key=key, status=status, params=params)


def test_stage_counts_and_run_cells_follow_the_manifest() -> None:
    spec = StudySpec(organs=("pancreas",), methods=("diagonal", "mob"), seeds=3, ablation_bases=())
    plan = expand(spec)
    recs = {
        k: _rec(k, s, plan)
        for k, s in [
            ("prepare/pancreas", "done"),
            ("pretrain/pancreas", "done"),
            ("finetune/pancreas/diagonal/seed0", "done"),
            ("predict/pancreas/diagonal/seed0", "done"),
            ("evaluate/pancreas/diagonal/seed0", "done"),
            ("finetune/pancreas/diagonal/seed1", "done"),
            ("predict/pancreas/diagonal/seed1", "failed"),
            ("finetune/pancreas/diagonal/seed2", "done"),  # predict not yet: pending
            ("finetune/pancreas/mob-b3-r16/seed0", "running"),
            ("predict/pancreas/backbone/seed0", "done"),
            ("evaluate/pancreas/backbone/seed0", "done"),
        ]
    }
    rows = {r["stage"]: r for r in plan.stage_counts(recs)}
    assert rows["finetune"] == {
        "stage": "finetune",
        "total": 6,
        "done": 3,
        "running": 1,
        "failed": 0,
        "remaining": 3,
    }
    assert rows["predict"]["total"] == 7 and rows["predict"]["done"] == 2
    assert rows["predict"]["failed"] == 1 and rows["predict"]["remaining"] == 5
    assert rows["report"]["remaining"] == 1
    cells = plan.run_cells(recs)
    assert cells[("pancreas", "diagonal")] == Counter(done=1, failed=1, pending=1)
    assert cells[("pancreas", "mob-b3-r16")] == Counter(running=1, pending=2)
    assert cells[("pancreas", "backbone")] == Counter(done=1)


def test_current_and_outdated_follow_run_ids_dependencies_and_options() -> None:
    spec = StudySpec(organs=("pancreas",), methods=("mob",), seeds=1, ablation_bases=())
    plan = expand(spec)
    recs = {}
    for job in plan:  # a finished study, each record built on its dependencies' runs
        rec = _rec(job.key, "done", plan)
        rec.run_id = f"run-{job.key}"
        if job.stage != "report":
            rec.inputs = {"upstream": {d: f"run-{d}" for d in job.deps}}
        recs[job.key] = rec
    assert plan.current(recs) == set(plan.jobs)
    assert set(plan.status(recs).values()) == {"done"}

    recs["pretrain/pancreas"].run_id = "run-again"  # pretrain --force
    status = plan.status(recs)
    built_on_pretrain = {
        "finetune/pancreas/mob-b3-r16/seed0",
        "predict/pancreas/mob-b3-r16/seed0",
        "evaluate/pancreas/mob-b3-r16/seed0",
        "predict/pancreas/backbone/seed0",
        "evaluate/pancreas/backbone/seed0",
    }
    assert {k for k, v in status.items() if v == "outdated"} == built_on_pretrain
    assert status["report"] == "done"  # refreshed by the runner when its inputs run

    recs["pretrain/pancreas"].run_id = "run-pretrain/pancreas"
    recs["predict/pancreas/mob-b3-r16/seed0"].params["samples"] = 7  # another --samples
    status = plan.status(recs)
    assert {k for k, v in status.items() if v == "outdated"} == {
        "predict/pancreas/mob-b3-r16/seed0",
        "evaluate/pancreas/mob-b3-r16/seed0",
    }


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "pending"),
        (["done", "done", "done"], "done"),
        (["done", "done", "pending"], "pending"),
        (["done", "failed", "pending"], "failed"),
        (["done", "running", "pending"], "running"),
        (["done", "done", "failed"], "failed"),
    ],
)
def test_run_status(statuses: list[str], expected: str) -> None:
    assert grid.run_status(statuses) == expected


def test_plan_from_records_places_standard_keys_in_the_grid() -> None:
    recs = {
        k: _rec(k, "done")
        for k in (
            "prepare/pancreas",
            "finetune/pancreas/mob-b3-r16/seed1",
            "predict/pancreas/mob-b3-r16/seed1",
            "predict/pancreas/mob-b3-r16/seed1/s0000",
            "report",
        )
    }
    plan = grid.plan_from_records(recs)
    assert [j.stage for j in plan] == ["prepare", "finetune", "predict", "predict", "report"]
    assert plan.run_cells(recs) == {("pancreas", "mob-b3-r16"): Counter(done=1)}


def test_plan_rejects_unknown_dependencies_and_dedups() -> None:
    plan = grid.Plan()
    first = plan.add(grid.Job("prepare", "prepare/x", None))
    assert plan.add(grid.Job("prepare", "prepare/x", "other")) is first
    with pytest.raises(ValueError, match="unplanned"):
        plan.add(grid.Job("pretrain", "pretrain/x", None, deps=("prepare/y",)))


def test_every_job_of_the_paper_grid_pickles(tmp_path: Path) -> None:
    """Executors ship jobs to other processes and nodes by pickling them."""
    import pickle

    extra = ExtraPrediction(input=tmp_path / "ct.nii.gz", out=tmp_path / "out")
    plan = expand(StudySpec(extra_predictions=(extra,)))
    back = pickle.loads(pickle.dumps(list(plan)))
    assert back == list(plan)


# -- the truth grid ----------------------------------------------------------------------------
def _tag_by_hand(
    method: str, mc_loss: str, noise: str, annotators: str, lr: float, epochs: int | None = None
) -> str:
    """The run tag of this configuration (its RunConfig; epochs None = the preset's)."""
    head = HeadConfig(method, noise=noise)
    loss = LossConfig(mc_loss=mc_loss if method != "deterministic" else "mean")
    return RunConfig(head=head, loss=loss, lr=lr, epochs=epochs, annotators=annotators).tag()


def _truth_tags(lr: float = 1e-4, epochs: int | None = None) -> set[str]:
    """The 26 configurations of the truth grid, enumerated by hand."""
    tags = set()
    for a in ("0", "all"):
        tags.add(_tag_by_hand("deterministic", "mean", "voxel", a, lr, epochs))
        for o in ("mean", "logsumexp"):
            for m in ("diagonal", "lowrank"):
                tags.add(_tag_by_hand(m, o, "voxel", a, lr, epochs))
            for m in ("single-basis", "mob"):
                for n in ("voxel", "block"):
                    tags.add(_tag_by_hand(m, o, n, a, lr, epochs))
    return tags


def test_truth_grid_counts_and_its_tags_are_the_hand_made_set() -> None:
    spec = grid.grid_spec("truth", preset="cpu")
    assert spec.source == "phantom" and spec.seeds == 3 and spec.ablation_bases == ()
    plan = expand(spec)
    counts = Counter(j.stage for j in plan)
    tags = _truth_tags()
    assert len(tags) == 2 + 4 + 4 + 8 + 8 == 26
    assert counts["finetune"] == 26 * 3
    assert counts["predict"] == counts["evaluate"] == 26 * 3 + 1  # + the backbone
    assert len(plan) == 1 + 1 + 78 + 79 + 79 + 1 == 239
    got = {j.key for j in plan.by_stage("finetune")}
    assert got == {f"finetune/pancreas/{t}/seed{s}" for t in tags for s in range(3)}
    assert "mob-b3-r16-block-lse-annall" in tags and "deterministic-annall" in tags


def test_truth_grid_jobs_carry_their_configuration_and_tag() -> None:
    from mobseg.stages.finetune import run_tag

    plan = expand(grid.grid_spec("truth", preset="cpu", lr=3e-3, epochs=6, seeds=1))
    fine = plan.by_stage("finetune")
    assert {j.tag for j in fine} == _truth_tags(3e-3, epochs=6)  # 6 != the cpu preset's 4
    for job in fine:
        p = job.params
        assert run_tag(p, "cpu") == job.tag  # the stage names the run as the study does
        assert p.lr == 3e-3 and p.epochs == 6  # the deterministic control is trained alike
        assert p.annotators == ("all" if "-annall" in job.tag else "0")
        stochastic = p.head.method != "deterministic"
        assert p.loss.mc_loss == ("logsumexp" if "-lse" in job.tag else "mean")
        assert ("-lse" in job.tag) <= stochastic
        assert p.head.noise == ("block" if "-block" in job.tag else "voxel")
        pk, ek = job.key.replace("finetune", "predict"), job.key.replace("finetune", "evaluate")
        assert plan[pk].params.run == job.tag and plan[pk].deps == (job.key,)
        assert plan[ek].params.run == job.tag
    # every tag carries the non-paper lr and schedule, so none is a paper run
    assert all("-x" in j.tag for j in fine)


def test_truth_grid_options_override_and_shrink_it() -> None:
    spec = grid.grid_spec(
        "truth", methods=("deterministic", "mob"), noises=("voxel",), seeds=1, num_cases=12
    )
    plan = expand(spec)
    # deterministic x 2 annotator choices + mob x 2 objectives x 2 annotator choices
    assert len(plan.by_stage("finetune")) == 2 + 4
    assert plan["prepare/pancreas"].params.num_cases == 12
    with pytest.raises(ConfigurationError, match="--source phantom"):
        grid.grid_spec("truth", source="zenodo")
    with pytest.raises(UnknownNameError, match="truth"):
        grid.grid_spec("trut")
    assert grid.grid_spec("paper") == StudySpec()


def test_resolve_choices() -> None:
    assert grid.resolve_choices(["logsumexp,mean", "mean"], "objective") == ("logsumexp", "mean")
    assert grid.resolve_choices(None, "noise mode") is None
    assert grid.resolve_choices(["all"], "annotator choice") == ("all",)
    with pytest.raises(UnknownNameError, match="logsumexp"):
        grid.resolve_choices(["lse"], "objective")
    with pytest.raises(UnknownNameError, match="voxel"):
        grid.resolve_choices(["global"], "noise mode")  # single-basis only: not a grid axis
    with pytest.raises(UnknownNameError, match="noise mode"):
        StudySpec(noises=("voxel", "global"))


def test_variants_add_configurations_once() -> None:
    best = grid.RunVariant("mob", mc_loss="logsumexp", annotators="all", lr=3e-3)
    control = grid.RunVariant("deterministic", annotators="all", lr=3e-3)
    paper = grid.RunVariant("mob")  # already in the grid: not a second run
    spec = StudySpec(
        organs=("pancreas",), seeds=2, ablation_bases=(), variants=(best, control, paper)
    )
    plan = expand(spec)
    tags = {j.tag for j in plan.by_stage("finetune")}
    assert len(plan.by_stage("finetune")) == (5 + 2) * 2
    best_tag = _tag_by_hand("mob", "logsumexp", "voxel", "all", 3e-3)
    control_tag = _tag_by_hand("deterministic", "mean", "voxel", "all", 3e-3)
    assert {best_tag, control_tag} <= tags
    job = plan[f"finetune/pancreas/{best_tag}/seed1"]
    assert job.params.lr == 3e-3 and job.params.loss.mc_loss == "logsumexp"
    assert plan[f"finetune/pancreas/{control_tag}/seed0"].params.lr == 3e-3
    with pytest.raises(UnknownNameError, match="objective"):
        grid.RunVariant("mob", mc_loss="sum")
    with pytest.raises(ConfigurationError, match="learning rate"):
        grid.RunVariant("mob", lr=-1.0)


def test_tta_reaches_every_prediction_of_the_grid() -> None:
    plan = expand(grid.grid_spec("truth", seeds=1, tta=False))
    preds = plan.by_stage("predict")
    assert len(preds) == 27 and all(j.params.tta is False for j in preds)
    assert all(j.params.tta for j in expand(StudySpec(seeds=1)).by_stage("predict"))


def test_baselines_are_opt_in_and_add_their_runs() -> None:
    base = StudySpec(organs=("pancreas",), methods=("mob",), seeds=2, ablation_bases=())
    assert not base.baselines
    plain = expand(base)
    plan = expand(StudySpec(**{**base.__dict__, "baselines": True}))
    added = {j.key for j in plan} - {j.key for j in plain}
    tags = ("deterministic", "deterministic-mcd0.1", "mob-b3-r16-frozen")
    expected = {
        f"{stage}/pancreas/{tag}/seed{s}"
        for stage in ("finetune", "predict", "evaluate")
        for tag in tags
        for s in (0, 1)
    }
    expected |= {
        f"{st}/pancreas/deterministic-ttamix/seed{s}"
        for st in ("predict", "evaluate")
        for s in (0, 1)
    }
    expected |= {f"{st}/pancreas/ensemble-deterministic/seed0" for st in ("predict", "evaluate")}
    assert added == expected
    mix = plan["predict/pancreas/deterministic-ttamix/seed1"]
    assert mix.params.tta_mixture and mix.deps == ("finetune/pancreas/deterministic/seed1",)
    ens = plan["predict/pancreas/ensemble-deterministic/seed0"]
    assert ens.params.seeds == (0, 1) and ens.runner == "mobseg.stages.ensemble:run"
    assert set(ens.deps) == {f"predict/pancreas/deterministic/seed{s}" for s in (0, 1)}
    assert plan["finetune/pancreas/deterministic-mcd0.1/seed0"].params.decoder_dropout == 0.1
    assert plan["finetune/pancreas/mob-b3-r16-frozen/seed0"].params.freeze_backbone
    report = plan["report"]
    assert {k for k in added if k.startswith("evaluate/")} <= set(report.deps)
    # one seed: no ensemble
    one = expand(StudySpec(**{**base.__dict__, "baselines": True, "seeds": 1}))
    assert "predict/pancreas/ensemble-deterministic/seed0" not in one


def test_baselines_without_tta_have_no_tta_mixture() -> None:
    spec = StudySpec(organs=("pancreas",), seeds=1, ablation_bases=(), baselines=True, tta=False)
    plan = expand(spec)
    assert "predict/pancreas/deterministic-mcd0.1/seed0" in plan
    assert not [k for k in plan.jobs if "ttamix" in k]
