"""Cheap stand-ins for the stages, for the study runner's tests.

``wrap(plan)`` points every job of a real plan at :func:`run` and wraps its
params with the job's stage, key and dependencies. :func:`run` behaves like a
stage: it returns at once when the manifest says done and current (unless
``force``), checks that its dependencies are done (``Manifest.require``, the
ordering oracle), records itself with ``Manifest.running`` (with its
dependencies as upstream records) and appends its key to
``<workdir>/calls.log``. ``<workdir>/control.json`` makes chosen keys fail,
raise KeyboardInterrupt, kill their own process, or report their GPUs.

The module is imported by worker processes too (spawned, or submitit's), so
tests put this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mobseg.errors import InvalidInputError
from mobseg.manifest import Manifest
from mobseg.study.grid import Job, Plan
from mobseg.workspace import Workspace

HERE = Path(__file__).resolve().parent
RUNNER = "study_fakes:run"


@dataclass(frozen=True)
class Wrapped:
    """A job's real params, with what the fake needs to know."""

    stage: str
    key: str
    deps: tuple[str, ...]
    inner: Any = None


def wrap(plan: Plan) -> Plan:
    """The plan with every job running :func:`run`."""
    return Plan(
        {
            k: replace(j, runner=RUNNER, params=Wrapped(j.stage, j.key, j.deps, j.params))
            for k, j in plan.jobs.items()
        }
    )


def prepare_job(key: str) -> Job:
    """A fake ``prepare`` job with no dependencies, recorded under ``key``."""
    return Job("prepare", key, Wrapped("prepare", key, ()), runner=RUNNER)


def single(key: str) -> Plan:
    """A plan of one fake ``prepare`` job."""
    plan = Plan()
    plan.add(prepare_job(key))
    return plan


def control(root: Path, **behaviour: Any) -> None:
    """Write ``control.json``: lists of keys under fail / interrupt / kill / kill_once /
    fork_pool / gpus."""
    (Path(root) / "control.json").write_text(json.dumps(behaviour), encoding="utf-8")


def calls(root: Path) -> list[str]:
    """Keys the fake stage ran (not those it skipped as done), in order."""
    path = Path(root) / "calls.log"
    if not path.exists():
        return []
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln]


def run(ws: Workspace, params: Wrapped, force: bool = False) -> None:
    manifest = Manifest(ws.manifest_path)
    if manifest.is_done(params.key) and not force and not manifest.stale(manifest.get(params.key)):
        return
    upstream = []
    for dep in params.deps:
        if params.stage != "report":
            upstream.append(manifest.require(dep, f"fake {dep}"))
    path = ws.root / "control.json"
    ctl = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    with manifest.running(params.stage, params.key, {"fake": True}, {}, upstream) as outputs:
        with open(ws.root / "calls.log", "a", encoding="utf-8") as fh:
            fh.write(params.key + "\n")
        if ctl.get("sleep"):
            time.sleep(float(ctl["sleep"]))
        if params.key in ctl.get("gpus", []):
            gpu_file = ws.root / "gpus.log"
            with open(gpu_file, "a", encoding="utf-8") as fh:
                fh.write(f"{params.key} {os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}\n")
            time.sleep(float(ctl.get("gpu_sleep", 0.5)))
        if params.key in ctl.get("fork_pool", []):
            # A fork Pool closed with terminate() while a worker is stuck (as a
            # forked child can be on a lock another thread held at fork time):
            # only SIGTERM ends that worker.
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(1) as pool:
                pool.map_async(time.sleep, [600])
                time.sleep(0.5)
            outputs["pool"] = "ended"
        if params.key in ctl.get("fail", []):
            raise InvalidInputError(f"fake failure of {params.key}")
        if params.key in ctl.get("interrupt", []):
            raise KeyboardInterrupt
        if params.key in ctl.get("kill", []):
            os.kill(os.getpid(), signal.SIGKILL)
        if params.key in ctl.get("kill_once", []):
            marker = ws.root / ("killed_" + params.key.replace("/", "_"))
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        outputs["pid"] = os.getpid()
