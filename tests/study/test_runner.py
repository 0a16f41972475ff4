"""The scheduler with fake stages, in this process (SequentialExecutor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import study_fakes as fakes
from filelock import FileLock

from mobseg.manifest import Manifest
from mobseg.study.executors import SequentialExecutor
from mobseg.study.grid import Plan, StudySpec, expand
from mobseg.study.runner import StudyBusyError, run_plan
from mobseg.workspace import Workspace


def micro_plan(seeds: int = 2, methods: tuple[str, ...] = ("diagonal", "mob")) -> Plan:
    """1 organ x ``methods`` x ``seeds`` + backbone + report, running the fake stages."""
    spec = StudySpec(organs=("pancreas",), methods=methods, seeds=seeds, ablation_bases=())
    return fakes.wrap(expand(spec))


def run(ws: Workspace, plan: Plan):  # noqa: ANN201 - StudyResult
    return run_plan(ws, plan, SequentialExecutor(ws.root))


def test_everything_runs_once_in_dependency_order(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan()
    result = run(ws, plan)
    assert result.ok and not result.failed and not result.skipped
    assert len(result.succeeded) == len(plan) == 2 + 2 * 2 * 3 + 2 + 1
    order = fakes.calls(tmp_path)
    assert sorted(order) == sorted(plan.jobs)  # each exactly once
    position = {k: i for i, k in enumerate(order)}
    for job in plan:
        for dep in job.deps:
            assert position[dep] < position[job.key]
    records = Manifest(ws.manifest_path).records()
    assert all(records[k].status == "done" for k in plan.jobs)


def test_a_second_run_redoes_nothing_and_the_report_is_not_refreshed(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1)
    run(ws, plan)
    before = fakes.calls(tmp_path)
    again = run(ws, plan)
    assert again.ok
    assert sorted(again.already_done) == sorted(plan.jobs)
    assert again.succeeded == [] and fakes.calls(tmp_path) == before


def test_a_rerun_upstream_stage_redoes_everything_built_on_it(tmp_path: Path) -> None:
    """`prepare --force` outside the study: the backbone and every run on it are outdated."""
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1, methods=("mob",))
    run(ws, plan)
    n_first = len(fakes.calls(tmp_path))
    prepare = plan.by_stage("prepare")[0]
    fakes.run(ws, prepare.params, force=True)  # a new prepare run (new run id)
    manifest = Manifest(ws.manifest_path)
    pretrain = plan.by_stage("pretrain")[0].key
    assert manifest.outdated(manifest.get(pretrain)) == [prepare.key]
    again = run(ws, plan)
    # the report counts as done before and is refreshed because its inputs ran
    assert again.ok and again.already_done == [prepare.key, "report"]
    redone = fakes.calls(tmp_path)[n_first + 1 :]
    assert sorted(redone) == sorted(k for k in plan.jobs if k != prepare.key)
    records = Manifest(ws.manifest_path).records()
    assert not any(manifest.outdated(records[k], records) for k in plan.jobs)
    # and now all is current: nothing more to do
    assert run(ws, plan).succeeded == []


def test_a_failure_skips_only_its_dependents_and_the_report_still_runs(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan()
    bad = "finetune/pancreas/mob-b3-r16/seed1"
    fakes.control(tmp_path, fail=[bad])
    result = run(ws, plan)
    assert not result.ok
    assert [o.key for o in result.failed] == [bad]
    assert result.failed[0].error == f"InvalidInputError: fake failure of {bad}"
    assert result.failed[0].error_type == "InvalidInputError"
    assert result.skipped == {
        "predict/pancreas/mob-b3-r16/seed1": bad,
        "evaluate/pancreas/mob-b3-r16/seed1": bad,
    }
    records = Manifest(ws.manifest_path).records()
    assert records[bad].status == "failed"
    # Every job that does not depend on the failure ran, including the report.
    ran = set(fakes.calls(tmp_path))
    assert ran == set(plan.jobs) - set(result.skipped)
    assert records["report"].status == "done"

    # Fix the cause and rerun: only the failed job, its dependents and the report run.
    fakes.control(tmp_path)
    n = len(fakes.calls(tmp_path))
    again = run(ws, plan)
    assert again.ok
    assert fakes.calls(tmp_path)[n:] == [bad, *result.skipped, "report"]
    assert Manifest(ws.manifest_path).get(bad).attempts == 2


def test_a_failed_prerequisite_of_everything_skips_the_report_too(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1)
    fakes.control(tmp_path, fail=["pretrain/pancreas"])
    result = run(ws, plan)
    assert [o.key for o in result.failed] == ["pretrain/pancreas"]
    assert set(result.skipped) == set(plan.jobs) - {"prepare/pancreas", "pretrain/pancreas"}
    assert set(result.skipped.values()) == {"pretrain/pancreas"}
    assert fakes.calls(tmp_path) == ["prepare/pancreas", "pretrain/pancreas"]


def test_an_interrupted_study_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan()
    stop = "finetune/pancreas/mob-b3-r16/seed0"
    fakes.control(tmp_path, interrupt=[stop])
    first = run(ws, plan)
    assert first.interrupted and not first.ok
    done_first = [k for k in fakes.calls(tmp_path) if k != stop]
    assert done_first and stop in fakes.calls(tmp_path)
    records = Manifest(ws.manifest_path).records()
    assert records[stop].status == "running"  # the stage resumes, not restarts from nothing
    assert all(records[k].status == "done" for k in done_first)
    assert stop in first.not_started and not first.failed

    fakes.control(tmp_path)
    second = run(ws, plan)
    assert second.ok
    rerun = fakes.calls(tmp_path)[len(done_first) + 1 :]
    assert not set(rerun) & set(done_first)  # nothing finished is redone
    assert set(rerun) == set(plan.jobs) - set(done_first)
    assert sorted(second.already_done) == sorted(done_first)
    records = Manifest(ws.manifest_path).records()
    assert records[stop].attempts == 2
    assert all(r.attempts == 1 for k, r in records.items() if k != stop)


def test_the_report_is_refreshed_when_a_run_was_added(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run(ws, micro_plan(seeds=1))
    n = len(fakes.calls(tmp_path))
    bigger = micro_plan(seeds=2)
    result = run(ws, bigger)
    assert result.ok
    new = fakes.calls(tmp_path)[n:]
    assert new[-1] == "report"
    assert set(new[:-1]) == {k for k in bigger.jobs if k.endswith("seed1")}
    assert Manifest(ws.manifest_path).get("report").attempts == 2


def test_a_job_that_dies_before_recording_is_marked_failed(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1, methods=("diagonal",))
    # A runner that cannot even be imported: the stage never writes a record.
    bad = "predict/pancreas/diagonal/seed0"
    from dataclasses import replace

    plan.jobs[bad] = replace(plan.jobs[bad], runner="no_such_module_xyz:run")
    result = run(ws, plan)
    assert [o.key for o in result.failed] == [bad]
    assert result.failed[0].error_type == "ModuleNotFoundError"
    rec = Manifest(ws.manifest_path).get(bad)
    assert rec is not None and rec.status == "failed" and "no_such_module_xyz" in rec.error


def test_one_study_per_workdir(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    (tmp_path / "study").mkdir()
    with FileLock(str(tmp_path / "study" / "study.lock")):
        with pytest.raises(StudyBusyError, match="Another mobseg study"):
            run(ws, micro_plan(seeds=1))
    assert fakes.calls(tmp_path) == []


def test_outcome_callback_sees_every_job(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1, methods=("mob",))
    seen: list[str] = []
    run_plan(ws, plan, SequentialExecutor(ws.root), on_outcome=lambda j, o: seen.append(o.key))
    assert sorted(seen) == sorted(plan.jobs)
