"""Where the study's jobs run: in this process, in local worker processes, or on Slurm.

Every executor runs :func:`execute` — ``mobseg.stages.<stage>.run(Workspace(root),
params, force)`` — somewhere, and reports an :class:`Outcome` per job. The
scheduling (dependencies, skipping what is done, failures) lives in
:mod:`mobseg.study.runner`; an executor only starts what it is given, as far
as its capacity allows, and says when jobs end.

- :class:`SequentialExecutor`: one job at a time, in this process (``--jobs 1``).
- :class:`ProcessExecutor`: up to N worker processes (``--jobs N``), each a
  fresh ``spawn``-ed Python; with several GPUs each worker is pinned to its
  own GPU(s) through ``CUDA_VISIBLE_DEVICES``. A worker that dies (killed,
  out of memory) fails its job; the others go on.
- :class:`SubmititExecutor`: submitit's ``AutoExecutor``; ``cluster="slurm"``
  submits job arrays (one per stage and wave of ready jobs) with a partition,
  GPUs, time, memory and a logs folder; ``cluster="local"`` runs the same
  pickled jobs as local subprocesses (used in the tests). Jobs that die
  without a Python result (time limit, preemption, node failure) are
  resubmitted up to ``retries`` times.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

from mobseg.study.grid import Job

logger = logging.getLogger(__name__)

#: Executor names of ``mobseg study --executor``.
EXECUTOR_NAMES: tuple[str, ...] = ("local", "slurm", "submitit-local")


@dataclass
class Outcome:
    """How one job ended.

    Attributes:
        key: The job's manifest key.
        ok: True when the stage function returned.
        error: ``"<ErrorType>: <first line>"`` of a failure.
        error_type: Class name of the exception (``MissingStageError``, ...).
        seconds: Wall time of the stage function (0 when unknown).
        log: Log file of the job, when it has one.
        infrastructure: True when the job died without a Python result
            (killed, time limit, node failure): worth resubmitting.
    """

    key: str
    ok: bool
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0
    log: str | None = None
    infrastructure: bool = False


def one_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def resolve_runner(target: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"A job runner must look like 'module:function', got {target!r}.")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def execute(root: str, job: Job, force: bool = False, worker: bool = False) -> Outcome:
    """Run one job: ``runner(Workspace(root), job.params, force=force)``.

    Runs in the study process, a worker process or a cluster node. An
    ``Exception`` becomes a failed :class:`Outcome` (the stage has recorded it
    in the manifest); KeyboardInterrupt and SystemExit propagate, leaving the
    manifest record ``running`` so that a rerun resumes it.

    Args:
        root: The workdir.
        job: The job.
        force: Redo the stage even if the manifest says done.
        worker: Configure logging and hide progress bars (not the study's own process).
    """
    from mobseg.workspace import Workspace

    if worker:
        from mobseg import progress

        _default_sigterm()
        progress.set_enabled(False)
        log = logging.getLogger("mobseg")
        if not log.handlers:
            handler = logging.StreamHandler()
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
            handler.setFormatter(logging.Formatter(fmt))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        logger.info("job %s: %s(force=%s)", job.key, job.target, force)
    start = time.monotonic()
    try:
        fn = resolve_runner(job.target)
        fn(Workspace(Path(root)).ensure(), job.params, force=force)
    except Exception as exc:  # noqa: BLE001 - continue past failures; the stage recorded it
        if worker:
            logger.error("job %s failed:\n%s", job.key, traceback.format_exc())
        return Outcome(
            job.key,
            False,
            error=one_line(exc),
            error_type=type(exc).__name__,
            seconds=time.monotonic() - start,
        )
    return Outcome(job.key, True, seconds=time.monotonic() - start)


def _default_sigterm() -> None:
    """Let SIGTERM end this worker and the processes it forks.

    submitit's job environment makes SIGTERM a no-op ("Bypassing signal
    SIGTERM"; it preempts with SIGUSR2), and forked children inherit that
    handler. nnU-Net lists a dataset with a fork ``multiprocessing.Pool``; a
    forked worker can hang (e.g. on a lock that another thread held at fork
    time), and the pool's ``terminate()`` ends it with SIGTERM. With the
    bypassing handler it never ends and the job waits forever (seen with
    ``pretrain`` under submitit). With the default action it ends; a job
    killed this way is resubmitted (``retries``) and its stage resumes.
    """
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave the handler alone
        pass


class Executor(Protocol):
    """What the study runner needs from an executor."""

    name: str

    def submit(self, tasks: Sequence[tuple[Job, bool]]) -> list[str]:
        """Start as many of ``(job, force)`` as capacity allows; return their keys."""
        ...

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until at least one started job ends (or ``timeout``); their outcomes."""
        ...

    def active(self) -> int:
        """Number of started jobs that have not been reported yet."""
        ...

    def shutdown(self, interrupted: bool = False) -> list[str]:
        """Stop; returns ids of cluster jobs left running (interrupted slurm study)."""
        ...


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``$CUDA_VISIBLE_DEVICES`` when set (an empty value means none), else
    ``0 .. torch.cuda.device_count() - 1``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def log_name(key: str) -> str:
    """File-system-safe name of a job's log: ``finetune__pancreas__mob-b3-r16__seed0``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace("/", "__"))


# -- in this process -----------------------------------------------------------------------
class SequentialExecutor:
    """Runs one job at a time in this process (stages show their own progress)."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._done: list[Outcome] = []

    def submit(self, tasks: Sequence[tuple[Job, bool]]) -> list[str]:
        if not tasks or self._done:
            return []
        job, force = tasks[0]
        logger.info("start %s", job.key)
        self._done.append(execute(str(self.root), job, force))
        return [job.key]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def active(self) -> int:
        return len(self._done)

    def shutdown(self, interrupted: bool = False) -> list[str]:
        return []


# -- local worker processes ----------------------------------------------------------------
def _worker_main(
    root: str, job: Job, force: bool, gpus: str | None, log_path: str, conn: Connection
) -> None:
    """Entry point of a worker process: pin GPUs, send output to the log, run the job."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    outcome = execute(root, job, force, worker=True)
    outcome.log = log_path
    conn.send(outcome)
    conn.close()


@dataclass
class _Running:
    job: Job
    process: Any
    conn: Connection
    gpus: list[str]
    log: str
    started: float = field(default_factory=time.monotonic)


class ProcessExecutor:
    """Up to ``jobs`` jobs at once, each in a fresh spawned worker process.

    Args:
        root: The workdir.
        jobs: Maximum number of concurrent workers.
        gpus: GPU ids to share out (None = detect with :func:`visible_gpus`).
            With two or more, each job is pinned to its own GPU(s) and a job
            needing ``g`` waits until ``g`` are free (never more than exist).
            With one or none there is no pinning: workers share what there is.
        log_dir: Folder of the workers' log files (``<key>.log``).
    """

    name = "local"

    def __init__(
        self, root: Path, jobs: int, gpus: Sequence[str] | None = None, log_dir: Path | None = None
    ) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}.")
        self.root = Path(root)
        self.jobs = jobs
        found = list(visible_gpus() if gpus is None else gpus)
        self.gpus = found if len(found) >= 2 else []
        self.free = list(self.gpus)
        self.log_dir = Path(log_dir) if log_dir is not None else self.root / "study" / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = mp.get_context("spawn")
        self._running: dict[int, _Running] = {}

    def _gpus_needed(self, job: Job) -> int:
        return min(job.gpus, len(self.gpus)) if self.gpus else 0

    def submit(self, tasks: Sequence[tuple[Job, bool]]) -> list[str]:
        started: list[str] = []
        for job, force in tasks:
            if len(self._running) >= self.jobs:
                break
            need = self._gpus_needed(job)
            if need > len(self.free):
                continue
            mine, self.free = self.free[:need], self.free[need:]
            log = str(self.log_dir / f"{log_name(job.key)}.log")
            parent, child = self._ctx.Pipe(duplex=False)
            pin = ",".join(mine) if self.gpus else None
            proc = self._ctx.Process(
                target=_worker_main,
                args=(str(self.root), job, force, pin, log, child),
                name=f"mobseg-{job.key}",
            )
            proc.start()
            child.close()
            self._running[proc.sentinel] = _Running(job, proc, parent, mine, log)
            where = f" on GPU {','.join(mine)}" if mine else ""
            logger.info("start %s%s (log: %s)", job.key, where, log)
            started.append(job.key)
        return started

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self._running:
            return []
        ready = wait(list(self._running), timeout)
        outcomes = []
        for sentinel in ready:
            run = self._running.pop(sentinel)  # type: ignore[arg-type]
            outcome: Outcome | None = None
            try:
                if run.conn.poll():
                    outcome = run.conn.recv()
            except (EOFError, OSError):
                outcome = None
            run.process.join()
            run.conn.close()
            code = run.process.exitcode
            if outcome is None:
                why = f"exit code {code}"
                if code is not None and code < 0:
                    try:
                        why = f"killed by {signal.Signals(-code).name}"
                    except ValueError:
                        why = f"killed by signal {-code}"
                outcome = Outcome(
                    run.job.key,
                    False,
                    error=f"WorkerDied: the worker process ended without a result ({why}).",
                    error_type="WorkerDied",
                    seconds=time.monotonic() - run.started,
                    log=run.log,
                    infrastructure=True,
                )
            self.free = sorted([*self.free, *run.gpus], key=self.gpus.index)
            outcomes.append(outcome)
        return outcomes

    def active(self) -> int:
        return len(self._running)

    def shutdown(self, interrupted: bool = False) -> list[str]:
        for run in self._running.values():
            if run.process.is_alive():
                run.process.terminate()
        for run in self._running.values():
            run.process.join(timeout=30)
            if run.process.is_alive():  # pragma: no cover - a stuck worker
                run.process.kill()
                run.process.join()
            run.conn.close()
        self._running.clear()
        return []


# -- submitit: Slurm, or submitit's local subprocesses -------------------------------------
@dataclass
class ClusterOptions:
    """Resources of cluster jobs (``mobseg study --executor slurm``).

    Attributes:
        partition: Slurm partition (None = the cluster's default).
        gpus: GPUs of each fine-tuning and prediction job; pretraining asks
            for ``--num-gpus``; 0 = CPU-only nodes.
        cpus: CPUs per job.
        mem_gb: Memory per job in GB (None = the partition's default).
        time_min: Time limit of a job in minutes.
        pretrain_time_min: Time limit of a pretraining job in minutes.
        array_parallelism: Most tasks of one array running at once.
        max_running: Most submitted jobs not yet finished (0 = no limit).
        retries: Resubmissions of a job that died without a result.
        poll_s: Seconds between status polls.
        setup: Shell lines run before each job (``module load ...``).
        extra: Further sbatch options, ``{"account": "abc", "qos": "high"}``.
    """

    partition: str | None = None
    gpus: int = 1
    cpus: int = 8
    mem_gb: float | None = None
    time_min: int = 24 * 60
    pretrain_time_min: int = 72 * 60
    array_parallelism: int = 64
    max_running: int = 0
    retries: int = 1
    poll_s: float = 30.0
    setup: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


#: Slurm states of a job that may still produce a result.
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING")


class SubmititExecutor:
    """Runs jobs through submitit (``cluster="slurm"`` or ``"local"``).

    Each call of :meth:`submit` groups the ready jobs by stage and submits one
    job array per group (``executor.batch()``), with the group's resources.
    Submitted job ids are kept in ``<root>/study/submitted.json``; a rerun of
    an interrupted study attaches to Slurm jobs that are still queued or
    running instead of submitting them twice.

    Args:
        root: The workdir (on a file system shared with the nodes).
        cluster: ``slurm`` or ``local``.
        folder: submitit's folder of pickles and logs (``%j`` is the job id).
        options: Resources and polling.
    """

    def __init__(
        self, root: Path, cluster: str, folder: Path, options: ClusterOptions | None = None
    ) -> None:
        import submitit

        from mobseg.errors import ConfigurationError

        if cluster not in ("slurm", "local", "debug"):
            raise ValueError(f"cluster must be slurm, local or debug, got {cluster!r}.")
        if cluster == "slurm" and (shutil.which("srun") is None or shutil.which("sbatch") is None):
            raise ConfigurationError(
                "Slurm's srun and sbatch are not on this machine's PATH.",
                "Run `mobseg study --executor slurm` on a login node of the cluster, or use "
                "--executor local.",
            )
        self.root = Path(root)
        self.cluster = cluster
        self.name = "slurm" if cluster == "slurm" else f"submitit-{cluster}"
        self.options = options or ClusterOptions()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ex = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=cluster)
        self._running: dict[str, tuple[Job, bool, Any]] = {}
        self._attempts: dict[str, int] = {}
        self._state_file = self.root / "study" / "submitted.json"

    # resources ----------------------------------------------------------------------------
    def resources(self, job: Job) -> dict[str, Any]:
        """submitit parameters of ``job``'s array (name, time, GPUs, partition, ...)."""
        o = self.options
        if o.gpus == 0 or job.gpus == 0:
            gpus = 0
        else:
            gpus = job.gpus if job.stage == "pretrain" else o.gpus
        params: dict[str, Any] = {
            "name": f"mobseg-{job.stage}",
            "timeout_min": o.pretrain_time_min if job.stage == "pretrain" else o.time_min,
            "gpus_per_node": gpus,
            "tasks_per_node": 1,
            "nodes": 1,
        }
        if self.cluster == "slurm":
            params["cpus_per_task"] = o.cpus
            if o.mem_gb is not None:
                params["mem_gb"] = o.mem_gb
            if o.partition:
                params["slurm_partition"] = o.partition
            params["slurm_array_parallelism"] = o.array_parallelism
            if o.setup:
                params["slurm_setup"] = list(o.setup)
            if o.extra:
                params["slurm_additional_parameters"] = dict(o.extra)
        return params

    # bookkeeping of submitted ids --------------------------------------------------------
    def _load_ids(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self._state_file.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def _save_ids(self, new: dict[str, dict[str, str]]) -> None:
        ids = self._load_ids()
        ids.update(new)
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ids, indent=1), encoding="utf-8")
        tmp.replace(self._state_file)

    def _manifest_records(self) -> dict[str, Any]:
        from mobseg.manifest import Manifest

        return Manifest(self.root / "manifest.json").records()

    def attach(self, key: str) -> Any | None:
        """The still active Slurm job of ``key`` from an earlier study run, or None."""
        if self.cluster != "slurm":
            return None
        entry = self._load_ids().get(key)
        if not entry:
            return None
        from submitit.slurm.slurm import SlurmJob

        try:
            job = SlurmJob(folder=entry["folder"], job_id=entry["job_id"])
            state = job.state
        except Exception:  # noqa: BLE001 - sacct unavailable or job unknown: resubmit
            return None
        return job if state in ACTIVE_STATES else None

    # the executor protocol ---------------------------------------------------------------
    def submit(self, tasks: Sequence[tuple[Job, bool]]) -> list[str]:
        limit = self.options.max_running
        room = len(tasks) if limit <= 0 else max(0, limit - len(self._running))
        chosen = list(tasks[:room])
        started: list[str] = []
        fresh: list[tuple[Job, bool]] = []
        records = self._manifest_records() if self.cluster == "slurm" else {}
        for job, force in chosen:
            rec = records.get(job.key)
            interrupted = rec is None or rec.status == "running"
            old = self.attach(job.key) if interrupted and not force else None
            if old is not None:
                logger.info("attach %s to Slurm job %s", job.key, old.job_id)
                self._running[job.key] = (job, force, old)
                started.append(job.key)
            else:
                fresh.append((job, force))
        groups: dict[tuple[str, ...], list[tuple[Job, bool]]] = {}
        for job, force in fresh:
            sig = tuple(f"{k}={v}" for k, v in sorted(self.resources(job).items()))
            groups.setdefault(sig, []).append((job, force))
        ids: dict[str, dict[str, str]] = {}
        for group in groups.values():
            self._ex.update_parameters(**self.resources(group[0][0]))
            try:
                with self._ex.batch():
                    handles = [
                        self._ex.submit(execute, str(self.root), job, force, True)
                        for job, force in group
                    ]
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                from mobseg.errors import ConfigurationError

                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                raise ConfigurationError(
                    f"{self.name} refused to take {len(group)} {group[0][0].stage} job(s): "
                    f"{lines[-1] if lines else type(exc).__name__}",
                    "Check --partition, --gpus-per-job, --time-min and --slurm-arg; finished "
                    "jobs are kept, rerun to continue.",
                ) from exc
            for (job, force), handle in zip(group, handles, strict=True):
                if self.cluster != "slurm" and hasattr(handle, "_results_timeout_s"):
                    # submitit waits this long for a result file that a killed job
                    # never writes; 15 s is meant for slow shared file systems.
                    handle._results_timeout_s = 2
                self._running[job.key] = (job, force, handle)
                self._attempts[job.key] = self._attempts.get(job.key, 0) + 1
                ids[job.key] = {"job_id": str(handle.job_id), "folder": str(handle.paths.folder)}
                started.append(job.key)
            logger.info(
                "submitted %d %s job(s) to %s: %s",
                len(group),
                group[0][0].stage,
                self.name,
                ", ".join(str(h.job_id) for h in handles[:5]) + (" ..." * (len(handles) > 5)),
            )
        if ids:
            self._save_ids(ids)
        return started

    def _outcome(self, key: str, handle: Any) -> Outcome:
        log = str(getattr(handle.paths, "stderr", "")) or None
        try:
            exc = handle.exception()
        except Exception as err:  # noqa: BLE001 - a result file that cannot be read
            exc = err
        if exc is None:
            try:
                result = handle.result()
            except Exception as err:  # noqa: BLE001
                exc = err
            else:
                if isinstance(result, Outcome):
                    result.log = result.log or log
                    return result
                return Outcome(key, True, log=log)
        state = getattr(handle, "state", "UNKNOWN")
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else type(exc).__name__
        return Outcome(
            key,
            False,
            error=f"JobDied: {self.name} job {handle.job_id} ended as {state}: {last}",
            error_type="JobDied",
            log=log,
            infrastructure=True,
        )

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = min(self.options.poll_s, 1.0) if self.cluster != "slurm" else self.options.poll_s
        while self._running:
            finished = [k for k, (_j, _f, h) in self._running.items() if h.done()]
            outcomes = []
            for key in finished:
                job, force, handle = self._running.pop(key)
                outcome = self._outcome(key, handle)
                if (
                    not outcome.ok
                    and outcome.infrastructure
                    and self._attempts.get(key, 1) <= self.options.retries
                ):
                    logger.warning("%s; resubmitting %s", outcome.error, key)
                    self.submit([(job, force)])
                    continue
                outcomes.append(outcome)
            if outcomes:
                return outcomes
            if deadline is not None and time.monotonic() >= deadline:
                return []
            time.sleep(poll)
        return []

    def active(self) -> int:
        return len(self._running)

    def shutdown(self, interrupted: bool = False) -> list[str]:
        left = [str(h.job_id) for (_j, _f, h) in self._running.values()]
        if self.cluster != "slurm":
            for _j, _f, handle in self._running.values():
                try:
                    handle.cancel(check=False)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            left = []
        self._running.clear()
        return left


def make_executor(
    name: str,
    root: Path,
    jobs: int | None = None,
    options: ClusterOptions | None = None,
    logs: Path | None = None,
) -> Executor:
    """The executor of ``mobseg study --executor NAME``.

    Args:
        name: ``local`` (one job: in this process; more: worker processes),
            ``slurm``, or ``submitit-local`` (submitit's local subprocesses,
            for trying the cluster path on one machine).
        root: The workdir.
        jobs: ``local``: concurrent jobs (default 1). ``slurm`` and
            ``submitit-local``: most jobs submitted and not finished at once
            (default: no limit on Slurm, 1 locally; 0 = no limit).
        options: Cluster resources (``slurm``, ``submitit-local``).
        logs: Log folder (default ``<root>/study/logs``).

    Raises:
        UnknownNameError: ``name`` is not an executor.
        ConfigurationError: ``jobs`` is negative, or 0 for ``local``.
    """
    from mobseg.errors import ConfigurationError, UnknownNameError

    if name not in EXECUTOR_NAMES:
        raise UnknownNameError("executor", name, EXECUTOR_NAMES)
    root = Path(root)
    log_dir = Path(logs) if logs is not None else root / "study" / "logs"
    if jobs is not None and (jobs < 0 or (jobs == 0 and name == "local")):
        raise ConfigurationError(f"--jobs must be >= 1, got {jobs}.")
    if name == "local":
        if jobs is None or jobs == 1:
            return SequentialExecutor(root)
        return ProcessExecutor(root, jobs, log_dir=log_dir)
    limit = (0 if name == "slurm" else 1) if jobs is None else jobs
    opts = replace(options or ClusterOptions(), max_running=limit)
    return SubmititExecutor(root, "slurm" if name == "slurm" else "local", log_dir, opts)
