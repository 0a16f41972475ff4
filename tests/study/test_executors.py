"""Executors with fake stages: worker processes, GPU pinning, submitit's local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import study_fakes as fakes

from mobseg.errors import ConfigurationError, UnknownNameError
from mobseg.manifest import Manifest
from mobseg.study import executors as ex
from mobseg.study.grid import Job, Plan, StudySpec, expand
from mobseg.study.runner import run_plan
from mobseg.workspace import Workspace


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes (spawned, or submitit's) import study_fakes from PYTHONPATH."""
    import os

    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(fakes.HERE) + (os.pathsep + old if old else ""))


@pytest.fixture
def fake_slurm_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """srun and sbatch on PATH that must never be called (no job is submitted)."""
    import os

    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        path = bin_dir / tool
        path.write_text("#!/bin/sh\necho called >&2\nexit 3\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def micro_plan(seeds: int = 1, methods: tuple[str, ...] = ("mob",)) -> Plan:
    spec = StudySpec(organs=("pancreas",), methods=methods, seeds=seeds, ablation_bases=())
    return fakes.wrap(expand(spec))


def test_process_pool_runs_the_grid_in_worker_processes(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=2)
    result = run_plan(ws, plan, ex.ProcessExecutor(tmp_path, jobs=2, gpus=[]))
    assert result.ok, [o.error for o in result.failed]
    assert sorted(fakes.calls(tmp_path)) == sorted(plan.jobs)
    records = Manifest(ws.manifest_path).records()
    pids = {records[k].outputs["pid"] for k in plan.jobs}
    assert len(pids) == len(plan)  # one fresh process per job
    import os

    assert os.getpid() not in pids
    logs = sorted(p.name for p in (tmp_path / "study" / "logs").iterdir())
    assert "finetune__pancreas__mob-b3-r16__seed1.log" in logs


def test_a_killed_worker_fails_its_job_and_the_study_goes_on(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=2)
    victim = "finetune/pancreas/mob-b3-r16/seed0"
    fakes.control(tmp_path, kill=[victim])
    result = run_plan(ws, plan, ex.ProcessExecutor(tmp_path, jobs=2, gpus=[]))
    assert [o.key for o in result.failed] == [victim]
    assert result.failed[0].error.startswith("WorkerDied:")
    assert "SIGKILL" in result.failed[0].error
    assert result.failed[0].infrastructure
    assert set(result.skipped) == {
        "predict/pancreas/mob-b3-r16/seed0",
        "evaluate/pancreas/mob-b3-r16/seed0",
    }
    rec = Manifest(ws.manifest_path).get(victim)
    assert rec.status == "failed" and "SIGKILL" in rec.error
    assert Manifest(ws.manifest_path).is_done("evaluate/pancreas/mob-b3-r16/seed1")

    fakes.control(tmp_path)
    n = len(fakes.calls(tmp_path))
    again = run_plan(ws, plan, ex.ProcessExecutor(tmp_path, jobs=2, gpus=[]))
    assert again.ok
    assert set(fakes.calls(tmp_path)[n:]) == {victim, *result.skipped, "report"}


def test_each_worker_is_pinned_to_its_own_gpus(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = Plan()
    # Three one-GPU jobs on two GPUs, then a two-GPU job (DDP pretraining).
    for i in range(3):
        key = f"prepare/o{i}"
        plan.add(fakes.prepare_job(key))
    big = "pretrain/o0"
    plan.add(
        Job(
            "pretrain",
            big,
            fakes.Wrapped("pretrain", big, ("prepare/o0",)),
            deps=("prepare/o0",),
            runner=fakes.RUNNER,
            gpus=2,
        )
    )
    fakes.control(tmp_path, gpus=[*plan.jobs], gpu_sleep=1.0)
    result = run_plan(ws, plan, ex.ProcessExecutor(tmp_path, jobs=3, gpus=["0", "1"]))
    assert result.ok
    seen = dict(ln.split() for ln in (tmp_path / "gpus.log").read_text().splitlines())
    assert {seen[f"prepare/o{i}"] for i in range(3)} <= {"0", "1"}
    assert seen[big] == "0,1"
    # At most two one-GPU jobs ran at once on two GPUs: the third waited for a free one.
    assert seen["prepare/o0"] != seen["prepare/o1"]


def test_jobs_without_gpus_are_not_pinned(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = fakes.single("prepare/a")
    fakes.control(tmp_path, gpus=["prepare/a"], gpu_sleep=0)
    assert run_plan(ws, plan, ex.ProcessExecutor(tmp_path, jobs=2, gpus=[])).ok
    import os

    expected = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    assert (tmp_path / "gpus.log").read_text().split() == ["prepare/a", expected]


def test_submitit_local_executor_runs_a_micro_grid(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    plan = micro_plan(seeds=1)
    fail = "predict/pancreas/backbone/seed0"
    fakes.control(tmp_path, fail=[fail])
    opts = ex.ClusterOptions(time_min=5, poll_s=0.2)
    runner = ex.make_executor("submitit-local", tmp_path, jobs=3, options=opts)
    assert isinstance(runner, ex.SubmititExecutor) and runner.options.max_running == 3
    result = run_plan(ws, plan, runner)
    assert [o.key for o in result.failed] == [fail]
    assert result.failed[0].error == f"InvalidInputError: fake failure of {fail}"
    assert result.skipped == {"evaluate/pancreas/backbone/seed0": fail}
    assert set(fakes.calls(tmp_path)) == set(plan.jobs) - set(result.skipped)
    ids = json.loads((tmp_path / "study" / "submitted.json").read_text())
    assert set(ids) == set(plan.jobs) - set(result.skipped)
    # submitit's own logs are in the logs folder, one folder per job id.
    folder = Path(ids["report"]["folder"])
    assert folder.parent == tmp_path / "study" / "logs"
    assert any(p.name.endswith("_log.out") for p in folder.iterdir())
    records = Manifest(ws.manifest_path).records()
    pids = {records[k].outputs["pid"] for k in ids if k != fail}
    assert len(pids) == len(ids) - 1  # every job in its own subprocess


def test_submitit_resubmits_a_job_that_died(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    key = "prepare/a"
    plan = fakes.single(key)
    fakes.control(tmp_path, kill_once=[key])
    opts = ex.ClusterOptions(time_min=5, poll_s=0.2, retries=1)
    result = run_plan(ws, plan, ex.make_executor("submitit-local", tmp_path, options=opts))
    assert result.ok, [o.error for o in result.failed]
    assert fakes.calls(tmp_path) == [key, key]  # killed once, then resubmitted
    assert Manifest(ws.manifest_path).get(key).attempts == 2

    # Without retries the death is a failure with the job's state.
    key2 = "prepare/b"
    plan2 = fakes.single(key2)
    fakes.control(tmp_path, kill_once=[key2])
    opts0 = ex.ClusterOptions(time_min=5, poll_s=0.2, retries=0)
    result = run_plan(ws, plan2, ex.make_executor("submitit-local", tmp_path, options=opts0))
    assert [o.key for o in result.failed] == [key2]
    assert result.failed[0].error.startswith("JobDied: submitit-local job")
    assert Manifest(ws.manifest_path).get(key2).status == "failed"


def test_a_fork_pool_inside_a_submitit_job_ends(tmp_path: Path) -> None:
    """submitit makes SIGTERM a no-op in jobs; a stuck forked pool worker must still end.

    Without resetting SIGTERM the pool's terminate() waits forever for the
    worker (the job then dies at its 1-minute limit and the test fails
    instead of hanging).
    """
    ws = Workspace(tmp_path)
    key = "prepare/a"
    plan = fakes.single(key)
    fakes.control(tmp_path, fork_pool=[key])
    opts = ex.ClusterOptions(time_min=1, poll_s=0.2, retries=0)
    result = run_plan(ws, plan, ex.make_executor("submitit-local", tmp_path, options=opts))
    assert result.ok, [o.error for o in result.failed]
    assert Manifest(ws.manifest_path).get(key).outputs["pool"] == "ended"


def test_slurm_needs_the_slurm_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="srun and sbatch"):
        ex.make_executor("slurm", tmp_path)


@pytest.mark.usefixtures("fake_slurm_tools")
def test_slurm_resources_per_stage(tmp_path: Path) -> None:
    opts = ex.ClusterOptions(
        partition="gpu",
        gpus=1,
        cpus=6,
        mem_gb=40,
        time_min=600,
        pretrain_time_min=4000,
        array_parallelism=16,
        setup=("module load cuda",),
        extra={"account": "abc"},
    )
    runner = ex.SubmititExecutor(tmp_path, "slurm", tmp_path / "logs", opts)
    plan = expand(StudySpec(organs=("pancreas",), seeds=1, ablation_bases=(), num_gpus=4))
    pre = runner.resources(plan["prepare/pancreas"])
    assert pre["gpus_per_node"] == 0 and pre["timeout_min"] == 600
    pt = runner.resources(plan["pretrain/pancreas"])
    assert pt["gpus_per_node"] == 4 and pt["timeout_min"] == 4000
    assert pt["name"] == "mobseg-pretrain"
    ft = runner.resources(plan["finetune/pancreas/mob-b3-r16/seed0"])
    assert ft["gpus_per_node"] == 1 and ft["slurm_partition"] == "gpu"
    assert (ft["cpus_per_task"], ft["mem_gb"], ft["slurm_array_parallelism"]) == (6, 40, 16)
    assert ft["slurm_setup"] == ["module load cuda"]
    assert ft["slurm_additional_parameters"] == {"account": "abc"}
    assert runner.resources(plan["evaluate/pancreas/mob-b3-r16/seed0"])["gpus_per_node"] == 0
    assert runner.resources(plan["report"])["gpus_per_node"] == 0
    # Every parameter is one submitit's AutoExecutor accepts for Slurm.
    runner._ex.update_parameters(**ft)
    runner._ex.update_parameters(**pt)
    cpu = ex.SubmititExecutor(tmp_path, "slurm", tmp_path / "logs", ex.ClusterOptions(gpus=0))
    assert cpu.resources(plan["pretrain/pancreas"])["gpus_per_node"] == 0


@pytest.mark.usefixtures("fake_slurm_tools")
def test_slurm_attaches_to_jobs_still_queued_after_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun does not submit twice what an interrupted study left on the cluster."""
    runner = ex.SubmititExecutor(tmp_path, "slurm", tmp_path / "logs", ex.ClusterOptions())
    runner._save_ids(
        {
            "prepare/a": {"job_id": "101_0", "folder": str(tmp_path / "logs" / "101_0")},
            "prepare/b": {"job_id": "101_1", "folder": str(tmp_path / "logs" / "101_1")},
        }
    )
    states = {"101_0": "RUNNING", "101_1": "FAILED"}

    class FakeSlurmJob:
        def __init__(self, folder: str, job_id: str) -> None:
            self.job_id = job_id
            self.state = states[job_id]

    import submitit.slurm.slurm as slurm_mod

    monkeypatch.setattr(slurm_mod, "SlurmJob", FakeSlurmJob)
    assert runner.attach("prepare/a").job_id == "101_0"
    assert runner.attach("prepare/b") is None  # ended: resubmit
    assert runner.attach("prepare/c") is None  # never submitted
    submitted: list[list[str]] = []

    class FakeBatch:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *a: object) -> None:
            return None

    class FakeAuto:
        def update_parameters(self, **kw: object) -> None:
            pass

        def batch(self) -> FakeBatch:
            return FakeBatch()

        def submit(self, fn: object, root: str, job: Job, force: bool, worker: bool) -> object:
            submitted.append([job.key])
            return type("H", (), {"job_id": "202_0", "paths": type("P", (), {"folder": "x"})})()

    runner._ex = FakeAuto()
    jobs = [Job("prepare", k, None) for k in ("prepare/a", "prepare/b")]
    # prepare/a is "running" in the manifest (interrupted), prepare/b failed.
    m = Manifest(tmp_path / "manifest.json")
    m.start("prepare", "prepare/a")
    m.start("prepare", "prepare/b")
    m.fail("prepare/b", "boom")
    started = runner.submit([(j, False) for j in jobs])
    assert started == ["prepare/a", "prepare/b"]
    assert submitted == [["prepare/b"]]
    assert runner.shutdown(interrupted=True) == ["101_0", "202_0"]


@pytest.mark.usefixtures("fake_slurm_tools")
def test_make_executor_choices(tmp_path: Path) -> None:
    assert isinstance(ex.make_executor("local", tmp_path), ex.SequentialExecutor)
    assert isinstance(ex.make_executor("local", tmp_path, jobs=1), ex.SequentialExecutor)
    pool = ex.make_executor("local", tmp_path, jobs=3)
    assert isinstance(pool, ex.ProcessExecutor) and pool.jobs == 3
    slurm = ex.make_executor("slurm", tmp_path)
    assert isinstance(slurm, ex.SubmititExecutor) and slurm.options.max_running == 0
    with pytest.raises(UnknownNameError, match="slurm"):
        ex.make_executor("slurmm", tmp_path)
    with pytest.raises(ConfigurationError, match="--jobs"):
        ex.make_executor("local", tmp_path, jobs=0)


def test_visible_gpus_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert ex.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ex.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    assert ex.visible_gpus() == [str(i) for i in range(torch.cuda.device_count())]


def test_runner_strings_resolve() -> None:
    assert ex.resolve_runner("mobseg.stages.prepare:run").__name__ == "run"
    with pytest.raises(ValueError, match="module:function"):
        ex.resolve_runner("mobseg.stages.prepare")
    assert ex.log_name("predict/pancreas/mob-b3-r16/seed0/s 0") == (
        "predict__pancreas__mob-b3-r16__seed0__s_0"
    )


@pytest.mark.usefixtures("fake_slurm_tools")
def test_a_refused_slurm_submission_is_a_user_error(tmp_path: Path) -> None:
    """sbatch failing (here: the fake one exits 3) stops the study with one clear line."""
    ws = Workspace(tmp_path)
    plan = Plan()
    plan.add(Job("prepare", "prepare/a", fakes.Wrapped("prepare", "prepare/a", ()), gpus=0))
    runner = ex.make_executor("slurm", tmp_path, options=ex.ClusterOptions(partition="nope"))
    with pytest.raises(ConfigurationError, match="slurm refused to take 1 prepare job"):
        run_plan(ws, plan, runner)
    assert Manifest(ws.manifest_path).get("prepare/a") is None
    assert not (tmp_path / "study" / "submitted.json").exists()


def test_a_single_gpu_is_shared_not_pinned(tmp_path: Path) -> None:
    pool = ex.ProcessExecutor(tmp_path, jobs=2, gpus=["0"])
    assert pool.gpus == [] and pool._gpus_needed(Job("finetune", "k", None, gpus=1)) == 0
    assert ex.ProcessExecutor(tmp_path, jobs=2, gpus=["3", "5"]).gpus == ["3", "5"]
