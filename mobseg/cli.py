"""The ``mobseg`` command line: parsing and rendering only.

Every command builds a ``*Params`` dataclass and calls the stage's Python API
in :mod:`mobseg.stages`. Heavy libraries (torch, nnunetv2) are imported inside
the stages, so ``mobseg --help`` starts instantly.

Exit status: 0 on success, 1 on a user error (one plain line on stderr; the
traceback only with ``--debug``), 2 on a usage error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mobseg import progress
from mobseg.errors import MobsegError
from mobseg.workspace import WORKDIR_ENV, Workspace

app = typer.Typer(
    name="mobseg",
    help=(
        "Segmentation with structured, trustworthy uncertainty: the mixture-of-bases "
        "study (Kampen, Aspe et al., NLDL 2026) on nnU-Net v2.\n\n"
        "Stages chain through <workdir>/manifest.json: prepare -> pretrain -> finetune "
        "-> predict -> evaluate -> report."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


class _State:
    workdir: str | None = None
    debug: bool = False
    verbosity: int = 1


state = _State()


def workspace() -> Workspace:
    """The workspace chosen by ``--workdir`` / ``$MOBSEG_WORKDIR``."""
    return Workspace.from_option(state.workdir).ensure()


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn a MobsegError into one line on stderr and exit 1."""
    try:
        return fn()
    except MobsegError as exc:
        if state.debug:
            raise
        err.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.callback()
