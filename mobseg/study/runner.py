"""The study's scheduler: runs a :class:`~mobseg.study.grid.Plan` on an executor.

Rules:

- A job whose manifest record is ``done`` and current
  (:meth:`mobseg.study.grid.Plan.current`) is not run again; everything
  else (never run, ``failed``, ``running`` from an interrupted study, or
  outdated) is.
- A job starts once all its dependencies are done. A job marked
  ``after_any`` (the report) starts once all its dependencies have settled
  and at least one is done.
- A failed job does not stop the study: the jobs that depend on it are
  *skipped*, all others go on. The result lists failures and skips.
- A job marked ``refresh`` (the report) is redone with ``force`` when one of
  its dependencies ran in this invocation.
- Interrupting (Ctrl-C) stops the workers; the interrupted stages stay
  ``running`` in the manifest and resume on the next run. Finished, current
  stages are never redone.
- Only one study runs on a workdir at a time (``<workdir>/study/study.lock``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from filelock import FileLock, Timeout

from mobseg import progress
from mobseg.errors import MobsegError
from mobseg.manifest import Manifest
from mobseg.study.executors import Executor, Outcome
from mobseg.study.grid import Job, Plan
from mobseg.workspace import Workspace

logger = logging.getLogger(__name__)

_SETTLED = ("done", "ok", "failed", "skipped")
_SUCCEEDED = ("done", "ok")


class StudyBusyError(MobsegError):
    """Another ``mobseg study`` (or ``demo``) is running on the same workdir."""


@dataclass
class StudyResult:
    """What one run of the study did.

    Attributes:
        total: Jobs in the plan.
        already_done: Keys that were done before this run (not redone).
        succeeded: Outcomes of the jobs that ran and finished.
        failed: Outcomes of the jobs that failed.
        skipped: Key -> key of the failed job it (transitively) depends on.
        not_started: Keys that could not start (interrupted study).
        interrupted: The run was interrupted (Ctrl-C).
        left_on_cluster: Slurm job ids still queued or running after an interrupt.
        seconds: Wall time of the run.
    """

    total: int = 0
    already_done: list[str] = field(default_factory=list)
    succeeded: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)
    interrupted: bool = False
    left_on_cluster: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Everything in the plan is done."""
        return not (self.failed or self.skipped or self.not_started or self.interrupted)


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_plan(
    ws: Workspace,
    plan: Plan,
    executor: Executor,
    on_outcome: Callable[[Job, Outcome], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> StudyResult:
    """Run every job of ``plan`` that the manifest does not list as done.

    Args:
        ws: The workdir (its manifest is the shared state of all workers).
        plan: The jobs (:func:`mobseg.study.grid.expand`).
        executor: Where jobs run (:mod:`mobseg.study.executors`).
        on_outcome: Called in this process after each job ends.
        on_start: Called once the study lock is held, before any job
            (``mobseg study`` saves its spec there).

    Returns:
        What ran, failed, was skipped or left; ``result.ok`` when all is done.

    Raises:
        StudyBusyError: another study holds the workdir's study lock.
    """
    ws.ensure()
    (ws.root / "study").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.root / "study" / "study.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StudyBusyError(
            f"Another mobseg study is running on {ws.root}.",
            "Wait for it to finish, or watch it with `mobseg status`.",
        ) from None
    try:
        if on_start is not None:
            on_start()
        return _run(ws, plan, executor, on_outcome)
    finally:
        lock.release()


def _run(
    ws: Workspace,
    plan: Plan,
    executor: Executor,
    on_outcome: Callable[[Job, Outcome], None] | None,
) -> StudyResult:
    started_at = time.monotonic()
    manifest = Manifest(ws.manifest_path)
    records = manifest.records()
    result = StudyResult(total=len(plan))
    state: dict[str, str] = {}
    force: dict[str, bool] = {}
    cause: dict[str, str] = {}
    current = plan.current(records)
    for job in plan:
        done = job.key in current
        state[job.key] = "done" if done else "todo"
        force[job.key] = False
        if done:
            result.already_done.append(job.key)
    dependents = plan.dependents()

    def ready(job: Job) -> bool:
        if state[job.key] != "todo":
            return False
        deps = [state[d] for d in job.deps]
        if job.after_any:
            return all(s in _SETTLED for s in deps) and (
                not deps or any(s in _SUCCEEDED for s in deps)
            )
        return all(s in _SUCCEEDED for s in deps)

    def settle_skips() -> None:
        changed = True
        while changed:
            changed = False
            for job in plan:
                if state[job.key] != "todo" or not job.deps:
                    continue
                deps = [(d, state[d]) for d in job.deps]
                if job.after_any:
                    dead = all(s in ("failed", "skipped") for _d, s in deps)
                else:
                    dead = any(s in ("failed", "skipped") for _d, s in deps)
                if dead:
                    first = next(d for d, s in deps if s in ("failed", "skipped"))
                    state[job.key] = "skipped"
                    cause[job.key] = cause.get(first, first)
                    result.skipped[job.key] = cause[job.key]
                    changed = True

    todo = sum(1 for s in state.values() if s == "todo")
    logger.info(
        "study: %d jobs, %d done before, %d to run (%s executor)",
        len(plan),
        len(result.already_done),
        todo,
        executor.name,
    )
    # A done report is redone when one of its inputs runs: count it in the bar.
    refreshed = sum(
        1
        for j in plan
        if j.refresh and state[j.key] == "done" and any(state[d] == "todo" for d in j.deps)
    )
    finished = 0
    try:
        with progress.progress_bar("study", total=todo + refreshed) as advance:
            while True:
                settle_skips()
                candidates = [(j, force[j.key]) for j in plan if ready(j)]
                started = executor.submit(candidates) if candidates else []
                for key in started:
                    state[key] = "running"
                if executor.active() == 0:
                    break
                for outcome in executor.wait():
                    job = plan[outcome.key]
                    finished += 1
                    if outcome.ok:
                        state[job.key] = "ok"
                        result.succeeded.append(outcome)
                        logger.info(
                            "[%d/%d] done %s (%s)",
                            finished,
                            todo,
                            job.key,
                            format_duration(outcome.seconds),
                        )
                        for dep_key in dependents[job.key]:
                            if plan[dep_key].refresh and state[dep_key] == "done":
                                state[dep_key], force[dep_key] = "todo", True
                                todo += 1
                    else:
                        state[job.key] = "failed"
                        result.failed.append(outcome)
                        _record_failure(manifest, outcome)
                        where = f" (log: {outcome.log})" if outcome.log else ""
                        logger.error(
                            "[%d/%d] failed %s: %s%s",
                            finished,
                            todo,
                            job.key,
                            outcome.error,
                            where,
                        )
                    advance(1, last=job.key)
                    if on_outcome is not None:
                        on_outcome(job, outcome)
    except KeyboardInterrupt:
        result.interrupted = True
        result.left_on_cluster = executor.shutdown(interrupted=True)
        logger.warning("study interrupted; rerun the same command to continue")
    except BaseException:
        executor.shutdown(interrupted=True)  # e.g. the cluster refused a submission
        raise
    else:
        executor.shutdown()
    result.not_started = [k for k, s in state.items() if s in ("todo", "running")]
    result.seconds = time.monotonic() - started_at
    return result


def _record_failure(manifest: Manifest, outcome: Outcome) -> None:
    """Make the manifest say ``failed`` when the job died before its stage could.

    A stage records its own failures; a worker that was killed, or a stage
    that stopped before writing its record, leaves the record ``running`` or
    absent, which ``mobseg status`` would show as running or pending.
    """
    rec = manifest.get(outcome.key)
    if rec is None or rec.status == "running":
        manifest.fail(outcome.key, outcome.error or "failed")