def main_options(
    workdir: Annotated[
        str | None,
        typer.Option(
            "--workdir",
            "-w",
            envvar=WORKDIR_ENV,
            help="Working directory of the study (manifest, data, runs, report).",
            show_default="./mobseg_work",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only errors and results; no progress bars.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Global options, valid before any command."""
    state.workdir = workdir
    state.debug = debug
    state.verbosity = 0 if quiet else (2 if verbose else 1)
    progress.set_enabled(not quiet)
    from rich.logging import RichHandler

    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[state.verbosity]
    root = logging.getLogger("mobseg")
    root.handlers[:] = [RichHandler(console=err, show_path=debug, show_time=False)]
    root.setLevel(level)
    root.propagate = False


def _print_record(rec: Any) -> None:
    if state.verbosity == 0 or rec is None:
        return
    outputs = getattr(rec, "outputs", {}) or {}
    out.print(f"[green]{rec.key}[/]: {rec.status}")
    for name, value in outputs.items():
        if isinstance(value, (str, int, float)):
            out.print(f"  {name}: {value}", highlight=False)


# Options shared by several commands ------------------------------------------------
OrganOpt = Annotated[str, typer.Option("--organ", "-o", help="Target structure, e.g. pancreas.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the run.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is done.")]
PresetOpt = Annotated[
    str,
    typer.Option("--preset", help="paper (GPU, the published set-up) or cpu (minutes on 2 cores)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
MethodOpt = Annotated[
    str,
    typer.Option("--method", "-m", help="deterministic, diagonal, lowrank, single-basis or mob."),
]
BasesOpt = Annotated[int, typer.Option("--bases", help="M, number of bases (mob).")]
RankOpt = Annotated[int, typer.Option("--rank", help="R, rank of the factor / bases.")]
PartOpt = Annotated[int, typer.Option("--partitions", help="P, blocks per axis (mob).")]
NoiseOpt = Annotated[
    str, typer.Option("--noise", help="voxel, block (mob, single-basis) or global (single-basis).")
]
MixingOpt = Annotated[str, typer.Option("--mixing", help="soft or hard mixing of bases (mob).")]


def _head(method: str, bases: int, rank: int, partitions: int, noise: str, mixing: str) -> Any:
    from mobseg.core.config import HeadConfig

    return HeadConfig(
        method=method, bases=bases, rank=rank, partitions=partitions, noise=noise, mixing=mixing
    )


def _organ(name: str) -> str:
    from mobseg.data.structures import resolve_organ

    return resolve_organ(name)


# Commands ---------------------------------------------------------------------------
@app.command()
def prepare(
    organ: OrganOpt,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="zenodo (download TotalSegmentator v2.0.1), phantom (synthetic CT with known "
            "truth), or the path of an extracted dataset folder or its zip file.",
        ),
    ] = "zenodo",
    subset: Annotated[
        str, typer.Option("--subset", help="full (1228 scans) or small (102), zenodo only.")
    ] = "full",
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, typer.Option(help="Share held out for testing.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Share of the rest for validation.")] = 0.2,
    min_voxels: Annotated[int, typer.Option(help="Voxels for the organ to count as visible.")] = 1,
    spacing: Annotated[
        float | None, typer.Option(help="Resample to this isotropic spacing (mm).")
    ] = None,
    num_cases: Annotated[int, typer.Option(help="Number of phantom cases.")] = 40,
    size: Annotated[int, typer.Option(help="Edge length of phantom volumes (voxels).")] = 64,
    annotators: Annotated[int, typer.Option(help="Annotator masks per phantom case.")] = 3,
    on_error: Annotated[
        str, typer.Option(help="skip (record a bad case and go on) or fail.")
    ] = "skip",
    force: ForceOpt = False,
) -> None:
    """Get the data, keep the scans where the organ is visible, split, write the nnU-Net dataset."""
    from mobseg.stages import prepare as stage

    def go() -> Any:
        params = stage.PrepareParams(
            organ=_organ(organ),
            source=source,
            subset=subset,
            seed=seed,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            min_voxels=min_voxels,
            spacing=spacing,
            num_cases=num_cases,
            size=size,
            annotators=annotators,
            on_error=on_error,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def pretrain(
    organ: OrganOpt,
    preset: PresetOpt = "paper",
    device: DeviceOpt = "auto",
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    num_gpus: Annotated[int, typer.Option(help="GPUs for nnU-Net's DDP training.")] = 1,
    force: ForceOpt = False,
) -> None:
    """Train the deterministic nnU-Net v2 backbone (planning, preprocessing, training)."""
    from mobseg.stages import pretrain as stage

    def go() -> Any:
        params = stage.PretrainParams(
            organ=_organ(organ), preset=preset, device=device, epochs=epochs, num_gpus=num_gpus
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def finetune(
    organ: OrganOpt,
    method: MethodOpt = "mob",
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    samples: Annotated[int, typer.Option(help="k, samples of the logits per step.")] = 5,
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Override the preset's iterations per epoch.")
    ] = None,
    seed: SeedOpt = 0,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    mc_loss: Annotated[
        str, typer.Option(help="mean (paper) or logsumexp (SSN) Monte-Carlo loss.")
    ] = "mean",
    preset: PresetOpt = "paper",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Fine-tune the backbone with a stochastic head (or the deterministic control)."""
    from mobseg.core.config import LossConfig
    from mobseg.stages import finetune as stage

    def go() -> Any:
        params = stage.FinetuneParams(
            organ=_organ(organ),
            head=_head(method, bases, rank, partitions, noise, mixing),
            loss=LossConfig(samples=samples, mc_loss=mc_loss),
            seed=seed,
            preset=preset,
            device=device,
            epochs=epochs,
            iterations=iterations,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def predict(
    organ: OrganOpt,
    method: MethodOpt = "mob",
    seed: SeedOpt = 0,
    input: Annotated[
        Path | None, typer.Option("--input", "-i", help="CT file or folder; default: test split.")
    ] = None,
    samples: Annotated[int, typer.Option(help="k, samples of the logits per tile.")] = 30,
    tta: Annotated[bool, typer.Option(help="Mirroring test-time augmentation.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Predict segmentation, probability, variance and entropy maps (Monte-Carlo, one pass)."""
    from mobseg.stages import predict as stage

    def go() -> Any:
        params = stage.PredictParams(
            organ=_organ(organ),
            head=_head(method, bases, rank, partitions, noise, mixing),
            seed=seed,
            input=input,
            samples=samples,
            tta=tta,
            out=out_dir,
            device=device,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def evaluate(
    organ: Annotated[
        str | None, typer.Option("--organ", "-o", help="Study mode: the organ's runs.")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Study mode: only this method.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Study mode: only this seed.")] = None,
    pred: Annotated[
        Path | None, typer.Option(help="Standalone: folder of <case>_prob.nii.gz.")
    ] = None,
    gt: Annotated[Path | None, typer.Option(help="Standalone: folder of <case>.nii.gz.")] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Standalone: CSV to write.")
    ] = None,
    region: Annotated[str, typer.Option(help="all voxels or roi around the organ.")] = "all",
    margin: Annotated[int, typer.Option(help="ROI margin in voxels.")] = 10,
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    force: ForceOpt = False,
) -> None:
    """Score predictions: Dice, NLL, Brier, ECE/MCE, reliability, uncertainty quality."""
    from mobseg.stages import evaluate as stage

    def go() -> Any:
        head = None if method is None else _head(method, bases, rank, partitions, noise, mixing)
        params = stage.EvaluateParams(
            organ=None if organ is None else _organ(organ),
            head=head,
            seed=seed,
            pred=pred,
            gt=gt,
            out=out_file,
            region=region,
            margin=margin,
        )
        return stage.run(workspace(), params, force=force)

    for rec in guarded(go) or []:
        _print_record(rec)


@app.command()
def report(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    case: Annotated[str | None, typer.Option(help="Case shown in the case panels.")] = None,
) -> None:
    """Regenerate the paper's tables and figures from the runs in the manifest."""
    from mobseg.stages import report as stage

    _print_record(guarded(lambda: stage.run(workspace(), stage.ReportParams(out_dir, case))))


@app.command()
def status() -> None:
    """Show the manifest: every stage run, its status and when it finished."""
    from mobseg.manifest import Manifest

    def go() -> None:
        ws = Workspace.from_option(state.workdir)
        records = Manifest(ws.manifest_path).records()
        if not records:
            out.print(f"No stage has run in {ws.root} yet. Start with `mobseg prepare`.")
            return
        table = Table(title=f"mobseg manifest: {ws.manifest_path}")
        for col in ("key", "status", "attempts", "started", "finished", "error"):
            table.add_column(col, overflow="fold")
        colours = {"done": "green", "running": "yellow", "failed": "red"}
        for rec in records.values():
            c = colours.get(rec.status, "white")
            table.add_row(
                rec.key,
                f"[{c}]{rec.status}[/]",
                str(rec.attempts),
                rec.started,
                rec.finished or "-",
                rec.error or "",
            )
        out.print(table)

    guarded(go)


def main() -> None:
    """Console-script entry point."""
    if "--debug" in sys.argv[1:]:
        os.environ["MOBSEG_DEBUG"] = "1"
    app()


if __name__ == "__main__":
    main()
